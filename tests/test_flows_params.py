"""Run parameters: a run started through the Prefect API cannot move models or state unless allowed."""

from __future__ import annotations

import pytest

from flows.params import (
    ALLOWED_OVERRIDES_ENV, ConfigParams, NightlyParams, OverrideNotAllowed, TrainParams, allowed_overrides,
    check_allowed, started_through_api,
)

DEPLOYMENT_ENV = "PREFECT__RUNTIME__DEPLOYMENT__ID"  # prefect.runtime's documented test hook


@pytest.mark.parametrize("overrides", [
    {"tracking.tracking_uri": "http://evil.example:5000"},
    ["tracking.tracking_uri=http://evil.example:5000"],
    {"tracking": {"tracking_uri": "http://evil.example:5000"}},  # the whole section
    {"tracking.registered_model": "someone-elses-model"},
    {"home": "/tmp/elsewhere"},
    [" home = /tmp/elsewhere"],
    {"eval.real_data": "/tmp/chosen.parquet"},
    {"eval": {"real_data": "/tmp/chosen.parquet"}},
])
def test_a_deployment_run_refuses_guarded_overrides(monkeypatch, overrides):
    monkeypatch.setenv(DEPLOYMENT_ENV, "0b1f5bd6-0000-0000-0000-000000000000")
    monkeypatch.delenv(ALLOWED_OVERRIDES_ENV, raising=False)
    assert started_through_api()
    with pytest.raises(OverrideNotAllowed, match=ALLOWED_OVERRIDES_ENV):
        TrainParams(config="tiny", overrides=overrides).load()


@pytest.mark.parametrize("field,value", [("curated_root", "/tmp/other-store"), ("dask_address", "tcp://evil:8786")])
def test_a_deployment_run_refuses_guarded_run_parameters(monkeypatch, field, value):
    monkeypatch.setenv(DEPLOYMENT_ENV, "0b1f5bd6-0000-0000-0000-000000000000")
    with pytest.raises(OverrideNotAllowed, match=field):
        NightlyParams(config="tiny", **{field: value}).load()


def test_a_deployment_run_refuses_a_config_path(monkeypatch, tmp_path):
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("tracking: {tracking_uri: 'http://evil.example:5000'}\n")
    monkeypatch.setenv(DEPLOYMENT_ENV, "0b1f5bd6-0000-0000-0000-000000000000")
    with pytest.raises(OverrideNotAllowed, match="config"):
        ConfigParams(config=str(yaml)).load()


def test_ordinary_overrides_pass_and_the_allow_list_opens_guarded_ones(monkeypatch, tmp_path):
    monkeypatch.setenv(DEPLOYMENT_ENV, "0b1f5bd6-0000-0000-0000-000000000000")
    monkeypatch.delenv(ALLOWED_OVERRIDES_ENV, raising=False)
    cfg = TrainParams(config="tiny", overrides={"train.fcn32s.epochs": 2, "data.synth.wafers_per_lot": 2}).load()
    assert cfg.train.fcn32s.epochs == 2
    guarded = TrainParams(config="tiny", overrides={"home": str(tmp_path), "tracking.tracking_uri": "sqlite:///x.db"})
    monkeypatch.setenv(ALLOWED_OVERRIDES_ENV, "home")
    with pytest.raises(OverrideNotAllowed, match="tracking.tracking_uri") as info:
        guarded.load()
    assert "home" not in str(info.value).split("(")[0]  # only what is still refused is named
    monkeypatch.setenv(ALLOWED_OVERRIDES_ENV, "home, tracking")
    assert guarded.load().home == str(tmp_path)
    monkeypatch.setenv(ALLOWED_OVERRIDES_ENV, "*")
    assert NightlyParams(config="tiny", curated_root=str(tmp_path)).load().name == "tiny"


def test_a_sub_key_in_the_allow_list_does_not_open_its_section():
    params = TrainParams(config="tiny", overrides={"tracking": {"tracking_uri": "http://evil.example"}})
    with pytest.raises(OverrideNotAllowed):
        check_allowed(params, {"tracking.tracking_uri"})
    check_allowed(TrainParams(config="tiny", overrides={"tracking.tracking_uri": "x"}), {"tracking.tracking_uri"})


def test_in_process_calls_are_the_local_user_and_not_restricted(monkeypatch, tmp_path):
    monkeypatch.delenv(DEPLOYMENT_ENV, raising=False)
    monkeypatch.delenv(ALLOWED_OVERRIDES_ENV, raising=False)
    assert not started_through_api()
    cfg = NightlyParams(config="tiny", overrides={"home": str(tmp_path)}).load()
    assert cfg.home == str(tmp_path)


def test_allowed_overrides_parses_the_environment():
    assert allowed_overrides({ALLOWED_OVERRIDES_ENV: " home,, tracking.tracking_uri "}) == {
        "home", "tracking.tracking_uri"}
    assert allowed_overrides({}) == set()


def test_a_flow_called_in_process_is_not_a_deployment_run(prefect_harness, monkeypatch):
    """Inside a real (non-deployment) flow run the check asks the API and finds no deployment."""
    from prefect import flow

    monkeypatch.delenv(DEPLOYMENT_ENV, raising=False)

    @flow
    def probe() -> bool:
        return started_through_api()

    assert probe() is False
