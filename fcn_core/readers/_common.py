"""What every reader shares: its error type and small helpers."""

from __future__ import annotations

import os
from pathlib import Path


class ReaderError(ValueError):
    """A file cannot be turned into a wafer table (wrong layout, unknown codes, bad value ranges)."""


class UntrustedFileError(ReaderError):
    """Refused to open a file whose format runs code when loaded (pickle) without trust=True."""


PathLike = str | os.PathLike


def existing_file(path: PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ReaderError(f"{p}: no such file")
    return p
