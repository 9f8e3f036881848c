"""Loading the model to serve as a :class:`~fcn_core.scorer.Scorer` (``wafer-fcn predict``, nightly scoring).

No Prefect here, so ``wafer-fcn predict`` does not pay for importing it; MLflow is imported only
when a registry or run URI is loaded.
"""

from __future__ import annotations

from pathlib import Path

from fcn_core.config import Config, VerdictConfig
from fcn_core.scorer import NotAScorerError, Scorer, load_scorer, scorer_from_checkpoint


def load_scorer_uri(uri: str, *, cfg: Config, device: str = "cpu") -> tuple[Scorer, str, str]:
    """``--model URI`` (registry, run, checkpoint or scorer file) as (scorer, name, version).

    The scorer judges with the model's calibrated verdict rules when it has them, else with
    ``cfg.verdict``; padding and class names are ``cfg``'s.
    """
    # integration point: tracking.registry returns a Scorer
    from tasks import tracking

    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
    if path.is_file():
        try:
            served = load_scorer(path, device=device)
        except NotAScorerError:  # a training checkpoint
            served = scorer_from_checkpoint(path, device=device)
        model, own = served.model, served.verdict
        name, version = str(path), "local"
    else:
        model, name, version = tracking.load_model_uri(uri, tracking_uri=cfg.tracking_uri, device=device)
        root = f"models:/{name}/{version}" if uri.startswith("models:/") and name != uri else uri
        own = _logged_verdict(root, tracking_uri=cfg.tracking_uri)
    verdict = own if own is not None and own.calibrated_on else cfg.verdict
    return Scorer(model=model, verdict=verdict, cfg=cfg), name, version


def _logged_verdict(model_uri: str, *, tracking_uri: str) -> VerdictConfig | None:
    """The verdict rules in the config logged beside an MLflow model (None when it has none)."""
    import mlflow
    import yaml

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/extra_files/config.yaml",
                                                    tracking_uri=tracking_uri)
        return VerdictConfig.model_validate((yaml.safe_load(Path(local).read_text()) or {}).get("verdict", {}))
    except Exception:  # noqa: BLE001 - a model logged without its config is judged by the config in force
        return None
