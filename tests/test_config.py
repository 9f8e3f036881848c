import pytest
import yaml
from pydantic import ValidationError

from fcn_core.config import Config, config_from_dict, load_config


def test_named_configs_load_and_overrides_apply():
    cfg = load_config("tiny", ["train.fcn8s.epochs=3", "model.geometry=classic"])
    assert cfg.train.fcn8s.epochs == 3
    assert cfg.model.geometry == "classic"
    assert cfg.class_names == ["background", "ring", "scratch", "local zone", "circle"]
    assert load_config("default").name == "default"


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochz": 3}}))
    with pytest.raises(ValidationError, match="epochz"):
        load_config(path)


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_config("no-such-config")


def test_class_ids_must_be_dense_with_background_first():
    with pytest.raises(ValidationError, match="0..N-1"):
        Config.model_validate({"classes": [{"id": 0, "name": "background", "color": "k"},
                                           {"id": 2, "name": "ring", "color": "b"}]})
    with pytest.raises(ValidationError, match="background"):
        Config.model_validate({"classes": [{"id": 0, "name": "ring", "color": "k"}]})


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ValidationError, match="sum to 1"):
        load_config("tiny", ["data.split.train=0.9"])


def test_round_trip_through_dict_and_flat_view():
    cfg = load_config("tiny")
    assert config_from_dict(cfg.to_dict()) == cfg
    flat = cfg.flat()
    assert flat["train.fcn32s.epochs"] == cfg.train.fcn32s.epochs
    assert flat["classes.1.name"] == "ring"


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config(home=str(tmp_path))
    assert cfg.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.tracking_uri.startswith("sqlite:////")  # absolute path: four slashes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking_uri == "http://127.0.0.1:5000"
    explicit = Config(home=str(tmp_path), tracking={"tracking_uri": "sqlite:////x.db"})
    assert explicit.tracking_uri == "sqlite:////x.db"


def test_finetune_auto_follows_the_presence_of_real_maps(tmp_path):
    real = tmp_path / "real.parquet"
    auto = {"train.finetune.enabled": "auto"}
    assert load_config("tiny", {**auto, "eval.real_data": None}).finetune_enabled is False
    assert load_config("tiny", {**auto, "eval.real_data": str(real)}).finetune_enabled is True
    assert load_config("tiny", {"train.finetune.enabled": True, "eval.real_data": None}).finetune_enabled is True
    assert load_config("tiny").finetune_enabled is False  # tiny leaves it off
    with pytest.raises(ValueError):
        load_config("tiny", {"train.finetune.enabled": "sometimes"})
