import os
import shutil
import subprocess
import sys
import zipfile
from typing import get_args

import pytest
import yaml
from pydantic import ValidationError

import fcn_core.settings as settings_module
from fcn_core.config import REPO_ROOT, Config, TrainConfig, config_from_dict, load_config
from fcn_core.settings import settings
from fcn_core.stages import FINETUNE, STAGES, stage_title


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
    train = tmp_path / "train.parquet"
    auto = {"train.finetune.enabled": "auto", "train.finetune.train_tables": [str(train)]}
    assert load_config("tiny", {**auto, "eval.real_data": None}).finetune_enabled is False
    assert load_config("tiny", {**auto, "eval.real_data": str(real)}).finetune_enabled is False  # no train table
    train.write_bytes(b"")
    assert load_config("tiny", {**auto, "eval.real_data": str(real)}).finetune_enabled is True
    assert load_config("tiny", {"train.finetune.enabled": True, "eval.real_data": None}).finetune_enabled is True
    assert load_config("tiny").finetune_enabled is False  # tiny leaves it off
    with pytest.raises(ValueError):
        load_config("tiny", {"train.finetune.enabled": "sometimes"})


# -- settings: the environment, read through fcn_core.settings -----------------------------------
def test_home_comes_from_the_environment_and_an_empty_variable_means_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("WAFER_FCN_HOME", str(tmp_path / "h"))
    assert Config().home_dir == (tmp_path / "h").resolve()
    assert Config(home=str(tmp_path / "cfg")).home_dir == (tmp_path / "cfg").resolve()  # the config wins
    monkeypatch.setenv("WAFER_FCN_HOME", "")
    monkeypatch.chdir(tmp_path)
    assert Config().home_dir == tmp_path.resolve() / "var"


def test_real_data_folder_setting_finds_the_real_maps(monkeypatch, tmp_path):
    monkeypatch.setattr(settings_module, "CHECKOUT_REAL_DATA", tmp_path / "no-checkout-data")
    monkeypatch.delenv("WAFER_FCN_REAL_DATA", raising=False)
    assert load_config("tiny").eval.real_data_path() is None  # no folder anywhere: skip the real maps
    folder = tmp_path / "real"
    folder.mkdir()
    monkeypatch.setenv("WAFER_FCN_REAL_DATA", str(folder))
    assert load_config("tiny").eval.real_data_path() is None  # the folder, but not the file
    (folder / "wm811k-val.parquet").write_bytes(b"")
    assert load_config("tiny").eval.real_data_path() == str(folder / "wm811k-val.parquet")
    assert load_config("tiny", {"train.finetune.enabled": "auto"}).finetune_enabled is False  # no -train tables
    for name in ("wm811k-train.parquet", "mixedwm38-train.parquet"):
        (folder / name).write_bytes(b"")
    assert load_config("tiny", {"train.finetune.enabled": "auto"}).finetune_enabled is True
    explicit = tmp_path / "other.parquet"
    assert load_config("tiny", {"eval.real_data": str(explicit)}).eval.real_data_path() == str(explicit)


def test_real_data_defaults_to_the_checkouts_shared_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("WAFER_FCN_REAL_DATA", raising=False)
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "wm811k-val.parquet").write_bytes(b"")
    monkeypatch.setattr(settings_module, "CHECKOUT_REAL_DATA", shared)
    assert settings().real_data_dir() == shared
    assert load_config("tiny").eval.real_data_path() == str(shared / "wm811k-val.parquet")


def test_settings_read_the_deployment_variables(monkeypatch):
    monkeypatch.setenv("WAFER_FCN_TIMEZONE", "Europe/Berlin")
    monkeypatch.setenv("WAFER_FCN_MLFLOW_UI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    s = settings()
    assert (s.timezone, s.mlflow_ui, s.mlflow_tracking_uri) == (
        "Europe/Berlin", "http://127.0.0.1:5000", "http://127.0.0.1:5001")
    monkeypatch.delenv("WAFER_FCN_TIMEZONE")
    assert settings().timezone == "UTC"
    monkeypatch.setenv("WAFER_FCN_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ValidationError, match="not an IANA time zone"):
        settings()


def test_importing_and_reading_settings_leaves_the_environment_alone(tmp_path):
    code = ("import os; before = dict(os.environ); import fcn_core.config as c, fcn_core.settings as s; "
            "s.settings(); c.load_config('tiny').tracking_uri; assert dict(os.environ) == before, 'changed'")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -- the shipped configs: package data, found from any working directory -------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "WAFER_FCN_HOME": ""}


def test_named_configs_load_from_another_working_directory(tmp_path):
    code = "from fcn_core.config import config_names, load_config; print(config_names(), load_config('tiny').name)"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["['default',", "'tiny']", "tiny"]


def test_a_path_like_name_is_not_looked_up_among_the_shipped_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="known: default, tiny"):
        load_config("../configs/tiny")


def test_the_wheel_ships_the_default_configs(tmp_path):
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for package in ("fcn_core", "tasks", "flows", "configs"):
        shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("wafer_fcn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"configs/__init__.py", "configs/default.yaml", "configs/tiny.yaml"} <= names
    # unpacked (a pure-Python install) and imported away from the checkout, it loads its default config
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import fcn_core.config as c; print(c.__file__); print(c.load_config().name)"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**_env(), "PYTHONPATH": str(site)},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    where, name = run.stdout.split()
    assert where.startswith(str(site)) and name == "default"


# -- the stage list, defined once ----------------------------------------------------------------
def test_every_stage_has_its_config_section_and_the_final_stage_choices_follow_the_list():
    cfg = Config()
    assert all(cfg.train.stage(s) is getattr(cfg.train, s) for s in (*STAGES, FINETUNE))
    assert get_args(TrainConfig.model_fields["final_stage"].annotation) == STAGES[2:]
    assert stage_title("fcn8s") == "FCN-8s" and stage_title("other") == "other"


def test_a_saved_config_with_a_retired_setting_still_loads():
    saved = load_config("tiny").to_dict()
    saved["train"]["finetune"]["holdout_fraction"] = 0.5  # what checkpoints before the real split carry
    assert config_from_dict(saved) == load_config("tiny")
    with pytest.raises(ValueError):
        load_config("tiny", {"train.finetune.holdout_fraction": 0.5})  # not a setting any more


@pytest.mark.parametrize("epochs, after, want", [(8, 0.5, 4), (7, 0.5, 3), (2, 0.5, 1), (1, 0.5, None),
                                                  (8, 0.1, None), (8, None, None), (3, 0.9, 2)])
def test_the_pseudo_mask_redraw_epoch_is_a_share_of_the_epochs_rounded_down(epochs, after, want):
    cfg = load_config("default", {"train.finetune.epochs": epochs, "train.finetune.pseudo_refresh_after": after})
    assert cfg.train.finetune.refresh_epoch == want  # None: never (no epoch before it, or none left after it)


def test_the_default_config_seeds_scratch_lines_and_redraws_the_masks_once():
    ft = load_config("default").train.finetune
    assert ft.weak_labels == "both" and ft.refresh_epoch == 4
    assert ft.pseudo_line_seed is not None and ft.pseudo_line_seed.class_name == "scratch"


def test_a_line_seed_must_name_a_pattern_class():
    for bad in ("scrach", "background"):
        with pytest.raises(ValidationError, match="pseudo_line_seed.class_name .* is not a pattern class"):
            load_config("default", {"train.finetune.pseudo_line_seed.class_name": bad})
    assert load_config("default", {"train.finetune.pseudo_line_seed": None}).train.finetune.pseudo_line_seed is None
    # off unless a config names its class, so a class list without scratch needs no setting
    own = Config.model_validate({"classes": [{"id": 0, "name": "background", "color": "k"},
                                             {"id": 1, "name": "blob", "color": "b"}]})
    assert own.train.finetune.pseudo_line_seed is None
    with pytest.raises(ValidationError):
        load_config("default", {"train.finetune.pseudo_refresh_after": 1.0})  # after every epoch: nothing left


def test_the_line_rescue_is_off_unless_a_config_turns_it_on_and_describe_says_so():
    from fcn_core.config import VerdictConfig

    assert VerdictConfig().line_rescue is None and load_config("tiny").verdict.line_rescue is None
    verdict = load_config("default").verdict
    assert verdict.line_rescue is not None and verdict.line_rescue.max_axis_distance == 1.5
    assert "keeps the dies within 1.5 of its axis" in verdict.describe()
    assert "axis" not in verdict.model_copy(update={"line_rescue": None}).describe()
