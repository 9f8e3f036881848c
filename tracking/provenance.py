"""Where a model came from: the data it was trained on and the code that trained it."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from fcn_core.config import REPO_ROOT


def data_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """Stable 16-hex-digit hash of the Parquet inputs: names (relative to each given folder),
    sizes and content hashes. Independent of argument order, absolute location and mtimes."""
    from fcn_core.table import list_parquet_files, resolve_fs

    if not paths:
        raise ValueError("data_fingerprint needs at least one Parquet file or folder")
    entries: list[str] = []
    for source in paths:
        fs, files = list_parquet_files(source)
        _, root = resolve_fs(source)
        single = len(files) == 1 and files[0] == root
        for f in files:
            rel = Path(f).name if single else os.path.relpath(f, root)
            digest = hashlib.sha256()
            size = 0
            with fs.open_input_stream(f) as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            entries.append(f"{rel}\t{size}\t{digest.hexdigest()}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def git_commit() -> str | None:
    """HEAD commit of the checkout wafer-fcn runs from (suffixed ``-dirty`` when modified)."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit or None
