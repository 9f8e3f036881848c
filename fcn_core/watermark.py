"""The nightly-inference watermark: which curated part files each partition's predictions cover.

A small JSON file in the project home (``predictions/_watermark.json``), rewritten atomically after
every scored partition, so an interrupted night resumes where it stopped and a re-run scores
nothing twice. Ingest names part files after their content hash (``part-<hash>.parquet``), so a
part's name identifies its wafers: a partition that gains a part is scored for the new part only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from fcn_core.atomic import write_bytes_atomic

WATERMARK_NAME = "_watermark.json"
FORMAT_VERSION = 1

Action = Literal["skip", "append", "full"]


@dataclass(frozen=True)
class ScoringPlan:
    """What to do with one partition: nothing, score only its new parts, or score all of it."""

    date: str
    action: Action
    parts: tuple[str, ...]  # part file names to score (all of them for "full")
    reason: str


@dataclass
class Watermark:
    path: Path
    partitions: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Watermark":
        path = Path(path)
        if not path.exists():
            return cls(path=path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: watermark is not valid JSON ({exc}); fix or delete it "
                             "(deleting rescores every partition)") from exc
        if data.get("format_version") != FORMAT_VERSION or not isinstance(data.get("partitions"), dict):
            raise ValueError(f"{path}: not a wafer-fcn watermark (format_version {FORMAT_VERSION})")
        return cls(path=path, partitions=data["partitions"])

    def save(self) -> None:
        """Write to a temporary file and rename: readers see the old or the new file, never half."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.path, json.dumps({"format_version": FORMAT_VERSION, "partitions": self.partitions},
                                                 indent=1, sort_keys=True).encode())

    def plan(self, date: str, parts: list[str], *, output_exists: bool) -> ScoringPlan:
        """Compare the partition's current part files with those already scored."""
        current = tuple(sorted(parts))
        entry = self.partitions.get(date)
        if not current:
            return ScoringPlan(date, "skip", (), "no part files")
        if entry is None:
            return ScoringPlan(date, "full", current, "never scored")
        if not output_exists:
            return ScoringPlan(date, "full", current, "predictions file missing")
        scored = set(entry.get("parts", {}))
        if scored - set(current):
            # A part vanished (ingest replaced it): its wafers may be gone, so start over.
            return ScoringPlan(date, "full", current, f"{len(scored - set(current))} scored part(s) removed")
        new = tuple(p for p in current if p not in scored)
        if new:
            return ScoringPlan(date, "append", new, f"{len(new)} new part(s)")
        return ScoringPlan(date, "skip", (), "up to date")

    def record(self, date: str, *, parts: dict[str, int], replace: bool, output: str, rows: int,
               model_name: str, model_version: str, flow_run_id: str | None) -> None:
        """Mark ``parts`` (name -> wafer rows) of ``date`` as scored into ``output`` (now ``rows`` rows)."""
        entry = {} if replace else dict(self.partitions.get(date, {}))
        covered = {} if replace else dict(entry.get("parts", {}))
        covered.update(parts)
        versions = [] if replace else list(entry.get("model_versions", []))
        if str(model_version) not in versions:
            versions.append(str(model_version))
        self.partitions[date] = {
            "parts": covered,
            "output": output,
            "rows": rows,
            "model_name": model_name,
            "model_versions": versions,
            "flow_run_id": flow_run_id,
            "scored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
