"""tasks.serving: the model to serve, loaded as a Scorer."""
import pytest

from fcn_core.config import load_config
from fcn_core.models import build_fcn
from fcn_core.scorer import Scorer, save_scorer
from tasks.serving import load_scorer_uri


def test_local_files_are_served_with_their_own_calibrated_rules(tmp_path):
    from fcn_core.checkpoint import model_state, save_checkpoint
    from fcn_core.config import VerdictConfig

    cfg = load_config("tiny", {"verdict.min_dies": 4, "tracking.tracking_uri": f"sqlite:///{tmp_path}/m.db"})
    model = build_fcn("fcn8s", n_classes=5)
    calibrated = VerdictConfig(min_dies=9, calibrated_on="real.parquet")
    bundle = save_scorer(Scorer(model, calibrated, cfg), tmp_path / "scorer.pt")
    scorer, name, version = load_scorer_uri(str(bundle), cfg=cfg)
    assert (scorer.verdict, name, version) == (calibrated, str(bundle), "local")
    ckpt = save_checkpoint(tmp_path / "best.pt", {"arch": dict(model.arch), "model": model_state(model),
                                                  "config": load_config("tiny").to_dict()})
    scorer, _, _ = load_scorer_uri(str(ckpt), cfg=cfg)
    assert scorer.verdict == cfg.verdict  # not calibrated: the config in force judges
    with pytest.raises(ValueError, match="expected models:/"):
        load_scorer_uri(str(tmp_path / "missing.pt"), cfg=cfg)
