"""results.md from the typed results: the test-split tables, then one section per real-map stage."""

from fcn_core.report import Evaluation, RealMapsReport, StageScores, results_markdown


def real(stage: str, title: str) -> RealMapsReport:
    return RealMapsReport(stage=stage, title=title, source="real.parquet", n_wafers=1234,
                          thresholds="Verdict thresholds: min_dies 3 (config).", markdown="| a |\n| - |",
                          metrics={"accuracy": 0.5, "macro_f1": 0.25, "n_wafers": 1234.0})


def test_results_markdown_appends_one_section_per_real_stage_in_order():
    text = results_markdown("TABLES\n", [real("fcn1s", "Real: FCN-1s"), real("finetune", "Real: tuned")])
    assert text == ("TABLES\n"
                    "\n## Real: FCN-1s (real.parquet, 1,234 wafers)\n\nVerdict thresholds: min_dies 3 (config).\n\n"
                    "| a |\n| - |\n"
                    "\n## Real: tuned (real.parquet, 1,234 wafers)\n\nVerdict thresholds: min_dies 3 (config).\n\n"
                    "| a |\n| - |\n")
    assert results_markdown("TABLES\n", []) == "TABLES\n"


def test_evaluation_reads_scores_and_real_metrics_by_stage():
    scores = {s: StageScores(on_wafer={"mean_iu": 0.9}, fail_only={"mean_iu": v, "iou": [v, v]}, n_wafers=10)
              for s, v in (("fcn32s", 0.4), ("fcn8s", 0.6))}
    evaluation = Evaluation(model_stage="fcn8s", scores=scores, test_markdown="T\n", rows=[],
                            paths={"results_md": "/x/results.md"}, real=[real("fcn8s", "R")])
    assert evaluation.fail_mean_iu("fcn8s") == 0.6 and evaluation.fail_mean_iu("fcn32s") == 0.4
    assert evaluation.real_by_stage == {"fcn8s": {"accuracy": 0.5, "macro_f1": 0.25, "n_wafers": 1234.0}}
    assert evaluation.markdown() == results_markdown("T\n", evaluation.real)
    # it survives the JSON round trip Prefect uses for task results and parameters
    assert Evaluation.model_validate_json(evaluation.model_dump_json()) == evaluation


def test_results_markdown_summarises_the_headline_real_figures_per_stage():
    a = real("fcn1s", "A").model_copy(update={"metrics": {"wm811k_macro_f1": 0.8214, "mixed_exact_match": 0.31}})
    b = real("finetune", "B").model_copy(update={"metrics": {"wm811k_macro_f1": 0.85, "mixed_exact_match": None}})
    text = results_markdown("T\n", [a, b])
    assert text.startswith("T\n\n## Held-out real maps (scoring parts)\n\n"
                           "| model | WM-811K macro-F1 | MixedWM38 exact-set match |\n| --- | ---: | ---: |\n"
                           "| fcn1s | 0.821 | 0.310 |\n| finetune | 0.850 |  |\n")
    assert text.endswith(a.section() + b.section())
