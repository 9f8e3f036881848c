"""SEMI G85 XML wafer maps (``<Maps><Map><Device>…<Bin/>…<Data><Row/>…``), one wafer per Device.

The Device element says how to read the rows: ``BinType`` (ASCII: one character per die;
Decimal: whitespace-separated numbers, usually 3 digits; HexaDecimal: 2 hex digits per die;
Integer2: 4 hex digits per die) and ``NullBin`` (the code of positions with no die). Every other code
must be declared by a ``Bin`` (or ``BinDefinition``) element whose ``BinQuality`` is Pass or Fail;
that quality, not the code, decides pass/fail. Rows are kept in file order (OriginLocation and
Orientation are not applied: the pattern classes do not depend on a flip or a rotation).

Parsed with the standard library's expat-based ElementTree, which neither fetches external entities
nor expands nested entity bombs (expat >= 2.4.1).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..table import FAIL, NO_DIE, PASS, make_table
from ._common import PathLike, ReaderError, existing_file

BIN_TYPES = ("ASCII", "Decimal", "HexaDecimal", "Integer2")
_HEX_WIDTH = {"HexaDecimal": 2, "Integer2": 4}
_QUALITY = {"pass": PASS, "fail": FAIL}
_UNKNOWN = 255  # state of a code no Bin declares

# hex digit value of each byte, -1 where the byte is not a hex digit
_HEX_DIGIT = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_DIGIT[_c] = _i
for _i, _c in enumerate(b"ABCDEF", start=10):
    _HEX_DIGIT[_c] = _i


def _tag(el: ET.Element) -> str:
    return el.tag.rsplit("}", 1)[-1]  # drop any XML namespace


def _attr(el: ET.Element, name: str) -> str | None:
    """Attribute by local name, case-insensitive (files differ: ``BinType`` vs ``Bintype``)."""
    want = name.lower()
    for key, value in el.attrib.items():
        if key.rsplit("}", 1)[-1].lower() == want:
            return value.strip()
    return None


def _children(el: ET.Element, *tags: str) -> list[ET.Element]:
    return [e for e in el.iter() if _tag(e) in tags]


def _bin_type(device: ET.Element, rows: list[str]) -> str:
    raw = _attr(device, "BinType")
    if raw is None:  # required by G85 but some writers omit it: spaced numbers mean Decimal
        return "Decimal" if any(re.search(r"\s", r) for r in rows) else "ASCII"
    for name in BIN_TYPES:
        if raw.lower() == name.lower():
            return name
    raise ReaderError(f"BinType {raw!r} is not one of {', '.join(BIN_TYPES)}")


def _code(text: str, bin_type: str) -> int:
    """One bin code as an integer: ASCII codes by character value, the others by number."""
    try:
        if bin_type == "ASCII":
            if len(text) != 1 or ord(text) > 255:
                raise ValueError
            return ord(text)
        return int(text, 10 if bin_type == "Decimal" else 16)
    except ValueError:
        raise ReaderError(f"bin code {text!r} is not a valid {bin_type} code") from None


def _show(code: int, bin_type: str) -> str:
    if bin_type == "ASCII":
        return repr(chr(code))
    return str(code) if bin_type == "Decimal" else f"{code:0{_HEX_WIDTH[bin_type]}X}"


def _decode_row(text: str, bin_type: str) -> np.ndarray:
    """One Row's text -> int codes, vectorised within the row."""
    row = text.strip()
    if bin_type == "Decimal":
        try:
            codes = np.array(row.split(), dtype=str).astype(np.int64)
        except ValueError:
            raise ReaderError(f"Decimal row holds something other than numbers: {row[:40]!r}") from None
        if codes.size and codes.min() < 0:
            raise ReaderError(f"Decimal row holds a negative code: {row[:40]!r}")
        return codes
    if bin_type == "ASCII":
        # whitespace is layout, never a bin: some writers space their characters or indent rows
        try:
            raw = "".join(row.split()).encode("latin-1")
        except UnicodeEncodeError:
            raise ReaderError("ASCII row holds characters outside one byte") from None
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    width = _HEX_WIDTH[bin_type]
    digits = _HEX_DIGIT[np.frombuffer("".join(row.split()).encode("latin-1", errors="replace"), np.uint8)]
    if (digits < 0).any() or digits.size % width:
        raise ReaderError(f"{bin_type} row is not a sequence of {width}-digit hex codes: {row[:40]!r}")
    weights = 16 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return digits.reshape(-1, width) @ weights


@dataclass(frozen=True)
class _Wafer:
    wafer_id: str
    lot_id: str | None
    captured_at: datetime | None
    die_map: np.ndarray


def _created(text: str | None) -> datetime | None:
    """CreateDate ``YYYYMMDDhhmmss[mmm]`` -> UTC timestamp (the file carries no zone); else None."""
    if not text or not re.fullmatch(r"\d{14}\d*", text):
        return None
    try:
        return datetime.strptime(text[:14], "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def _device_map(device: ET.Element) -> np.ndarray:
    rows_text = [r.text or "" for r in _children(device, "Row")]
    if not rows_text:
        raise ReaderError("Device has no Data/Row elements")
    bin_type = _bin_type(device, rows_text)
    declared_rows, declared_cols = (_attr(device, k) for k in ("Rows", "Columns"))
    columns = int(declared_cols) if declared_cols and declared_cols.isdigit() else None
    rows = [_decode_row(t, bin_type) for t in rows_text]
    widths = {len(r) for r in rows}
    if widths == {0}:
        raise ReaderError("Data rows are empty")
    if len(widths) != 1 or (columns is not None and widths != {columns}):
        want = columns if columns is not None else "equal"
        raise ReaderError(f"rows hold {sorted(widths)} dies, expected {want} per row")
    if declared_rows and declared_rows.isdigit() and int(declared_rows) != len(rows):
        raise ReaderError(f"Device declares Rows={declared_rows} but Data holds {len(rows)} rows")
    codes = np.stack(rows)

    null_text = _attr(device, "NullBin")
    if null_text is None:
        raise ReaderError("Device has no NullBin attribute: cannot tell no-die positions apart")
    states: dict[int, int] = {}
    for b in _children(device, "Bin", "BinDefinition"):
        code_text, quality = _attr(b, "BinCode"), _attr(b, "BinQuality")
        if code_text is None:
            raise ReaderError(f"a {_tag(b)} element has no BinCode")
        code = _code(code_text, bin_type)
        if quality is None or quality.lower() not in _QUALITY:
            raise ReaderError(f"bin {code_text!r} has BinQuality {quality!r}; only Pass or Fail decide a die")
        if states.setdefault(code, _QUALITY[quality.lower()]) != _QUALITY[quality.lower()]:
            raise ReaderError(f"bin {code_text!r} is declared both Pass and Fail")
    states[_code(null_text, bin_type)] = NO_DIE  # the null bin wins over any Bin entry for it

    # map the few distinct codes, then broadcast back: no per-die Python, no code-sized table
    distinct, inverse = np.unique(codes, return_inverse=True)
    distinct_states = np.array([states.get(int(c), _UNKNOWN) for c in distinct], dtype=np.uint8)
    unknown = distinct[distinct_states == _UNKNOWN]
    if unknown.size:
        shown = ", ".join(_show(int(c), bin_type) for c in unknown[:10])
        raise ReaderError(f"bin code(s) {shown} appear in the map but have no Bin definition "
                          f"(NullBin is {null_text!r})")
    die_map = distinct_states[inverse.reshape(codes.shape)]
    return die_map


def _parse_file(path: Path) -> list[_Wafer]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ReaderError(f"{path}: not well-formed XML ({exc})") from exc
    if _tag(root) == "MapData":
        raise ReaderError(f"{path}: a SEMI E142 MapData file; only G85 <Maps>/<Map> files are read here")
    maps = [root] if _tag(root) == "Map" else [m for m in root if _tag(m) == "Map"]
    if not maps:
        raise ReaderError(f"{path}: no <Map> element under <{_tag(root)}>: not a SEMI G85 wafer map")
    wafers: list[_Wafer] = []
    for m_index, el_map in enumerate(maps):
        devices = [d for d in el_map if _tag(d) == "Device"]
        if not devices:
            raise ReaderError(f"{path}: Map #{m_index + 1} has no <Device>")
        for d_index, device in enumerate(devices):
            base = (_attr(device, "WaferId") or _attr(el_map, "WaferId") or _attr(el_map, "SubstrateId")
                    or f"{path.stem}.{m_index}")
            wafer_id = base if len(devices) == 1 else f"{base}.{d_index}"
            try:
                die_map = _device_map(device)
            except ReaderError as exc:
                raise ReaderError(f"{path}: wafer {wafer_id!r}: {exc}") from None
            wafers.append(_Wafer(
                wafer_id=wafer_id,
                lot_id=_attr(device, "LotId") or _attr(el_map, "LotId") or None,
                captured_at=_created(_attr(device, "CreateDate")),
                die_map=die_map,
            ))
    return wafers


def _xml_files(path_or_paths: PathLike | Iterable[PathLike]) -> list[Path]:
    items = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() == ".xml")
            if not found:
                raise ReaderError(f"{p}: folder holds no .xml files")
            files.extend(found)
        else:
            files.append(existing_file(p))
    if not files:
        raise ReaderError("no G85 files given")
    return files


def read_g85(path_or_paths: PathLike | Iterable[PathLike]) -> pa.Table:
    """Read SEMI G85 XML files (a file, a folder of ``*.xml``, or a list) into one wafer table.

    wafer_id from the Map's WaferId, lot_id from the Device's LotId, captured_at from CreateDate;
    no label maps or wafer labels (G85 carries bins, not defect patterns).
    """
    wafers = [w for f in _xml_files(path_or_paths) for w in _parse_file(f)]
    return make_table(
        wafer_ids=[w.wafer_id for w in wafers],
        die_maps=[w.die_map for w in wafers],
        lot_ids=[w.lot_id for w in wafers],
        captured_at=[w.captured_at for w in wafers],
    )
