"""prefect.yaml describes the deployments the README and the stack rely on."""

import importlib
import shlex
import subprocess
from pathlib import Path

import yaml

from fcn_core.config import REPO_ROOT
from flows.stack import WORK_POOL

SPEC = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())


def deployment(name: str) -> dict:
    return next(d for d in SPEC["deployments"] if d["name"] == name)


def test_deployments_point_at_the_flows_of_the_same_name():
    for name in ("train-fcn", "nightly-inference"):
        spec = deployment(name)
        path, func = spec["entrypoint"].split(":")
        assert (REPO_ROOT / path).exists()
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert getattr(module, func).name == name  # `prefect deployment run NAME/NAME`
        assert spec["work_pool"]["name"] == WORK_POOL


def _timezone_step(**env: str) -> str:
    """The deployment's nightly-timezone build step, run as Prefect runs it (shlex-split, no shell)."""
    steps = {next(iter(s.values()))["id"]: next(iter(s.values())) for s in SPEC["build"]}
    return subprocess.run(shlex.split(steps["nightly-timezone"]["script"]), cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True, env={"PATH": "/usr/bin:/bin", **env}).stdout.strip()


def test_nightly_fires_at_two_local_time_in_the_configured_zone_and_training_is_on_demand():
    """The schedule Prefect's server builds from prefect.yaml fires once a day at 02:00 in
    WAFER_FCN_TIMEZONE (UTC by default), across a daylight-saving change; train-fcn has none."""
    import asyncio
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from prefect.server.schemas.schedules import CronSchedule

    (spec,) = deployment("nightly-inference")["schedules"]
    # 2026-03-29 02:00 does not exist in Berlin (clocks jump to 03:00): that night runs at 03:00
    expected = {"UTC": ["28 02:00", "29 02:00", "30 02:00", "31 02:00"],
                "Europe/Berlin": ["28 02:00", "29 03:00", "30 02:00", "31 02:00"]}
    for zone, want in expected.items():
        env = {} if zone == "UTC" else {"WAFER_FCN_TIMEZONE": zone}  # UTC is the step's default
        timezone = spec["timezone"].replace("{{ nightly-timezone.stdout }}", _timezone_step(**env))
        fires = asyncio.run(CronSchedule(cron=spec["cron"], timezone=timezone).get_dates(
            n=4, start=datetime(2026, 3, 27, 12, tzinfo=ZoneInfo(zone))))
        assert [f.astimezone(ZoneInfo(zone)).strftime("%d %H:%M") for f in fires] == want
    assert deployment("nightly-inference")["concurrency_limit"] == 1  # one night at a time per deployment
    assert not deployment("train-fcn").get("schedules")


def test_build_steps_give_an_absolute_working_directory_and_a_utc_default():
    steps = {next(iter(s.values()))["id"]: next(iter(s.values())) for s in SPEC["build"]}
    pull = SPEC["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ project-root.stdout }}"
    # the scripts as Prefect runs them (shlex-split, no shell), from the repository root
    def run(script: str, **env: str) -> str:
        return subprocess.run(shlex.split(script), cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                              env={"PATH": "/usr/bin:/bin", **env}).stdout.strip()

    root = run(steps["project-root"]["script"])
    assert Path(root).is_absolute() and Path(root).resolve() == REPO_ROOT.resolve()
    assert run(steps["nightly-timezone"]["script"]) == "UTC"
    assert run(steps["nightly-timezone"]["script"], WAFER_FCN_TIMEZONE="Europe/Berlin") == "Europe/Berlin"
