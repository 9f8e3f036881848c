"""Flow parameters: what a run request may hold, the config it loads, and what a run started through
the Prefect API may not change (models, state) unless allowed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.params import (
    ALLOWED_OVERRIDES_ENV, ConfigParams, NightlyParams, OverrideNotAllowed, TrainParams, allowed_overrides, as_dict,
    check_allowed, started_through_api,
)


def test_load_applies_overrides_given_as_a_mapping_or_as_key_value_strings():
    as_mapping = ConfigParams(config="tiny", overrides={"train.fcn32s.epochs": 3, "model.geometry": "classic"})
    as_strings = ConfigParams(config="tiny", overrides=["train.fcn32s.epochs=3", "model.geometry=classic"])
    for params in (as_mapping, as_strings):
        cfg = params.load()
        assert (cfg.name, cfg.train.fcn32s.epochs, cfg.model.geometry) == ("tiny", 3, "classic")
    assert ConfigParams().load().name == "default"


def test_a_bad_config_or_override_fails_at_load_with_a_clear_message():
    with pytest.raises(FileNotFoundError, match="no-such-config.*known: default, tiny"):
        ConfigParams(config="no-such-config").load()
    with pytest.raises(ValidationError, match="epochz"):
        ConfigParams(config="tiny", overrides={"train.fcn32s.epochz": 1}).load()
    with pytest.raises(ValueError, match="must look like key.path=value"):
        ConfigParams(config="tiny", overrides=["train.fcn32s.epochs"]).load()


def test_unknown_parameters_and_out_of_range_values_are_refused():
    with pytest.raises(ValidationError, match="confg"):
        TrainParams(confg="tiny")
    with pytest.raises(ValidationError, match="max_quarantined_share"):
        TrainParams(max_quarantined_share=1.5)
    with pytest.raises(ValidationError, match="parallelism"):
        NightlyParams(parallelism=0)
    with pytest.raises(ValidationError, match="jump_factor"):
        NightlyParams(jump_factor=0.5)
    with pytest.raises(ValidationError, match="task_runner"):
        NightlyParams(task_runner="processes")


def test_nightly_dates_must_be_iso_days():
    assert NightlyParams(dates=["2026-01-31", "2026-02-01"]).dates == ["2026-01-31", "2026-02-01"]
    with pytest.raises(ValidationError, match="'2026-02-30' is not YYYY-MM-DD"):
        NightlyParams(dates=["2026-01-31", "2026-02-30"])


def test_parameters_survive_the_json_round_trip_of_a_deployment_run():
    params = NightlyParams(config="tiny", overrides=["train.seed=2"], dates=["2026-01-02"], task_runner="dask",
                           parallelism=3)
    data = as_dict(params)
    assert data["overrides"] == ["train.seed=2"] and data["task_runner"] == "dask"
    assert NightlyParams.model_validate(data) == params


def test_prefect_rejects_a_bad_run_request_before_the_flow_starts():
    from prefect.exceptions import ParameterTypeError

    from flows.train_fcn import train_fcn

    ok = train_fcn.validate_parameters({"params": {"config": "tiny", "overrides": {"train.seed": 1}}})
    assert ok["params"] == TrainParams(config="tiny", overrides={"train.seed": 1})
    with pytest.raises(ParameterTypeError, match="max_quarantined_share"):
        train_fcn.validate_parameters({"params": {"config": "tiny", "max_quarantined_share": 7}})

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
