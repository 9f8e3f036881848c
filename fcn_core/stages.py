"""Names every layer shares: the cascade's stages and their titles, and the verdict for no pattern.

Defined here once; ``fcn_core.models``, ``fcn_core.train``, the config and the reports import them.
"""

from __future__ import annotations

STAGES = ("fcn32s", "fcn16s", "fcn8s", "fcn4s", "fcn2s", "fcn1s")  # coarse to fine: output stride 32 ... 1
FINETUNE = "finetune"  # weak-label fine-tuning on real maps (fcn_core.weak): same model, more data
STAGE_TITLES = {"fcn32s": "FCN-32s", "fcn16s": "FCN-16s", "fcn8s": "FCN-8s", "fcn4s": "FCN-4s", "fcn2s": "FCN-2s",
                "fcn1s": "FCN-1s", FINETUNE: "fine-tuned on real maps"}
NO_PATTERN = "none"  # a wafer verdict (and a synthetic wafer label) when no defect pattern is present


def stage_title(stage: str) -> str:
    """'FCN-8s' for 'fcn8s'; an unknown name is returned as it is."""
    return STAGE_TITLES.get(stage, stage)
