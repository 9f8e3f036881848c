"""Flow parameters: what a run request may hold, and the config it loads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.params import ConfigParams, NightlyParams, TrainParams, as_dict


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
