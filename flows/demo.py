"""Flow ``demo``: the whole product on embedded defaults, as one flow in the Prefect UI.

    train-fcn (subflow) -> synthesise tonight's drop -> nightly-inference on it (subflow) -> render the night

1. train-fcn: synthesise wafers, ingest, train FCN-32s -> 16s -> 8s (-> 1s), fine-tune on real
   maps, evaluate, register (``flows.train_fcn``).
2. A fresh synthetic night lands in <home>/drops/night-<today>.parquet and nightly-inference
   ingests and scores it (``flows.nightly_inference``).
3. A picture of that night's first wafers (die map | truth | prediction) in <home>/demo/.

Returns a :class:`DemoSummary`; ``wafer-fcn demo`` prints it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import flow, get_run_logger

from flows.names import demo_run_name, today
from flows.nightly_inference import NightlyResult, nightly_inference
from flows.params import DemoParams, NightlyParams, TrainParams
from flows.train_fcn import TrainingSummary, train_fcn
from tasks.data import synthesise_night
from tasks.pictures import NightPicture, render_night

__all__ = ["DemoParams", "DemoSummary", "demo"]


@dataclass(frozen=True)
class DemoSummary:
    """The training (results, registry decision), tonight's date and drop, its scoring, its picture."""

    training: TrainingSummary
    train_seconds: float
    night: str  # YYYY-MM-DD
    drop: str
    nightly: NightlyResult
    picture: NightPicture | None  # None when tonight's partition was not scored by this run


@flow(name="demo", flow_run_name=demo_run_name, log_prints=True)
def demo(params: DemoParams = DemoParams()) -> DemoSummary:
    """Train and register a model, then score a new synthetic night with it and draw that night."""
    log = get_run_logger()
    cfg = params.load()
    same_config = {"config": params.config, "overrides": params.overrides}
    t0 = time.perf_counter()
    training = train_fcn(TrainParams(**same_config))
    train_seconds = time.perf_counter() - t0

    night = today()
    drop = synthesise_night(cfg=cfg, date=night, n_wafers=params.night_wafers, drops_dir=str(cfg.home_dir / "drops"))
    scored = nightly_inference(NightlyParams(**same_config, source=drop))
    predictions = scored.outputs.get(night)
    picture = (render_night(cfg=cfg, drop=drop, predictions=predictions,
                            out=str(cfg.home_dir / "demo" / "night_predictions.png")) if predictions else None)
    if picture is None:
        log.warning("tonight's partition %s was not scored by this run: no picture", night)
    return DemoSummary(training=training, train_seconds=train_seconds, night=night, drop=drop, nightly=scored,
                       picture=picture)


if __name__ == "__main__":
    demo()
