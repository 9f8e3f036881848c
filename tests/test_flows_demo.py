"""The demo flow: train-fcn and nightly-inference as subflows, tonight's drop and its picture as tasks."""

import pyarrow.parquet as pq
import torch
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterParentFlowRunId)

from fcn_core.table import read_parquet
from flows.demo import DemoParams, demo, today


def test_demo_trains_registers_scores_tonight_and_draws_it(prefect_harness, tmp_path):
    torch.set_num_threads(1)
    home = tmp_path / "home"
    state = demo(DemoParams(config="tiny", overrides={"home": str(home), "data.synth.wafers_per_lot": 2},
                            night_wafers=12), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()

    reg = summary.training.registration
    assert (reg.version, reg.alias) == ("1", "champion")
    assert summary.training.evaluation.results_md.read_text() == summary.training.results_markdown
    # tonight's drop: new wafers captured today, ingested and scored by the champion just registered
    night = today()
    drop = read_parquet(summary.drop)
    assert drop.num_rows == 12 and all(w.startswith(f"night-{night}-") for w in drop.column("wafer_id").to_pylist())
    assert summary.nightly.model == "wafer-fcn/1" and night in summary.nightly.scored_partitions
    scored = pq.read_table(summary.nightly.outputs[night])
    assert set(drop.column("wafer_id").to_pylist()) <= set(scored.column("wafer_id").to_pylist())
    # the picture: the night's first wafers, and its patterns over every scored wafer of the night
    assert summary.picture.wafers == 8 and Image.open(summary.picture.path).size[0] > 0
    assert sum(summary.picture.patterns.values()) == scored.num_rows

    with get_client(sync_client=True) as client:
        parent = state.state_details.flow_run_id
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
        flows = {client.read_flow(r.flow_id).name for r in children}
        tasks = [r.name for r in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[parent])))]
        named = {client.read_flow(r.flow_id).name: r for r in children}
        assert client.read_flow_run(parent).name == f"demo-{night}"
        summary_md = next(a.data for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[named["nightly-inference"].id])))
            if a.key == "nightly-inference-summary")
    assert {"train-fcn", "nightly-inference"} <= flows
    assert (named["train-fcn"].name, named["nightly-inference"].name) == (f"tiny-{night}", night)
    # the first nightly run of a fresh store also scores the training nights: tonight comes first, on its own
    assert summary_md.startswith(f"# Nightly inference: night {night}\n")
    assert f"## {night}\n\n{drop.num_rows:,} wafers scored" in summary_md
    assert all(any(t.startswith(name) for t in tasks) for name in ("synthesise-night", "render-night")), tasks
