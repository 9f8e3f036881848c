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


def test_nightly_runs_at_two_with_a_configurable_timezone_and_training_is_on_demand():
    nightly = deployment("nightly-inference")
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *"
    assert schedule["timezone"] == "{{ nightly-timezone.stdout }}"
    assert nightly["concurrency_limit"] == 1
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
