"""The model registry: weights-only scorer models, the champion/challenger aliases, loading a model.

A registered model is an MLflow *logged model* whose artifact folder holds two files:

    MLmodel     YAML: flavor ``wafer_fcn: {format: wafer-fcn-scorer/1, bundle: scorer.pt}`` and
                metadata (architecture, class names, verdict rules, config name) for the UI
    scorer.pt   the scorer bundle (``fcn_core.scorer``): tensors and plain values only

and every load ends in ``fcn_core.scorer.load_scorer`` (``torch.load(weights_only=True)``): a
folder in MLflow's pickle format, a pickle with a ``__reduce__``, any other file is refused with
one line and its code never runs. Loading a champion from an SQLite store reads the alias with
one ``sqlite3`` query and the bundle from disk: MLflow is not even imported (cold start).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fcn_core.config import Config
from fcn_core.promotion import CHALLENGER, CHAMPION, ChampionState, Decision, decide
from fcn_core.scorer import BUNDLE_FORMAT, NotAScorerError, Scorer, load_scorer, save_scorer, scorer_from_checkpoint
from tracking.store import (RetryingClient, StoreMissingError, local_artifact_path, reader, require_store,
                            retry_locked, sqlite_db_path)

log = logging.getLogger(__name__)

__all__ = ["CHALLENGER", "CHAMPION", "ModelRefusedError", "NoChampionError", "RegistrationResult",
           "champion_history", "load_champion", "load_scorer_uri", "log_scorer_model", "register_model", "scorer_from_file"]

MODEL_NAME = "model"  # the logged model's name: runs:/<run_id>/model
BUNDLE_FILE = "scorer.pt"
FLAVOR = "wafer_fcn"
URI_FORMS = ("models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest, runs:/<run_id>/model, "
             "a model folder or a scorer .pt file")


class NoChampionError(LookupError):
    """The registry holds no model under the requested name/alias."""


class ModelRefusedError(ValueError):
    """Not a weights-only wafer-fcn model (or not there): refused, never unpickled."""


@dataclass(frozen=True)
class RegistrationResult:
    name: str
    version: str
    alias: str  # the alias the new version got: "champion" or "challenger"
    candidate_score: float
    champion_score: float | None  # previous champion re-scored on this run's test split
    previous_champion_version: str | None
    model_uri: str  # models:/<name>/<version>
    reason: str = ""
    override: bool = False  # an unloadable champion was replaced by tracking.replace_unloadable_champion

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


# -- files -> scorers (weights only) ----------------------------------------------------------------


def scorer_from_file(path: str | os.PathLike, *, device: str = "cpu") -> Scorer:
    """A scorer bundle, or a training checkpoint (weights-only as well: its config's verdict)."""
    try:
        return load_scorer(path, device=device)
    except NotAScorerError as refused:
        try:
            return scorer_from_checkpoint(path, device=device)
        except Exception:  # noqa: BLE001 - the bundle error says what was expected
            raise refused from None


def write_model_folder(scorer: Scorer, folder: str | os.PathLike, *, model_id: str = "", run_id: str = "") -> Path:
    """``MLmodel`` + ``scorer.pt`` in ``folder``: what a registered version holds."""
    folder = Path(folder)
    save_scorer(scorer, folder / BUNDLE_FILE)
    bundle_arch = scorer.to_bundle()["arch"]
    mlmodel = {
        "flavors": {FLAVOR: {"format": BUNDLE_FORMAT, "bundle": BUNDLE_FILE,
                             "loader": "fcn_core.scorer.load_scorer (torch.load weights_only=True)"}},
        "model_id": model_id, "run_id": run_id,
        "utc_time_created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "metadata": {"arch": bundle_arch, "class_names": scorer.class_names, "n_classes": scorer.n_classes,
                     "pad_multiple": scorer.pad_multiple, "pad_fixed": scorer.pad_fixed,
                     "config_name": scorer.cfg.name, "verdict": scorer.verdict.model_dump(mode="json"),
                     "verdict_rules": scorer.verdict.describe()},
    }
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel, sort_keys=False))
    return folder


def _scorer_from_folder(folder: Path, *, device: str, label: str) -> Scorer:
    try:
        spec = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelRefusedError(f"{label}: unreadable MLmodel file ({type(exc).__name__})") from None
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    flavor = flavors.get(FLAVOR) if isinstance(flavors, dict) else None
    if not isinstance(flavor, dict) or flavor.get("format") != BUNDLE_FORMAT:
        found = ", ".join(map(str, flavors)) if isinstance(flavors, dict) else "none"
        raise ModelRefusedError(f"{label}: not a weights-only wafer-fcn model (flavors: {found}); models in MLflow's "
                                "pickle format are refused: register the model again with this wafer-fcn")
    bundle = flavor.get("bundle", BUNDLE_FILE)
    if not isinstance(bundle, str) or Path(bundle).name != bundle:
        raise ModelRefusedError(f"{label}: MLmodel names bundle {bundle!r}, not a file name in the model folder")
    try:
        return load_scorer(folder / bundle, device=device)
    except (NotAScorerError, FileNotFoundError) as exc:
        raise ModelRefusedError(f"{label}: {exc}") from None


def _scorer_at(path: Path, *, device: str, label: str) -> Scorer:
    if path.is_dir():
        if not (path / "MLmodel").is_file():
            raise ModelRefusedError(f"{label}: a folder without an MLmodel file is not a model; expected {URI_FORMS}")
        return _scorer_from_folder(path, device=device, label=label)
    if path.is_file():
        try:
            return scorer_from_file(path, device=device)
        except NotAScorerError as exc:
            raise ModelRefusedError(f"{label}: {exc}") from None
    raise ModelRefusedError(f"{label}: no such file or folder; expected {URI_FORMS}")


def _scorer_from_location(location: str, *, tracking_uri: str, device: str, label: str) -> Scorer:
    """Artifacts at ``location`` (a local path/file URI, or a remote artifact URI, downloaded)."""
    path = local_artifact_path(location, tracking_uri)
    if path is not None:
        return _scorer_at(path, device=device, label=label)
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="wafer-fcn-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp, tracking_uri=tracking_uri)
        return _scorer_at(Path(local), device=device, label=label)


# -- resolving model URIs -----------------------------------------------------------------------


def _sqlite_lookup(db: Path, name: str, *, alias: str | None = None, version: str | None = None,
                   tracking_uri: str) -> tuple[str, str] | None:
    """(version, source) with one read-only query of an SQLite store; None when absent.

    Reads MLflow's own tables (``registered_model_aliases``, ``model_versions``); a schema this
    query does not know raises ``sqlite3.Error`` and the caller asks MLflow instead.
    """
    if alias is not None:
        sql = ("SELECT mv.version, mv.source FROM registered_model_aliases a JOIN model_versions mv "
               "ON mv.name = a.name AND mv.version = a.version WHERE a.name = ? AND a.alias = ?")
        args: tuple[Any, ...] = (name, alias)
    elif version == "latest":
        sql = ("SELECT version, source FROM model_versions WHERE name = ? AND current_stage != 'Deleted_Internal' "
               "ORDER BY version DESC LIMIT 1")
        args = (name,)
    else:
        sql = ("SELECT version, source FROM model_versions WHERE name = ? AND version = ? "
               "AND current_stage != 'Deleted_Internal'")
        args = (name, int(version))

    def query() -> tuple[str, str] | None:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=2)
        try:
            row = conn.execute(sql, args).fetchone()
        finally:
            conn.close()
        return None if row is None else (str(row[0]), str(row[1]))

    return retry_locked(query, tracking_uri=tracking_uri, what=f"read models:/{name}")


def _client_lookup(client: RetryingClient, name: str, *, alias: str | None = None,
                   version: str | None = None) -> tuple[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                return None
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return str(mv.version), mv.source


def _version_lookup(tracking_uri: str, name: str, *, alias: str | None = None,
                    version: str | None = None) -> tuple[str, str] | None:
    db = sqlite_db_path(tracking_uri)
    require_store(tracking_uri)
    if db is not None:
        try:
            return _sqlite_lookup(db, name, alias=alias, version=version, tracking_uri=tracking_uri)
        except sqlite3.Error as exc:  # an MLflow schema this query does not know: ask MLflow
            log.debug("direct registry read failed (%s): using the MLflow client", exc)
    return _client_lookup(reader(tracking_uri), name, alias=alias, version=version)


def _no_model(name: str, alias: str, uri: str) -> NoChampionError:
    return NoChampionError(f"no model registered as {name}@{alias} in {uri}: run "
                           "`prefect deployment run train-fcn/train-fcn` or `make demo` first")


def _resolve_run_path(client: RetryingClient, run_id: str, path: str) -> str:
    """Artifact location of ``runs:/<run_id>/<path>``: the run's logged model of that name, else its artifacts."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelRefusedError(f"runs:/{run_id}/{path}: no such run in {client.tracking_uri}") from None
    head, _, rest = path.partition("/")
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{head}'")
    matched = next((m for m in models if m.source_run_id == run_id), None)
    if matched is not None:
        return matched.artifact_location.rstrip("/") + (f"/{rest}" if rest else "")
    return f"{run.info.artifact_uri.rstrip('/')}/{path}"


def load_scorer_uri(uri: str, *, tracking_uri: str, device: str = "cpu") -> tuple[Scorer, str, str]:
    """Load the scorer of ``--model URI``: returns (scorer, name, version).

    ``models:/name@alias``, ``models:/name/3`` and ``models:/name/latest`` give the registered
    name and version; ``runs:/<run_id>/<path>`` gives (uri, run_id); ``models:/<model_id>`` gives
    (uri, model_id); a local model folder or scorer ``.pt`` gives (path, "local"). Anything else,
    and anything that is not a weights-only wafer-fcn model, raises :class:`ModelRefusedError`.
    """
    if uri.startswith("models:/"):
        ref = uri[len("models:/"):].strip("/")
        if ref.startswith("m-") and "/" not in ref and "@" not in ref:  # a logged model id
            from mlflow.exceptions import MlflowException

            try:
                location = reader(tracking_uri).get_logged_model(ref).artifact_location
            except MlflowException:
                raise ModelRefusedError(f"--model {uri!r}: no logged model {ref} in {tracking_uri}") from None
            return _scorer_from_location(location, tracking_uri=tracking_uri, device=device, label=uri), uri, ref
        if "@" in ref:
            name, alias = ref.rsplit("@", 1)
            found = _version_lookup(tracking_uri, name, alias=alias)
            if found is None:
                raise _no_model(name, alias, tracking_uri)
        elif "/" in ref:
            name, version = ref.rsplit("/", 1)
            if version != "latest" and not version.isdigit():
                raise ModelRefusedError(f"--model {uri!r}: a version is a number or 'latest'; expected {URI_FORMS}")
            found = _version_lookup(tracking_uri, name, version=version)
            if found is None:
                if version == "latest":
                    raise _no_model(name, "latest", tracking_uri)
                raise LookupError(f"no version {version} of registered model {name!r} in {tracking_uri}")
        else:
            raise ModelRefusedError(f"--model {uri!r}: expected {URI_FORMS}")
        version, source = found
        scorer = _scorer_from_location(source, tracking_uri=tracking_uri, device=device,
                                       label=f"models:/{name}/{version}")
        return scorer, name, version
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        if not run_id or not path:
            raise ModelRefusedError(f"--model {uri!r}: expected runs:/<run_id>/<path>")
        location = _resolve_run_path(reader(tracking_uri), run_id, path)
        return _scorer_from_location(location, tracking_uri=tracking_uri, device=device, label=uri), uri, run_id
    if "://" in uri and not uri.startswith("file://"):
        raise ModelRefusedError(f"--model {uri!r}: expected {URI_FORMS}")
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
    return _scorer_at(path, device=device, label=f"--model {uri}"), str(path), "local"


def load_champion(cfg: Config, *, alias: str = CHAMPION, device: str = "cpu") -> tuple[Scorer, str, str]:
    """(scorer, registered name, version) of ``<registered_model>@<alias>`` in cfg's store."""
    name = cfg.tracking.registered_model
    try:
        return load_scorer_uri(f"models:/{name}@{alias}", tracking_uri=cfg.tracking_uri, device=device)
    except StoreMissingError as exc:
        raise NoChampionError(f"no model registered as {name}@{alias}: {exc}") from None


# -- logging and registering --------------------------------------------------------------------


def log_scorer_model(client: RetryingClient, run_id: str, scorer: Scorer):
    """Log ``scorer`` as the run's logged model ``model`` (MLmodel + scorer.pt); returns the LoggedModel."""
    experiment = client.get_run(run_id).info.experiment_id
    arch = scorer.to_bundle()["arch"]
    logged = client.create_logged_model(
        experiment, name=MODEL_NAME, source_run_id=run_id, model_type="wafer-fcn-scorer",
        tags={"wafer_fcn.format": BUNDLE_FORMAT, "config_name": scorer.cfg.name},
        params={"arch": json.dumps(arch), "class_names": json.dumps(scorer.class_names),
                "verdict_rules": scorer.verdict.describe()})
    try:
        with tempfile.TemporaryDirectory(prefix="wafer-fcn-model-") as tmp:
            write_model_folder(scorer, tmp, model_id=logged.model_id, run_id=run_id)
            client.log_model_artifacts(logged.model_id, tmp)
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    from mlflow.entities import LoggedModelOutput

    ready = client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, 0)])  # the run page's "Logged models"
    return ready


REGISTERED_MODEL_SUMMARY = "wafer-fcn per-die defect-pattern segmentation (FCN); see docs/mlflow.md"
CHAMPION_HISTORY_TAG = "champion_history"  # registered-model tag: JSON list, oldest first
HISTORY_KEPT = 40  # entries kept in the tag (MLflow tag values are limited to a few thousand characters)


def _ensure_registered_model(client: RetryingClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=REGISTERED_MODEL_SUMMARY)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def champion_history(client: RetryingClient, name: str) -> list[dict[str, Any]]:
    """Who held ``champion``, oldest first: ``[{"version", "since", "score", "reason"}, ...]``."""
    raw = client.get_registered_model(name).tags.get(CHAMPION_HISTORY_TAG)
    try:
        history = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        log.warning("registered model %s: unreadable %s tag, starting it again", name, CHAMPION_HISTORY_TAG)
        return []
    return history if isinstance(history, list) else []


def _history_markdown(history: list[dict[str, Any]]) -> str:
    lines = ["| since (UTC) | champion | test mean IU (fail dies) | why |", "| --- | --- | ---: | --- |"]
    for entry in reversed(history[-20:]):  # newest first
        score = entry.get("score")
        lines.append(f"| {entry.get('since', '')} | v{entry.get('version')} | "
                     f"{'' if score is None else f'{score:.4f}'} | {str(entry.get('reason', '')).replace('|', '/')} |")
    return "\n".join(lines)


def _record_champion(client: RetryingClient, name: str, version: str, *, score: float, reason: str,
                     previous: str | None) -> str:
    """Append the new champion to the alias history (registered-model tag and description) and mark
    both versions: ``champion_since`` on the new one, ``champion_until``/``replaced_by_version`` on the
    one it replaces. Returns the timestamp. Concurrent registrations: the later write wins."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    history = [*champion_history(client, name), {"version": version, "since": since, "score": round(score, 6),
                                                 "reason": reason[:200]}][-HISTORY_KEPT:]
    client.set_registered_model_tag(name, CHAMPION_HISTORY_TAG, json.dumps(history, separators=(",", ":")))
    client.set_registered_model_tag(name, "champion_version", version)
    client.update_registered_model(name, description=f"{REGISTERED_MODEL_SUMMARY}\n\n"
                                                     f"## Alias history: who held `champion`\n\n"
                                                     f"{_history_markdown(history)}\n")
    client.set_model_version_tag(name, version, "champion_since", since)
    if previous and previous != version:
        client.set_model_version_tag(name, previous, "champion_until", since)
        client.set_model_version_tag(name, previous, "replaced_by_version", version)
    return since


def _link_logged_model(client: RetryingClient, model_id: str, name: str, version: str) -> None:
    """Add this version to the logged model's ``mlflow.modelVersions`` tag (the UI's "Registered" /
    "Model versions" on the logged model page), keeping versions already there."""
    entry = {"name": name, "version": str(version)}
    raw = client.get_logged_model(model_id).tags.get("mlflow.modelVersions")
    try:
        linked = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        linked = []
    linked = [e for e in linked if isinstance(e, dict) and e != entry] + [entry]
    client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(linked)})


def describe_architecture(arch: dict[str, Any]) -> str:
    """'fcn8s, preset compact, geometry ..., batch norm, 5 classes' from a scorer bundle's ``arch``."""
    parts = [str(arch.get("name", "?"))]
    if arch.get("preset"):
        parts.append(f"preset {arch['preset']}")
    if arch.get("geometry"):
        parts.append(f"geometry {arch['geometry']}")
    if arch.get("batch_norm"):
        parts.append("batch norm")
    parts.append(f"{arch.get('n_classes', '?')} classes")
    return ", ".join(parts)


def version_description(*, stage: str, arch: dict[str, Any], candidate_score: float, fingerprint: str | None,
                        config_name: str, verdict_rules: str, calibrated_on: str | None, decision: Decision,
                        champion: ChampionState) -> str:
    """The version's Markdown description: what it is, how good, on which data, why (not) promoted."""
    from fcn_core.stages import stage_title

    if decision.promoted:
        why = f"**Promoted to `champion`**: {decision.reason}."
    else:
        why = f"**Not promoted** (alias `challenger`; v{champion.version} stays `champion`): {decision.reason}."
    return "\n".join([
        f"**{stage_title(stage)}** (stage `{stage}`, config `{config_name}`)",
        "",
        f"- Architecture: {describe_architecture(arch)}",
        f"- Score: test mean IU on fail dies **{candidate_score:.4f}**"
        + (f" (champion v{champion.version} re-scored on the same test split: {champion.score:.4f})"
           if champion.score is not None else ""),
        f"- Data fingerprint: `{fingerprint or 'unknown'}`",
        f"- Verdict rules: {verdict_rules} ({'calibrated on ' + calibrated_on if calibrated_on else 'from the config'})",
        f"- Weights only: `{BUNDLE_FORMAT}` (MLmodel + scorer.pt, loads with torch.load(weights_only=True))",
        "",
        why,
    ])


def _champion_state(client: RetryingClient, cfg: Config, rescore: Callable[[Scorer], float]) -> ChampionState:
    """The current champion re-scored by ``rescore``, or why it could not be loaded."""
    name = cfg.tracking.registered_model
    found = _client_lookup(client, name, alias=CHAMPION)
    if found is None:
        return ChampionState.absent()
    version, source = found
    try:
        champion = _scorer_from_location(source, tracking_uri=client.tracking_uri, device="cpu",
                                         label=f"models:/{name}/{version}")
    except Exception as exc:  # noqa: BLE001 - whatever the reason, decide() keeps it unless overridden
        log.warning("champion %s v%s does not load: %s", name, version, exc)
        return ChampionState.unloadable(version, f"{type(exc).__name__}: {exc}"[:400])
    return ChampionState.scored(version, float(rescore(champion)))


def register_model(
    cfg: Config,
    *,
    client: RetryingClient,
    run_id: str,
    scorer_path: str | os.PathLike,
    candidate_score: float,
    rescore: Callable[[Scorer], float],
    stage: str | None = None,
) -> RegistrationResult:
    """Log the scorer at ``scorer_path`` on ``run_id``, register it, apply :func:`fcn_core.promotion.decide`.

    The champion is re-scored by ``rescore`` (on this run's test split) before anything is
    registered, so a failing re-score leaves no stray version. The decision, both scores and
    any override are logged on the run (tags + metrics) and on the new version (tags: filled or
    absent, never blank), whose Markdown description says stage (``stage``, default the
    architecture's name), architecture, score, data fingerprint, verdict rules and why it was or
    was not promoted. A promotion is added to the alias history (:func:`champion_history`).
    """
    if not math.isfinite(candidate_score):
        raise ValueError(f"candidate_score must be a finite number, got {candidate_score}")
    name = cfg.tracking.registered_model
    scorer = scorer_from_file(scorer_path)
    arch = scorer.to_bundle()["arch"]
    stage = stage or str(arch.get("name", "unknown"))
    champion = _champion_state(client, cfg, rescore)
    decision: Decision = decide(champion, candidate_score,
                                replace_unloadable=cfg.tracking.replace_unloadable_champion)

    logged = log_scorer_model(client, run_id, scorer)
    _ensure_registered_model(client, name)
    run_tags = client.get_run(run_id).data.tags
    provenance = {k: v for k, v in run_tags.items() if k in ("git_commit", "data_fingerprint", "config_name") and v}
    optional = {
        "champion_score": None if champion.score is None else f"{champion.score:.6f}",
        "previous_champion_version": champion.version,
        "override": "replace_unloadable_champion" if decision.override else None,
    }
    version_tags = {
        "stage": stage,
        "architecture": describe_architecture(arch),
        "candidate_score": f"{candidate_score:.6f}",
        **{k: v for k, v in optional.items() if v},
        "decision": decision.alias,
        "decision_reason": decision.reason[:500],
        "score_metric": "test mean IU (fail dies)",
        "model_format": BUNDLE_FORMAT,
        "model_id": logged.model_id,
        "verdict_rules": scorer.verdict.describe(),
        "verdict_calibrated_on": scorer.verdict.calibrated_on or "config",
        **provenance,
    }
    from tracking.runs import run_url

    description = version_description(
        stage=stage, arch=arch, candidate_score=float(candidate_score), fingerprint=provenance.get("data_fingerprint"),
        config_name=provenance.get("config_name", scorer.cfg.name), verdict_rules=scorer.verdict.describe(),
        calibrated_on=scorer.verdict.calibrated_on, decision=decision, champion=champion)
    # source: the artifact folder itself (a models:/<id> source makes MLflow resolve it through
    # its process-wide tracking URI); the logged model is linked by model_id and its tag below
    mv = client.create_model_version(
        name, source=logged.artifact_location, run_id=run_id, tags=version_tags, model_id=logged.model_id,
        run_link=run_url(cfg, run_id), description=description)
    version = str(mv.version)
    _link_logged_model(client, logged.model_id, name, version)
    client.set_registered_model_alias(name, decision.alias, version)
    if decision.promoted:
        _record_champion(client, name, version, score=float(candidate_score), reason=decision.reason,
                         previous=champion.version)

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metrics = [Metric("registry/candidate_score", float(candidate_score), now, 0)]
    if champion.score is not None:
        metrics.append(Metric("registry/champion_score", champion.score, now, 0))
    tags = [RunTag("registry.model", name), RunTag("registry.version", version),
            RunTag("registry.decision", decision.alias), RunTag("registry.reason", decision.reason[:5000]),
            RunTag("registry.stage", stage)]
    if champion.version:
        tags.append(RunTag("registry.previous_champion_version", champion.version))
    if decision.override:
        tags.append(RunTag("registry.override", "replace_unloadable_champion"))
    # the run page's description: what this training registered and why it (did not) take champion
    tags.append(RunTag("mlflow.note.content", f"Registered as **{name} v{version}**.\n\n{description}"))
    client.log_batch(run_id, metrics=metrics, tags=tags)
    return RegistrationResult(
        name=name, version=version, alias=decision.alias, candidate_score=float(candidate_score),
        champion_score=champion.score, previous_champion_version=champion.version,
        model_uri=f"models:/{name}/{version}", reason=decision.reason, override=decision.override)
