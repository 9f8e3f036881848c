"""The one typed configuration of wafer-fcn.

Loaded from ``configs/*.yaml`` (plus ``key.path=value`` overrides), validated by pydantic, saved
with every checkpoint and logged with every MLflow run. Everything that can be tuned lives here,
including the class names and ids: no other module hard-codes them.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fcn_core.real_split import HELD_OUT_TABLES, TRAINING_TABLES
from fcn_core.settings import CHECKOUT_ROOT, REAL_VALIDATION_MAPS, settings
from fcn_core.stages import STAGES

# The checkout's root (git provenance, prefect.yaml); an installed wheel finds configs/ as package data.
REPO_ROOT = CHECKOUT_ROOT


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a YAML file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ClassSpec(_Strict):
    id: int = Field(ge=0, le=254)
    name: str
    color: str = Field(description="matplotlib colour used in every picture")


DEFAULT_CLASSES = [
    ClassSpec(id=0, name="background", color="#d9d9d9"),
    ClassSpec(id=1, name="ring", color="#1f77b4"),
    ClassSpec(id=2, name="scratch", color="#d62728"),
    ClassSpec(id=3, name="local zone", color="#ff7f0e"),
    ClassSpec(id=4, name="circle", color="#2ca02c"),
]


class SynthConfig(_Strict):
    """Knobs of the synthetic wafer generator (fcn_core.synth; measured defaults in docs/synth.md)."""

    n_wafers: int = Field(2000, ge=1)
    seed: int = Field(0, ge=0)
    nights: int = Field(1, ge=1, description="spread captured_at over this many consecutive days")
    wafers_per_lot: int = Field(25, ge=1, description="consecutive wafers sharing a lot (and its product)")
    lots: int | None = Field(
        None, ge=1, description="cap on distinct lot ids (they then repeat); None: a new lot every wafers_per_lot"
    )
    # -- product geometry: drawn once per lot, like a fab's product mix --------------------------
    size_min: int = Field(16, ge=1, description="grid sides are clipped to size_min..size_max")
    size_max: int = Field(256, ge=1, le=1024)
    size_mode: float = Field(26.0, gt=0, description="side of the high-volume product (WM-811K: 25x27, 26x26)")
    size_mode_fraction: float = Field(0.55, ge=0, le=1, description="share of lots on that product")
    size_median: float = Field(42.0, gt=0, description="median side sqrt(h*w) of the other products")
    size_sigma: float = Field(0.75, ge=0, description="log-sigma of their excess over size_mode (the tail)")
    aspect_scale: float = Field(0.09, ge=0, description="Laplace scale of log(width/height)")
    flat_fraction: float = Field(0.1, ge=0, le=1, description="products with a flat (1-2 die rows cut, bottom)")
    notch_fraction: float = Field(0.1, ge=0, le=1, description="products with a notch (bottom)")
    skip_site_fraction: float = Field(0.12, ge=0, le=1, description="products with no-die test sites inside")
    # -- background random failures (Poisson yield: rate grows with die area) -------------------
    background_rate: float = Field(0.135, ge=0, lt=1, description="median inner-die fail rate, 550-die product")
    background_lot_sigma: float = Field(0.2, ge=0, description="log-sigma of the rate between lots")
    background_wafer_sigma: float = Field(0.15, ge=0, description="log-sigma of the rate between wafers")
    edge_fail_boost: float = Field(2.2, ge=1, description="median factor on the outermost dies' fail rate")
    # -- what each wafer shows ----------------------------------------------------------------
    pattern_free_fraction: float = Field(0.3, ge=0, le=1)
    random_fraction: float = Field(0.2, ge=0, le=1, description="of pattern-free wafers: heavy random failure")
    near_full_fraction: float = Field(0.05, ge=0, le=1, description="of pattern-free wafers: near-full failure")
    mixed_fraction: float = Field(0.15, ge=0, le=1, description="of patterned wafers: two or three patterns")
    pattern_weights: dict[str, float] = Field(
        default_factory=lambda: {"ring": 1.0, "scratch": 1.0, "local zone": 1.0, "circle": 1.0},
        description="relative frequency of each pattern class (by class name)",
    )
    ring_partial_fraction: float = Field(0.3, ge=0, le=1, description="of rings: partial edge rings")
    ring_donut_fraction: float = Field(0.3, ge=0, le=1, description="of rings: donuts (rest: full edge rings)")
    local_edge_fraction: float = Field(0.55, ge=0, le=1, description="of local zones: at the edge (Edge-Loc)")
    mixed_three_fraction: float = Field(0.15, ge=0, le=1, description="of mixed wafers: three patterns")
    # -- widening towards MixedWM38 (issue #13, docs/synth.md): at these defaults all are off ---------
    mixed_four_fraction: float = Field(0.0, ge=0, le=1, description="of mixed wafers: four patterns")
    pattern_background_fraction: float = Field(
        0.0, ge=0, le=1, description="of patterned wafers: heavy random fails under the patterns")
    pattern_background_range: tuple[float, float] = Field(
        (0.15, 0.3), description="uniform fail rate of those wafers' non-pattern dies, drawn per wafer in this range")
    ring_thick_fraction: float = Field(0.0, ge=0, le=1, description="of edge rings (full and partial): thick bands")
    ring_thick_dies: tuple[float, float] = Field((2.0, 5.0), description="radial width of thick rings, in dies")
    double_ring_fraction: float = Field(
        0.0, ge=0, le=1, description="of rings: the other kind too (donut and edge ring: MixedWM38 Donut+Edge-Ring)")
    double_local_fraction: float = Field(
        0.0, ge=0, le=1, description="of local zones: the other kind too (at the edge and inside: Edge-Loc+Loc)")
    scratch_cross_fraction: float = Field(
        0.0, ge=0, le=1, description="of scratches on a wafer with a ring: drawn right across the wafer and ring")
    circle_small_fraction: float = Field(0.0, ge=0, le=1, description="of circles: small dense centre clusters")
    circle_small_dies: tuple[float, float] = Field((1.5, 4.0), description="radius of small centres, in dies")
    local_any_size_fraction: float = Field(
        0.0, ge=0, le=1, description="of local zones: any size (inside: radius log-uniform over local_radius_range; "
                                     "at the edge: up to half the rim long)")
    local_radius_range: tuple[float, float] = Field(
        (0.03, 0.45), description="radius range of those inner zones, in wafer radii (at least 1 die)")
    dense_fraction: float = Field(
        0.0, ge=0, le=1, description="of donuts, centres and local zones: solid (fill 0.9-1, no patches, arcs, halo)")

    @model_validator(mode="after")
    def _consistent(self) -> "SynthConfig":
        if self.size_min > self.size_max:
            raise ValueError(f"size_min {self.size_min} > size_max {self.size_max}")
        if self.mixed_three_fraction + self.mixed_four_fraction > 1 + 1e-9:
            raise ValueError("mixed_three_fraction + mixed_four_fraction must not exceed 1")
        for name, (lo, hi), top in (("pattern_background_range", self.pattern_background_range, 1.0),
                                    ("ring_thick_dies", self.ring_thick_dies, 64.0),
                                    ("circle_small_dies", self.circle_small_dies, 64.0),
                                    ("local_radius_range", self.local_radius_range, 1.0)):
            if not 0 <= lo <= hi <= top:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high <= {top:g}, got ({lo}, {hi})")
        if self.random_fraction + self.near_full_fraction > 1 + 1e-9:
            raise ValueError("random_fraction + near_full_fraction must not exceed 1")
        if self.ring_partial_fraction + self.ring_donut_fraction > 1 + 1e-9:
            raise ValueError("ring_partial_fraction + ring_donut_fraction must not exceed 1")
        if any(w < 0 for w in self.pattern_weights.values()):
            raise ValueError(f"pattern_weights must be >= 0, got {self.pattern_weights}")
        if self.pattern_free_fraction < 1 and sum(self.pattern_weights.values()) <= 0:
            raise ValueError("pattern_weights are all zero but pattern_free_fraction < 1")
        return self


class SplitConfig(_Strict):
    """Deterministic split by hashing lot_id (wafer_id when no lot)."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    salt: str = "wafer-fcn"

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total}")
        return self


class DataConfig(_Strict):
    source: str | None = Field(
        None, description="Parquet file, folder or pyarrow URI of wafer-table drops; None = synthesise"
    )
    synth: SynthConfig = SynthConfig()
    split: SplitConfig = SplitConfig()
    pad_multiple: int = Field(32, ge=1, description="pad each map up to a multiple of this")
    pad_fixed: int | None = Field(None, ge=1, description="pad every map to this square size instead")


class ModelConfig(_Strict):
    preset: Literal["compact", "vgg16"] = "compact"
    geometry: Literal["aligned", "classic"] = "aligned"
    batch_norm: bool = Field(False, description="BatchNorm after every trunk conv (vgg16_bn style)")
    imagenet_weights: str | None = Field(
        None, description="local path to a torchvision VGG16 state dict (vgg16 preset only)"
    )
    tta: Literal["none", "mirror"] = Field(
        "none", description="test-time augmentation wherever the model labels maps (test scores, calibration, "
                            "predict, nightly): mirror = average the softmax of each map and of its mirror "
                            "image (flipped before padding, flipped back); twice the inference time")


class StageConfig(_Strict):
    epochs: int = Field(4, ge=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)


class LineSeedConfig(_Strict):
    """Pseudo-masks for a thin pattern the starting model barely sees (``weak_labels: both``).

    A die-level model trained on synthetic maps gives MixedWM38's long one-die scratches over heavy
    random fails only 0.1-0.5 scratch probability (and paints them ring beside an edge ring), so the
    confident-die rule teaches them background or ring. On a wafer whose label names this pattern, a
    fail die with at least ``min_prob`` of it, in an 8-connected group of at least ``min_dies`` dies
    and ``min_elongation`` (``fcn_core.shapes``), is taught the pattern instead (docs/real-data.md).
    """

    class_name: str = Field("scratch", description="the line-shaped pattern (a class name)")
    min_prob: float = Field(0.05, gt=0, le=1, description="its softmax a die needs (the random fails' is near 0)")
    min_elongation: float = Field(3.0, ge=1, description="a group of such dies at least this elongated")
    min_dies: int = Field(4, ge=1, description="...and at least this many dies")


class FinetuneConfig(StageConfig):
    """Weak-label fine-tuning on real maps after the last stage (fcn_core.weak).

    Off unless enabled; configs/default.yaml sets ``enabled: auto`` (on when the real maps are there).

    Only ``train_tables`` are trained on (``fcn_core.real_split.check_trainable`` refuses the
    held-out ``-val`` tables); ``eval.real_data`` / ``eval.mixed_data`` calibrate and score.
    """

    enabled: bool | Literal["auto"] = Field(
        False, description="true: fine-tune (error without real maps); 'auto': when the train tables and "
                           "eval.real_data are there")
    train_tables: list[str] = Field(
        default_factory=lambda: list(TRAINING_TABLES),
        description="real labelled tables to fine-tune on: file names in the real-data folder, or paths")
    weak_labels: Literal["both", "wafer_labels", "all_fail_dies", "pseudo_masks"] = Field(
        "both", description="wafer_labels: a wafer-level loss trained jointly with the synthetic die "
                            "loss (fcn_core.weak_loss: fail dies are background or a labelled pattern, "
                            "each labelled pattern is carried by some dies; mixes kept); both: the same real "
                            "maps also taught their pseudo-masks (below) by cross-entropy; all_fail_dies: "
                            "every fail die of a one-pattern wafer is that pattern (mixes dropped); "
                            "pseudo_masks: the synthetic-only model's confident dies, restricted to the "
                            "wafer's labelled patterns, others ignored (mixes kept)")
    real_weight: float = Field(1.0, gt=0, description="wafer_labels/both: weight of the real-map loss beside "
                                                      "the synthetic one (one real batch per synthetic batch)")
    presence_weight: float = Field(1.0, ge=0, description="wafer_labels/both: weight of 'each labelled pattern is "
                                                          "there' beside 'no other pattern is'")
    presence_top_k: int = Field(5, ge=1, description="wafer_labels/both: a pattern's presence score is its mean "
                                                     "probability over the wafer's k most likely fail dies")
    max_map_side: int | None = Field(
        96, ge=8, description="wafer_labels/both: train on real maps up to this many dies a side (the few larger "
                              "WM-811K maps cost as much as all others together); null: all")
    pseudo_min_prob: float = Field(0.6, gt=0, le=1, description="pseudo_masks/both: softmax a die needs to be taught")
    pseudo_line_seed: LineSeedConfig | None = Field(
        None, description="pseudo_masks/both: a labelled line-shaped pattern's faint dies are taught it too "
                          "(LineSeedConfig; configs/default.yaml seeds scratch); null: off (it names a class, "
                          "so class lists without it need no setting)")
    pseudo_refresh_after: float | None = Field(
        0.5, gt=0, lt=1, description="both: once, after this share of the epochs (rounded down), the pseudo-masks "
                                     "are drawn again from the model being trained (self-training); null: never")
    max_per_class: int | None = Field(
        1000, ge=1, description="cap on weakly labelled wafers per mapped class (WM-811K is 59 % 'none')")
    mix_synthetic: bool = Field(True, description="all_fail_dies / pseudo_masks: train on the synthetic train "
                                                  "split too (keeps die-level skill); wafer_labels always does")
    candidate: bool = Field(
        False, description="make the fine-tuned model the registry candidate rather than the best cascade "
                           "stage: better wafer verdicts on real maps, worse die labels (numbers: README)")

    @property
    def refresh_epoch(self) -> int | None:
        """How many epochs run before the pseudo-masks are redrawn, or None: never."""
        return self.refresh_epoch_of(self.epochs)

    def refresh_epoch_of(self, epochs: int) -> int | None:
        """:attr:`refresh_epoch` for a stage of ``epochs`` epochs (joint training may run in any stage)."""
        if self.pseudo_refresh_after is None:
            return None
        done = int(epochs * self.pseudo_refresh_after)
        return done if 1 <= done < epochs else None


class TrainConfig(_Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    class_weights: Literal["none", "auto"] | list[float] = "auto"
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    max_wafers_per_epoch: int | None = Field(None, ge=1)
    grad_clip_norm: float | None = Field(
        None, gt=0, description="clip the gradients' global L2 norm to this before each step (null: no clipping)")
    final_stage: Literal[STAGES[2:]] = Field(  # type: ignore[valid-type]  # fcn8s ... fcn1s
        "fcn8s", description="last stage of the cascade: fcn8s as in the paper, or on to die level (fcn1s)")
    fcn32s: StageConfig = StageConfig()
    fcn16s: StageConfig = StageConfig(lr=5e-4)
    fcn8s: StageConfig = StageConfig(lr=2.5e-4)
    fcn4s: StageConfig = StageConfig(lr=2.5e-4)
    fcn2s: StageConfig = StageConfig(lr=2.5e-4)
    fcn1s: StageConfig = StageConfig(lr=2.5e-4)
    finetune: FinetuneConfig = FinetuneConfig(epochs=6, lr=5e-4)

    def stage(self, name: str) -> StageConfig:
        value = getattr(self, name, None) if not name.startswith("_") else None
        if not isinstance(value, StageConfig):
            raise ValueError(f"unknown stage {name!r}; expected fcn32s ... fcn1s or finetune")
        return value


class LineRescueConfig(_Strict):
    """The shape rule keeps the line through a band (``fcn_core.shapes.LineRescue``)."""

    min_group_dies: int = Field(12, ge=3, description="only groups of at least this many dies hold a line")
    max_axis_distance: float = Field(1.5, gt=0, description="dies this close to the group's principal axis...")
    min_line_dies: int = Field(8, ge=3, description="...at least this many of them...")
    min_line_elongation: float = Field(6.0, ge=1, description="...with a piece at least this elongated")


class VerdictConfig(_Strict):
    """Wafer-level verdict from a segmentation: which pattern dominates, if any."""

    min_dies: int = Field(3, ge=1, description="a pattern needs at least this many dies")
    min_share: float = Field(0.05, ge=0, le=1, description="...and this share of the wafer's fail dies")
    min_dies_by_class: dict[str, int] = Field(
        default_factory=dict, description="per-pattern overrides of min_dies, by class name")
    min_share_by_class: dict[str, float] = Field(
        default_factory=dict, description="per-pattern overrides of min_share, by class name")
    min_elongation_by_class: dict[str, float] = Field(
        default_factory=dict,
        description="shape rule: a pattern's fail dies count only in 8-connected groups at least this elongated "
                    "(fcn_core.shapes; 'scratch: 4' = a scratch is a line of 4+ dies); the others become background")
    line_rescue: LineRescueConfig | None = Field(
        None, description="a group the elongation rule drops keeps the dies along its main axis when they form "
                          "a line (a scratch the network painted with a band of random fails around it); null: "
                          "off; configs/default.yaml turns it on")
    dies_follow_patterns: bool = Field(
        True, description="a fail die keeps a pattern only when the wafer's verdict finds that pattern (the "
                          "patterns column); the dies of a pattern too small to count become background, so maps, "
                          "dies_* columns and verdicts agree")
    calibrated_on: str | None = Field(
        None, description="set by fine-tuning: thresholds chosen for best macro-F1 on these real maps")

    @field_validator("min_elongation_by_class")
    @classmethod
    def _elongation_at_least_one(cls, rules: dict[str, float]) -> dict[str, float]:
        low = {name: value for name, value in rules.items() if value < 1}
        if low:
            raise ValueError(f"elongation is 1 for a square group and more for longer ones; got {low}")
        return rules

    def thresholds(self, pattern_names: list[str]) -> tuple[list[int], list[float]]:
        """(min_dies, min_share) per pattern, overrides applied; unknown override names are errors."""
        self._check_names(pattern_names)
        return ([self.min_dies_by_class.get(n, self.min_dies) for n in pattern_names],
                [self.min_share_by_class.get(n, self.min_share) for n in pattern_names])

    def elongation_rules(self, class_names: list[str]) -> dict[int, float]:
        """Class id -> minimum group elongation, for ``fcn_core.shapes.apply_min_elongation``."""
        self._check_names(class_names[1:])
        return {class_names.index(name): value for name, value in self.min_elongation_by_class.items()}

    def _check_names(self, pattern_names: list[str]) -> None:
        named = set(self.min_dies_by_class) | set(self.min_share_by_class) | set(self.min_elongation_by_class)
        unknown = sorted(named - set(pattern_names))
        if unknown:
            raise ValueError(f"verdict thresholds name unknown patterns {unknown}; patterns: {pattern_names}")

    def describe(self) -> str:
        """'min_dies 3, min_share 0.05' plus any per-pattern overrides, for reports and logs."""
        text = f"min_dies {self.min_dies}, min_share {self.min_share:g}"
        names = sorted(set(self.min_dies_by_class) | set(self.min_share_by_class))
        if names:
            pairs = (f"{n} ({self.min_dies_by_class.get(n, self.min_dies)}, "
                     f"{self.min_share_by_class.get(n, self.min_share):g})" for n in names)
            text += "; per pattern (min_dies, min_share): " + ", ".join(pairs)
        if self.min_elongation_by_class:
            text += "; groups at least this elongated: " + ", ".join(
                f"{n} {v:g}" for n, v in sorted(self.min_elongation_by_class.items()))
            if self.line_rescue is not None:
                r = self.line_rescue
                text += (f" (a dropped group of {r.min_group_dies}+ keeps the dies within {r.max_axis_distance:g} "
                         f"of its axis if {r.min_line_dies}+ of them form a line of elongation {r.min_line_elongation:g}+)")
        return text


class EvalConfig(_Strict):
    """Evaluation beyond the synthetic test split: wafer-level verdicts on real, labelled maps."""

    real_data: str | None = Field(
        "auto", description="wafer table with dataset wafer labels (e.g. WM-811K); 'auto': "
                            "wm811k-val.parquet in the real-data folder (fcn_core.settings) when present; null: skip")
    mixed_data: str | None = Field(
        "auto", description="wafer table with multi-pattern labels (MixedWM38); 'auto': mixedwm38-val.parquet "
                            "in the real-data folder when present; null: skip")
    real_max_wafers: int | None = Field(
        None, ge=1, description="score a seeded random sample of N wafers of each table's scoring part")

    def real_data_path(self) -> str | None:
        if self.real_data != "auto":
            return self.real_data
        found = settings().real_maps(REAL_VALIDATION_MAPS)
        return str(found) if found is not None else None

    def mixed_data_path(self) -> str | None:
        if self.mixed_data != "auto":
            return self.mixed_data
        found = settings().real_maps(MIXED_VALIDATION_MAPS)
        return str(found) if found is not None else None


def real_table_path(name: str) -> str | None:
    """A real table given by file name (looked up in the real-data folder) or by path; None if absent."""
    if Path(name).name == name:
        found = settings().real_maps(name)
        return str(found) if found is not None else None
    return name if Path(name).exists() else None


MIXED_VALIDATION_MAPS = HELD_OUT_TABLES[1]  # mixedwm38-val.parquet


class TrackingConfig(_Strict):
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI or the embedded SQLite store")
    experiment: str = "wafer-fcn"
    registered_model: str = "wafer-fcn"
    replace_unloadable_champion: bool = Field(
        False, description="let a new version take 'champion' from one that fails to load (logged on the run "
                           "and the version); false: it becomes 'challenger', a transient failure never promotes")


class Config(_Strict):
    name: str = "default"
    home: str | None = Field(None, description="project data dir; None: $WAFER_FCN_HOME or ./var")
    classes: list[ClassSpec] = Field(default_factory=lambda: [c.model_copy() for c in DEFAULT_CLASSES])
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    verdict: VerdictConfig = VerdictConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("classes")
    @classmethod
    def _classes_are_dense(cls, classes: list[ClassSpec]) -> list[ClassSpec]:
        ids = [c.id for c in classes]
        if ids != list(range(len(classes))):
            raise ValueError(f"class ids must be 0..N-1 in order, got {ids}")
        if classes[0].name != "background":
            raise ValueError("class 0 must be 'background'")
        return classes

    @model_validator(mode="after")
    def _line_seed_names_a_pattern(self) -> "Config":
        seed = self.train.finetune.pseudo_line_seed
        if seed is not None and seed.class_name not in self.class_names[1:]:
            raise ValueError(f"train.finetune.pseudo_line_seed.class_name {seed.class_name!r} is not a pattern class "
                             f"{self.class_names[1:]}; name one or set train.finetune.pseudo_line_seed: null")
        return self

    # -- derived values -------------------------------------------------------------------------
    @property
    def finetune_enabled(self) -> bool:
        """train.finetune.enabled, with 'auto' meaning: when real labelled maps are at hand."""
        enabled = self.train.finetune.enabled
        if enabled != "auto":
            return bool(enabled)
        tables = [real_table_path(name) for name in self.train.finetune.train_tables]
        return self.eval.real_data_path() is not None and all(t is not None for t in tables)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def home_dir(self) -> Path:
        return Path(self.home).expanduser().resolve() if self.home else settings().home_dir()

    @property
    def tracking_uri(self) -> str:
        """Explicit config > $MLFLOW_TRACKING_URI > embedded SQLite file in the home dir."""
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        preferred = settings().mlflow_tracking_uri
        if preferred:
            return preferred
        return f"sqlite:///{self.home_dir / 'mlflow.db'}"  # absolute path -> four slashes

    # -- I/O --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Flattened ``a.b.c -> value`` view, e.g. for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for i, v in enumerate(value):
                    walk(f"{prefix}.{i}", v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.fcn8s.epochs=3`` -> (["train", "fcn8s", "epochs"], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    items = overrides.items() if isinstance(overrides, dict) else (
        (".".join(p), v) for p, v in map(parse_override, overrides)
    )
    for dotted, value in items:
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r}: {part!r} is not a section")
        node[leaf] = value
    return data


def config_names() -> list[str]:
    """Names of the shipped configs (the ``configs`` package's *.yaml: default, tiny, ...)."""
    return sorted(entry.name.removesuffix(".yaml") for entry in files("configs").iterdir()
                  if entry.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path | Traversable:
    """A config is named (``default`` -> the shipped configs/default.yaml) or given as a path."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} and p.exists():
        return p
    candidate = files("configs") / f"{name_or_path}.yaml"
    if "/" not in str(name_or_path) and candidate.is_file():
        return candidate
    raise FileNotFoundError(f"config {str(name_or_path)!r} not found (known: {', '.join(config_names())})")


def load_config(
    name_or_path: str | Path = "default", overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    path = resolve_config_path(name_or_path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if overrides:
        data = apply_overrides(data, overrides)
    return Config.model_validate(data)


# Settings older checkpoints and registered models carry but that no longer exist: dropped when such
# a saved config is rebuilt, so old champions stay loadable (a YAML file with them is still an error).
RETIRED_KEYS: tuple[tuple[str, ...], ...] = (
    ("train", "finetune", "holdout_fraction"),  # the real split is fixed by fcn_core.real_split now
)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild the config saved inside a checkpoint or an MLflow run (retired keys dropped)."""
    import copy

    data = copy.deepcopy(data)
    for *parents, key in RETIRED_KEYS:
        node = data
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return Config.model_validate(data)
