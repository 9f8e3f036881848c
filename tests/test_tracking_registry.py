"""tracking/registry.py: weights-only scorer models, the promotion policy, loading every URI form."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fcn_core.config import Config, VerdictConfig
from fcn_core.models import build_fcn
from fcn_core.scorer import Scorer, save_scorer
from tracking import registry, runs, store

torch.set_num_threads(1)
N_CLASSES = 5
CALIBRATED = VerdictConfig(min_dies=4, min_share=0.1, min_dies_by_class={"scratch": 2}, calibrated_on="real.parquet")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield tmp_path_factory.mktemp("wafer-fcn-home")


def make_cfg(home: Path, **tracking_options) -> Config:
    return Config(home=str(home), tracking=tracking_options)


@pytest.fixture(scope="module")
def client(home):
    return store.open_store(make_cfg(home))


def write_scorer(path: Path, cfg: Config, *, seed: int, verdict: VerdictConfig | None = None) -> Path:
    torch.manual_seed(seed)
    model = build_fcn("fcn8s", n_classes=cfg.n_classes, preset="compact")
    return save_scorer(Scorer(model=model.eval(), verdict=verdict or cfg.verdict, cfg=cfg), path)


def register(client, cfg, path, candidate: float, champion_now: float = 0.0, seen: list | None = None):
    run_id = runs.start_parent_run(client, cfg, data_fingerprint="f" * 16)

    def rescore(scorer: Scorer) -> float:
        assert isinstance(scorer, Scorer)
        if seen is not None:
            seen.append(scorer)
        return champion_now

    return run_id, registry.register_model(cfg, client=client, run_id=run_id, scorer_path=path,
                                           candidate_score=candidate, rescore=rescore)


EVIL = "import pathlib; pathlib.Path({marker!r}).write_text('pwned')"


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (EVIL.format(marker=self.marker),))


# -- registering ----------------------------------------------------------------------------------


def test_registered_version_is_weights_only_with_readable_metadata(home, client, tmp_path):
    cfg = make_cfg(home, registered_model="fcn-fresh")
    path = write_scorer(tmp_path / "scorer.pt", cfg, seed=1, verdict=CALIBRATED)
    seen: list = []
    run_id, result = register(client, cfg, path, 0.7, seen=seen)
    assert seen == []  # nothing to re-score
    assert (result.version, result.alias, result.champion_score, result.previous_champion_version) == \
        ("1", "champion", None, None)
    assert result.promoted and result.model_uri == "models:/fcn-fresh/1"
    mv = client.get_model_version_by_alias("fcn-fresh", "champion")
    assert str(mv.version) == "1"
    folder = store.file_uri_path(mv.source)
    assert sorted(p.name for p in folder.iterdir()) == ["MLmodel", "scorer.pt"]
    spec = yaml.safe_load((folder / "MLmodel").read_text())
    assert spec["flavors"] == {"wafer_fcn": {"format": "wafer-fcn-scorer/1", "bundle": "scorer.pt",
                                             "loader": "fcn_core.scorer.load_scorer (torch.load weights_only=True)"}}
    meta = spec["metadata"]
    assert meta["class_names"] == cfg.class_names and meta["arch"]["name"] == "fcn8s"
    assert meta["verdict"]["calibrated_on"] == "real.parquet" and meta["verdict_rules"] == CALIBRATED.describe()
    torch.load(folder / "scorer.pt", weights_only=True)  # plain tensors and values only
    assert mv.tags["verdict_rules"] == CALIBRATED.describe() and mv.tags["verdict_calibrated_on"] == "real.parquet"
    assert CALIBRATED.describe() in mv.description
    logged = client.get_logged_model(mv.tags["model_id"])
    assert logged.source_run_id == run_id and logged.name == "model"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "fcn-fresh", "version": "1"}]
    runs.end_run(client, run_id)


def test_champion_loads_in_a_fresh_process_without_importing_mlflow(home, client, tmp_path):
    cfg = make_cfg(home, registered_model="fcn-cold")
    path = write_scorer(tmp_path / "scorer.pt", cfg, seed=2, verdict=CALIBRATED)
    register(client, cfg, path, 0.5)
    reference = registry.scorer_from_file(path).model(torch.ones(1, 3, 40, 56))
    torch.save(reference, tmp_path / "reference.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from fcn_core.config import Config
        from tracking.registry import load_champion
        cfg = Config(home={str(home)!r}, tracking={{"registered_model": "fcn-cold"}})
        scorer, name, version = load_champion(cfg)
        out = scorer.model(torch.ones(1, 3, 40, 56))
        torch.testing.assert_close(out, torch.load({str(tmp_path / "reference.pt")!r}))
        print(json.dumps({{"name": name, "version": version, "calibrated_on": scorer.verdict.calibrated_on,
                          "mlflow_imported": "mlflow" in sys.modules}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "name": "fcn-cold", "version": "1", "calibrated_on": "real.parquet", "mlflow_imported": False}


def test_alias_policy_worse_model_never_takes_champion(home, client, tmp_path):
    cfg = make_cfg(home, registered_model="fcn-policy")
    path = write_scorer(tmp_path / "scorer.pt", cfg, seed=3)
    seen: list = []
    _, first = register(client, cfg, path, 0.80, seen=seen)
    assert (first.version, first.alias) == ("1", "champion")

    run_id, worse = register(client, cfg, path, 0.60, champion_now=0.75, seen=seen)
    assert (worse.version, worse.alias, worse.previous_champion_version) == ("2", "challenger", "1")
    assert worse.champion_score == 0.75 and not worse.promoted
    assert str(client.get_model_version_by_alias("fcn-policy", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("fcn-policy", "challenger").version) == "2"
    run = client.get_run(run_id)
    assert run.data.tags["registry.decision"] == "challenger" and run.data.tags["registry.version"] == "2"
    assert run.data.metrics["registry/candidate_score"] == 0.60
    assert run.data.metrics["registry/champion_score"] == 0.75
    tags = client.get_model_version("fcn-policy", "2").tags
    assert tags["decision"] == "challenger" and tags["champion_score"] == "0.750000"
    assert tags["candidate_score"] == "0.600000" and tags["previous_champion_version"] == "1"
    assert tags["data_fingerprint"] == "f" * 16

    _, equal = register(client, cfg, path, 0.75, champion_now=0.75, seen=seen)  # ties go to the newer model
    assert (equal.version, equal.alias, equal.previous_champion_version) == ("3", "champion", "1")
    assert str(client.get_model_version_by_alias("fcn-policy", "champion").version) == "3"
    assert len(seen) == 2
    assert client.get_model_version("fcn-policy", "3").tags["decision"] == "champion"


def test_versions_say_what_they_are_link_their_model_and_keep_the_alias_history(home, client, tmp_path):
    cfg = make_cfg(home, registered_model="fcn-story")
    path = write_scorer(tmp_path / "scorer.pt", cfg, seed=6, verdict=CALIBRATED)
    run1, first = register(client, cfg, path, 0.70)
    run2, worse = register(client, cfg, path, 0.60, champion_now=0.71)
    run3 = runs.start_parent_run(client, cfg, data_fingerprint="a" * 16)
    better = registry.register_model(cfg, client=client, run_id=run3, scorer_path=path, candidate_score=0.8,
                                     rescore=lambda s: 0.7, stage="finetune")
    assert (first.alias, worse.alias, better.alias) == ("champion", "challenger", "champion")

    versions = {str(v.version): v for v in client.search_model_versions("name = 'fcn-story'")}
    for number, v in versions.items():
        assert all(value.strip() for value in v.tags.values()), (number, v.tags)  # filled or absent
        # MLflow 3.17's SQL registry keeps no model_id column (v.model_id is None): the version names
        # its logged model in the tag model_id, and the logged model lists the version (the UI reads that)
        logged = client.get_logged_model(v.tags["model_id"])
        assert logged.source_run_id == v.run_id
        assert {"name": "fcn-story", "version": number} in json.loads(logged.tags["mlflow.modelVersions"])
    v1, v2, v3 = versions["1"], versions["2"], versions["3"]
    assert "champion_score" not in v1.tags and "previous_champion_version" not in v1.tags
    assert "override" not in v1.tags and v1.tags["stage"] == "fcn8s"
    assert v1.tags["architecture"] == "fcn8s, preset compact, geometry aligned, 5 classes"
    for text in ("**FCN-8s** (stage `fcn8s`", "fcn8s, preset compact", "test mean IU on fail dies **0.7000**",
                 "`ffffffffffffffff`", CALIBRATED.describe(), "**Promoted to `champion`**: first registered version"):
        assert text in v1.description, text
    assert "**Not promoted** (alias `challenger`; v1 stays `champion`)" in v2.description
    assert "champion v1 re-scored on the same test split: 0.7100" in v2.description
    assert v3.tags["stage"] == "finetune" and "**fine-tuned on real maps** (stage `finetune`" in v3.description
    assert "`aaaaaaaaaaaaaaaa`" in v3.description

    # alias history: who held champion, since when, who replaced whom
    history = registry.champion_history(client, "fcn-story")
    assert [(h["version"], h["score"]) for h in history] == [("1", 0.7), ("3", 0.8)]
    assert v3.tags["champion_since"] == history[1]["since"]
    assert v1.tags["champion_until"] == history[1]["since"] and v1.tags["replaced_by_version"] == "3"
    assert "champion_since" not in v2.tags
    model = client.get_registered_model("fcn-story")
    assert model.tags["champion_version"] == "3"
    table = model.description.split("## Alias history")[1]
    assert table.index("| v3 |") < table.index("| v1 |")  # newest first
    run = client.get_run(run1)  # the run page lists its logged model and says what it registered
    assert [o.model_id for o in run.outputs.model_outputs] == [v1.tags["model_id"]]
    assert run.data.tags["mlflow.note.content"].startswith("Registered as **fcn-story v1**.")
    assert "**Promoted to `champion`**" in run.data.tags["mlflow.note.content"]
    run_tags = run.data.tags
    assert "registry.previous_champion_version" not in run_tags and run_tags["registry.stage"] == "fcn8s"
    assert client.get_run(run2).data.tags["registry.previous_champion_version"] == "1"
    for run_id in (run1, run2, run3):
        runs.end_run(client, run_id)


def test_unloadable_champion_keeps_champion_unless_overridden(home, client, tmp_path):
    cfg = make_cfg(home, registered_model="fcn-hidden")
    path = write_scorer(tmp_path / "scorer.pt", cfg, seed=4)
    register(client, cfg, path, 0.68)
    folder = store.file_uri_path(client.get_model_version("fcn-hidden", "1").source)
    folder.rename(folder.with_name("hidden"))  # the artifact store is briefly unreachable
    run_id, worse = register(client, cfg, path, 0.46, champion_now=1.0)
    assert (worse.alias, worse.champion_score, worse.override) == ("challenger", None, False)
    assert "does not load" in worse.reason and "stays champion" in worse.reason
    assert str(client.get_model_version_by_alias("fcn-hidden", "champion").version) == "1"
    assert "registry.override" not in client.get_run(run_id).data.tags  # absent, never blank
    assert "override" not in client.get_model_version("fcn-hidden", "2").tags
    folder.with_name("hidden").rename(folder)  # back: v1 still serves
    assert registry.load_champion(cfg)[2] == "1"

    folder.rename(folder.with_name("hidden"))
    override = make_cfg(home, registered_model="fcn-hidden", replace_unloadable_champion=True)
    run_id, forced = register(client, override, path, 0.46)
    assert (forced.version, forced.alias, forced.override) == ("3", "champion", True)
    assert str(client.get_model_version_by_alias("fcn-hidden", "champion").version) == "3"
    assert client.get_run(run_id).data.tags["registry.override"] == "replace_unloadable_champion"
    version = client.get_model_version("fcn-hidden", "3")
    assert version.tags["override"] == "replace_unloadable_champion" and "override" in version.tags["decision_reason"]


def test_register_rejects_nan_score(home, client, tmp_path):
    with pytest.raises(ValueError, match="finite"):
        registry.register_model(make_cfg(home), client=client, run_id="unused", scorer_path=tmp_path / "x.pt",
                                candidate_score=float("nan"), rescore=lambda s: 0.0)


def test_load_champion_without_registered_model_says_what_to_do(home, client):
    cfg = make_cfg(home, registered_model="never-trained")
    with pytest.raises(registry.NoChampionError) as err:
        registry.load_champion(cfg)
    message = str(err.value)
    assert "never-trained@champion" in message and cfg.tracking_uri in message
    assert "prefect deployment run train-fcn/train-fcn" in message and "make demo" in message


def test_missing_store_is_not_created_by_loading(tmp_path):
    cfg = Config(home=str(tmp_path / "fresh"))
    with pytest.raises(registry.NoChampionError, match="train a model first"):
        registry.load_champion(cfg)
    with pytest.raises(store.StoreMissingError):
        registry.load_scorer_uri("models:/wafer-fcn/1", tracking_uri=cfg.tracking_uri)
    assert not (tmp_path / "fresh").exists()


def test_locked_store_is_retried_then_one_line(home, client, tmp_path, monkeypatch):
    cfg = make_cfg(home, registered_model="fcn-locked")
    register(client, cfg, write_scorer(tmp_path / "s.pt", cfg, seed=5), 0.5)
    monkeypatch.setattr(store, "LOCK_RETRY_DELAYS", (0.05, 0.1))
    holder = sqlite3.connect(home / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(store.StoreLockedError) as err:
            registry.load_champion(cfg)
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert "\n" not in str(err.value) and "locked by another process" in str(err.value)
    assert registry.load_champion(cfg)[2] == "1"


# -- every URI form, and refusals ----------------------------------------------------------------


def test_load_scorer_uri_forms(home, client, tmp_path):
    cfg = make_cfg(home, registered_model="fcn-uris")
    path = write_scorer(tmp_path / "scorer.pt", cfg, seed=6)
    run_id, _ = register(client, cfg, path, 0.5)
    x = torch.zeros(1, 3, 32, 32)
    expected = registry.load_champion(cfg)[0].model(x)
    uri = cfg.tracking_uri
    folder = store.file_uri_path(client.get_model_version("fcn-uris", "1").source)
    from fcn_core.checkpoint import model_state, save_checkpoint

    scorer = registry.scorer_from_file(path)
    ckpt = save_checkpoint(tmp_path / "best.pt", {"arch": scorer.model.arch, "model": model_state(scorer.model),
                                                  "config": cfg.to_dict()})
    for model_uri, name, version in [
        ("models:/fcn-uris@champion", "fcn-uris", "1"),
        ("models:/fcn-uris/1", "fcn-uris", "1"),
        ("models:/fcn-uris/latest", "fcn-uris", "1"),
        (f"runs:/{run_id}/model", f"runs:/{run_id}/model", run_id),
        (str(folder), str(folder), "local"),
        (folder.as_uri(), str(folder), "local"),
        (str(path), str(path), "local"),
        (str(ckpt), str(ckpt), "local"),  # a training checkpoint is weights-only too
    ]:
        got, got_name, got_version = registry.load_scorer_uri(model_uri, tracking_uri=uri)
        assert (got_name, got_version) == (name, version), model_uri
        torch.testing.assert_close(got.model(x), expected)
    with pytest.raises(LookupError, match="no version 7"):
        registry.load_scorer_uri("models:/fcn-uris/7", tracking_uri=uri)
    with pytest.raises(registry.NoChampionError, match="fcn-uris@staging"):
        registry.load_scorer_uri("models:/fcn-uris@staging", tracking_uri=uri)


@pytest.mark.parametrize("bad", ["/etc/passwd", "nothing-here", "s3://bucket/model", "models:/fcn-uris/two",
                                 "runs:/", "runs:/0123456789abcdef/model", "models:/m-0123456789abcdef",
                                 "folder-without-mlmodel"])
def test_anything_else_is_refused_with_one_line(home, client, tmp_path, bad):
    (tmp_path / "folder-without-mlmodel").mkdir()
    target = str(tmp_path / bad) if bad in ("nothing-here", "folder-without-mlmodel") else bad
    with pytest.raises((registry.ModelRefusedError, LookupError)) as err:
        registry.load_scorer_uri(target, tracking_uri=make_cfg(home).tracking_uri)
    message = str(err.value)
    assert "\n" not in message and "index out of range" not in message
    assert target in message or "models:/" in message or "runs:/" in message


def test_malicious_pickles_are_refused_and_never_run(home, tmp_path):
    marker = tmp_path / "pwned"
    uri = make_cfg(home).tracking_uri
    # an MLflow pytorch pickle folder: MLmodel + data/model.pth whose __reduce__ runs code
    pickled = tmp_path / "pytorch-model"
    (pickled / "data").mkdir(parents=True)
    (pickled / "MLmodel").write_text(yaml.safe_dump({"flavors": {"pytorch": {"model_data": "data",
                                                                             "pytorch_version": "2.4"}}}))
    torch.save(Evil(str(marker)), pickled / "data" / "model.pth")
    with open(pickled / "data" / "pickle_module_info.txt", "w") as f:
        f.write("mlflow.pytorch.pickle_module")
    # a plain pickle .pt, and a folder claiming our flavor whose bundle is a pickle
    evil_pt = tmp_path / "evil.pt"
    evil_pt.write_bytes(pickle.dumps(Evil(str(marker))))
    posing = tmp_path / "posing"
    posing.mkdir()
    (posing / "MLmodel").write_text(yaml.safe_dump({"flavors": {"wafer_fcn": {"format": "wafer-fcn-scorer/1",
                                                                              "bundle": "scorer.pt"}}}))
    torch.save({"format": "wafer-fcn-scorer/1", "state_dict": Evil(str(marker))}, posing / "scorer.pt")
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / "MLmodel").write_text(yaml.safe_dump({"flavors": {"wafer_fcn": {"format": "wafer-fcn-scorer/1",
                                                                                "bundle": "../evil.pt"}}}))
    for bad, expected in [(pickled, "not a weights-only wafer-fcn model"), (evil_pt, "not a weights-only"),
                          (posing, "not a weights-only"), (escaping, "not a file name")]:
        with pytest.raises(registry.ModelRefusedError, match=expected) as err:
            registry.load_scorer_uri(str(bad), tracking_uri=uri)
        assert "\n" not in str(err.value)
    assert not marker.exists()


# -- a moved home --------------------------------------------------------------------------------


def test_a_moved_home_keeps_serving_and_registering(tmp_path):
    old = tmp_path / "old-home"
    cfg = make_cfg(old, registered_model="fcn-moved")
    client = store.open_store(cfg)
    register(client, cfg, write_scorer(tmp_path / "s.pt", cfg, seed=7), 0.5)
    new = tmp_path / "new-home"
    shutil.move(old, new)
    moved = make_cfg(new, registered_model="fcn-moved")
    scorer, _, version = registry.load_champion(moved)  # read in place: nothing rewritten yet
    assert version == "1" and not old.exists()
    moved_client = store.open_store(moved)  # writing: the recorded locations are rebased
    assert moved_client.get_experiment_by_name("wafer-fcn").artifact_location == (new / "mlartifacts").as_uri()
    assert store.file_uri_path(moved_client.get_model_version("fcn-moved", "1").source).is_relative_to(new)
    run_id, second = register(moved_client, moved, write_scorer(tmp_path / "s2.pt", moved, seed=8), 0.9)
    assert second.version == "2" and not old.exists()
    assert store.file_uri_path(moved_client.get_run(run_id).info.artifact_uri).is_relative_to(new)
    assert registry.load_scorer_uri(f"runs:/{run_id}/model", tracking_uri=moved.tracking_uri)[0] is not None
    assert registry.load_champion(moved)[2] == "2"
