"""Readers of real wafer-map formats, on small files written by the tests themselves."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fcn_core.readers import (
    MIXEDWM38_LABELS,
    ReaderError,
    UntrustedFileError,
    detect_format,
    read_any,
    read_g85,
    read_mixedwm38,
    read_wm811k_pickle,
)
from fcn_core.readers.mixedwm38 import ENCODINGS, choose_encoding
from fcn_core.table import WAFER_SCHEMA, die_maps, label_maps


def disc_map(size: int, *, fails: list[tuple[int, int]] = ()) -> np.ndarray:
    """A round wafer: 0 off-wafer, 1 pass, 2 at the given fail positions."""
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    m = np.where((yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2, 1, 0).astype(np.uint8)
    for y, x in fails:
        m[y, x] = 2
    return m


# -- WM-811K ------------------------------------------------------------------------------------
def lswmd_frame() -> pd.DataFrame:
    """Three rows shaped like LSWMD.pkl: nested-array labels, float wafer indexes, object columns."""
    maps = [disc_map(6, fails=[(2, 2), (3, 3)]), disc_map(9), disc_map(7, fails=[(0, 3)])]
    return pd.DataFrame({
        "waferMap": pd.Series(maps, dtype=object),
        "dieSize": [1683.0, 1683.0, 710.0],
        "lotName": ["lot1", "lot1", "lot47"],
        "waferIndex": [12.0, 13.0, 1.0],
        "trianTestLabel": pd.Series([np.array([["Training"]]), np.zeros((0, 0)), np.array([["Test"]])],
                                    dtype=object),
        "failureType": pd.Series([np.array([["Edge-Ring"]]), np.zeros((0, 0)), np.array([["none"]])],
                                 dtype=object),
    })


@pytest.fixture
def lswmd(tmp_path: Path) -> Path:
    path = tmp_path / "LSWMD.pkl"
    lswmd_frame().to_pickle(path)
    return path


class _CreatesFileWhenUnpickled:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_wm811k_refuses_without_trust_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    with pytest.raises(UntrustedFileError, match="trust=True"):
        read_wm811k_pickle(path)
    with pytest.raises(UntrustedFileError):
        read_any(path)  # the dispatcher does not trust by default either
    assert not marker.exists()


def test_wm811k_reads_rows_ids_labels_and_maps(lswmd: Path) -> None:
    t = read_wm811k_pickle(lswmd, trust=True)
    assert t.schema.equals(WAFER_SCHEMA)
    assert t.column("wafer_id").to_pylist() == ["lot1.w12", "lot1.w13", "lot47.w1"]
    assert t.column("lot_id").to_pylist() == ["lot1", "lot1", "lot47"]
    assert t.column("wafer_label").to_pylist() == ["Edge-Ring", None, "none"]
    assert label_maps(t) == [None, None, None]
    for got, want in zip(die_maps(t), lswmd_frame()["waferMap"]):
        np.testing.assert_array_equal(got, want)


def test_wm811k_reads_pickles_of_old_pandas_module_paths(tmp_path: Path) -> None:
    # LSWMD.pkl was written when pandas' index classes lived in ``pandas.indexes``
    raw = pickle.dumps(lswmd_frame(), protocol=2)  # protocol 2 names classes in plain text
    assert b"pandas.core.indexes." in raw
    legacy = raw.replace(b"pandas.core.indexes.", b"pandas.indexes.")
    path = tmp_path / "legacy.pkl"
    path.write_bytes(legacy)
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(legacy)  # plain pickle cannot read it
    t = read_wm811k_pickle(path, trust=True)
    assert t.num_rows == 3 and t.column("wafer_id")[2].as_py() == "lot47.w1"


@pytest.mark.parametrize("bad, match", [
    (np.array([[0, 1], [3, 2]], dtype=np.uint8), r"row 1: waferMap values must be 0 .*\[0, 3\]"),
    (np.array([[0, 1], [-1, 2]]), r"row 1: waferMap values"),
    (np.array([[0, 1.5], [1, 2]]), r"row 1: waferMap values"),
    (np.array([0, 1, 2]), r"row 1: waferMap has shape \(3,\)"),
])
def test_wm811k_rejects_bad_maps(tmp_path: Path, bad: np.ndarray, match: str) -> None:
    df = lswmd_frame()
    df.at[1, "waferMap"] = bad
    path = tmp_path / "bad.pkl"
    df.to_pickle(path)
    with pytest.raises(ReaderError, match=match):
        read_wm811k_pickle(path, trust=True)


def test_wm811k_rejects_wrong_content(tmp_path: Path) -> None:
    no_label = tmp_path / "nolabel.pkl"
    lswmd_frame().drop(columns=["failureType"]).to_pickle(no_label)
    with pytest.raises(ReaderError, match=r"missing column\(s\) \['failureType'\]"):
        read_wm811k_pickle(no_label, trust=True)
    not_frame = tmp_path / "list.pkl"
    not_frame.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ReaderError, match="holds a list, not a pandas DataFrame"):
        read_wm811k_pickle(not_frame, trust=True)
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(ReaderError, match="not a readable pandas pickle"):
        read_wm811k_pickle(garbage, trust=True)
    with pytest.raises(ReaderError, match="no such file"):
        read_wm811k_pickle(tmp_path / "absent.pkl", trust=True)
    two_labels = tmp_path / "two.pkl"
    df = lswmd_frame()
    df.at[0, "failureType"] = np.array([["Loc", "Scratch"]])
    df.to_pickle(two_labels)
    with pytest.raises(ReaderError, match="row 0: failureType holds 2 values"):
        read_wm811k_pickle(two_labels, trust=True)


# -- MixedWM38 ------------------------------------------------------------------------------------
def mixed_arrays(n: int = 4, size: int = 52) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    base = disc_map(size)
    maps = np.repeat(base[None], n, axis=0)
    maps[(rng.random(maps.shape) < 0.2) & (maps == 1)] = 2
    labels = np.zeros((n, 8), dtype=np.int64)
    labels[1, [0, 6]] = 1  # Center + Scratch
    labels[2, 3] = 1  # Edge-Ring
    labels[3, 7] = 1  # Random
    return maps, labels


def write_npz(path: Path, maps: np.ndarray, labels: np.ndarray) -> Path:
    np.savez_compressed(path, maps, labels)  # positional arrays are stored as arr_0, arr_1
    return path


def test_mixedwm38_reads_maps_and_joined_labels(tmp_path: Path) -> None:
    maps, labels = mixed_arrays()
    t = read_mixedwm38(write_npz(tmp_path / "Wafer_Map_Datasets.npz", maps, labels))
    assert t.schema.equals(WAFER_SCHEMA)
    assert t.column("wafer_label").to_pylist() == ["none", "Center+Scratch", "Edge-Ring", "Random"]
    assert t.column("wafer_id").to_pylist() == [f"Wafer_Map_Datasets.{i}" for i in range(4)]
    np.testing.assert_array_equal(np.stack(die_maps(t)), maps)
    assert MIXEDWM38_LABELS[5] == "Near-full"


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_mixedwm38_every_known_encoding_decodes_to_the_same_maps(tmp_path: Path, name: str) -> None:
    maps, labels = mixed_arrays()
    to_raw = {state: raw for raw, state in ENCODINGS[name].items()}
    raw = np.vectorize(to_raw.get)(maps).astype(np.float32 if name == "0/1/3" else np.int64)
    t = read_mixedwm38(write_npz(tmp_path / "x.npz", raw, labels), id_prefix="mw")
    np.testing.assert_array_equal(np.stack(die_maps(t)), maps)
    assert t.column("wafer_id")[0].as_py() == "mw.0"


def test_mixedwm38_encodings_agree_where_they_overlap() -> None:
    # the rule "first matching encoding wins" is only safe because shared values mean the same
    for a in ENCODINGS.values():
        for b in ENCODINGS.values():
            for v in a.keys() & b.keys():
                assert a[v] == b[v]
    assert choose_encoding({0, 1}) == "0/1/2"
    assert choose_encoding({0, 255}) == "0/127/255"
    assert choose_encoding({0, 128, 255}) == "0/128/255"


@pytest.mark.parametrize("values, match", [
    ([0, 1, 2, 3], r"die values \[0, 1, 2, 3\] match no known encoding"),
    ([0, 127, 128, 255], r"match no known encoding"),
    ([0, 1, 300], r"values span \[0, 300\]"),
    ([0, -1, 2], r"values span \[-1, 2\]"),
    ([0, 1, 2.5], "fractional"),
])
def test_mixedwm38_rejects_unknown_value_sets(tmp_path: Path, values: list, match: str) -> None:
    maps = np.resize(np.array(values), (2, 4, 4))
    with pytest.raises(ReaderError, match=match):
        read_mixedwm38(write_npz(tmp_path / "bad.npz", maps, np.zeros((2, 8), int)))


def test_mixedwm38_rejects_bad_layouts(tmp_path: Path) -> None:
    maps, labels = mixed_arrays()
    with pytest.raises(ReaderError, match=r"arr_1 has shape \(4, 7\)"):
        read_mixedwm38(write_npz(tmp_path / "a.npz", maps, labels[:, :7]))
    with pytest.raises(ReaderError, match="arr_1 must hold only 0 and 1"):
        read_mixedwm38(write_npz(tmp_path / "b.npz", maps, labels * 2))
    with pytest.raises(ReaderError, match=r"arr_0 has shape \(52, 52\)"):
        read_mixedwm38(write_npz(tmp_path / "c.npz", maps[0], labels))
    np.savez(tmp_path / "d.npz", maps=maps, labels=labels)
    with pytest.raises(ReaderError, match=r"expected arrays arr_0 .* found \['labels', 'maps'\]"):
        read_mixedwm38(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", np.array([{"x": 1}], dtype=object), labels)
    with pytest.raises(ReaderError, match="not a readable numpy .npz"):
        read_mixedwm38(tmp_path / "e.npz")  # object arrays would need pickle: refused


# -- SEMI G85 -----------------------------------------------------------------------------------------
ASCII_G85 = """<?xml version="1.0" encoding="utf-8"?>
<Maps>
  <Map xmlns:semi="http://www.semi.org" WaferId="W01" FormatRevision="G85-1101">
    <Device ProductId="P1" LotId="LOT9" CreateDate="20240131120501123" Rows="4" Columns="5"
            Orientation="0" OriginLocation="2" BinType="ASCII" NullBin=".">
      <ReferenceDevice ReferenceDeviceX="1" ReferenceDeviceY="1"/>
      <Bin BinCode="1" BinCount="9" BinQuality="Pass" BinDescription="good"/>
      <Bin BinCode="X" BinCount="2" BinQuality="Fail"/>
      <Bin BinCode="G" BinCount="1" BinQuality="pass"/>
      <Bin BinCode="7" BinCount="1" BinQuality="Fail"/>
      <Data MapName="Map" Version="1">
        <Row><![CDATA[.111.]]></Row>
        <Row><![CDATA[11X1G]]></Row>
        <Row><![CDATA[1X117]]></Row>
        <Row><![CDATA[.111.]]></Row>
      </Data>
    </Device>
  </Map>
  <Map WaferId="W02" FormatRevision="G85-1101">
    <Device LotId="LOT9" Rows="2" Columns="3" BinType="ASCII" NullBin=".">
      <Bin BinCode="1" BinQuality="Pass"/>
      <Bin BinCode="X" BinQuality="Fail"/>
      <Data><Row>1 X 1</Row><Row>.1.</Row></Data>
    </Device>
  </Map>
</Maps>
"""
ASCII_MAP_W01 = np.array([[0, 1, 1, 1, 0], [1, 1, 2, 1, 1], [1, 2, 1, 1, 2], [0, 1, 1, 1, 0]])


def g85(rows: list[str], *, bin_type: str | None, null: str, bins: dict[str, str], cols: int,
        wafer: str = "W", wrapper: str = "", ns: str = "") -> str:
    bin_xml = "".join(f'<Bin BinCode="{c}" BinQuality="{q}"/>' for c, q in bins.items())
    if wrapper:
        bin_xml = f"<{wrapper}>{bin_xml.replace('<Bin ', '<BinDefinition ')}</{wrapper}>"
    bt = f' BinType="{bin_type}"' if bin_type else ""
    row_xml = "".join(f"<Row><![CDATA[{r}]]></Row>" for r in rows)
    return (f'<Maps{ns}><Map WaferId="{wafer}"><Device Rows="{len(rows)}" Columns="{cols}"{bt} '
            f'NullBin="{null}">{bin_xml}<Data>{row_xml}</Data></Device></Map></Maps>')


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_g85_ascii_two_maps_in_one_file(tmp_path: Path) -> None:
    t = read_g85(write(tmp_path / "lot9.xml", ASCII_G85))
    assert t.schema.equals(WAFER_SCHEMA)
    assert t.column("wafer_id").to_pylist() == ["W01", "W02"]
    assert t.column("lot_id").to_pylist() == ["LOT9", "LOT9"]
    created = t.column("captured_at").to_pylist()
    assert created[0].isoformat() == "2024-01-31T12:05:01+00:00" and created[1] is None
    got = die_maps(t)
    np.testing.assert_array_equal(got[0], ASCII_MAP_W01)  # quality decides: G pass, 7 fail
    np.testing.assert_array_equal(got[1], [[1, 2, 1], [0, 1, 0]])  # spaced ASCII characters
    assert t.column("wafer_label").null_count == 2


def test_g85_decimal_hex_and_integer2_give_the_same_map(tmp_path: Path) -> None:
    want = np.array([[0, 1, 2, 0], [1, 2, 2, 1]])
    dec = g85(["255 001 091 255", "001 092 091 001"], bin_type="Decimal", null="255",
              bins={"001": "Pass", "091": "Fail", "092": "Fail"}, cols=4)
    hexa = g85(["FF015BFF", "015c5B01"], bin_type="HexaDecimal", null="FF",
               bins={"01": "Pass", "5B": "Fail", "5C": "Fail"}, cols=4, wrapper="BinDefinitions",
               ns=' xmlns="http://www.semi.org"')
    int2 = g85(["FFFF 0001 0100 FFFF", "0001 0100 0100 0001"], bin_type="Integer2", null="FFFF",
               bins={"0001": "Pass", "0100": "Fail"}, cols=4)
    no_type = g85(["255 1 91 255", "1 92 91 1"], bin_type=None, null="255",
                  bins={"1": "Pass", "91": "Fail", "92": "Fail"}, cols=4)
    for name, text in {"dec": dec, "hex": hexa, "int2": int2, "notype": no_type}.items():
        np.testing.assert_array_equal(die_maps(read_g85(write(tmp_path / f"{name}.xml", text)))[0], want,
                                      err_msg=name)


def test_g85_reads_folders_and_lists(tmp_path: Path) -> None:
    write(tmp_path / "a.xml", ASCII_G85)
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "b.xml", g85(["1X"], bin_type="ASCII", null=".", bins={"1": "Pass", "X": "Fail"}, cols=2,
                             wafer="W03"))
    assert read_g85(tmp_path).column("wafer_id").to_pylist() == ["W01", "W02", "W03"]
    assert read_g85([sub / "b.xml", tmp_path / "a.xml"]).num_rows == 3
    assert read_any(tmp_path).num_rows == 3 and detect_format(tmp_path) == "g85"


@pytest.mark.parametrize("text, match", [
    (g85(["1Z"], bin_type="ASCII", null=".", bins={"1": "Pass"}, cols=2),
     r"wafer 'W': bin code\(s\) 'Z' appear in the map but have no Bin definition"),
    (g85(["001 300"], bin_type="Decimal", null="255", bins={"001": "Pass"}, cols=2),
     r"bin code\(s\) 300 appear"),
    (g85(["1X1", "1X"], bin_type="ASCII", null=".", bins={"1": "Pass", "X": "Fail"}, cols=3),
     r"rows hold \[2, 3\] dies, expected 3 per row"),
    (g85(["1X"], bin_type="ASCII", null=".", bins={"1": "Pass", "X": "Ink"}, cols=2),
     r"bin 'X' has BinQuality 'Ink'; only Pass or Fail"),
    (g85(["1X"], bin_type="ASCII", null=".", bins={"1": "Pass", "X": "Fail"}, cols=2).replace(' NullBin="."', ""),
     "no NullBin attribute"),
    (g85(["1X"], bin_type="Octal", null=".", bins={"1": "Pass"}, cols=2), "BinType 'Octal' is not one of"),
    (g85(["01 0G"], bin_type="HexaDecimal", null="FF", bins={"01": "Pass"}, cols=2),
     "HexaDecimal row is not a sequence of 2-digit hex codes"),
    (g85(["001 x"], bin_type="Decimal", null="255", bins={"001": "Pass"}, cols=2),
     "Decimal row holds something other than numbers"),
    (g85(["1X"], bin_type="ASCII", null=".", bins={"1": "Pass", "X": "Fail"}, cols=2).replace('Rows="1"', 'Rows="4"'),
     "declares Rows=4 but Data holds 1 rows"),
    ('<MapData xmlns="urn:semi-org:xsd.E142-1.V1005.SubstrateMap"/>', "SEMI E142"),
    ("<Wafers><Wafer/></Wafers>", "not a SEMI G85 wafer map"),
    ("<Maps><Map>", "not well-formed XML"),
    ('<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
     '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">'
     '<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">'
     '<!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;"><!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">]>'
     '<Maps><Map WaferId="&h;"/></Maps>', "not well-formed XML"),  # entity bomb: expat refuses it
])
def test_g85_rejects_bad_files_clearly(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ReaderError, match=match):
        read_g85(write(tmp_path / "bad.xml", text))


# -- dispatcher -------------------------------------------------------------------------------------------
def test_read_any_dispatches_by_extension_and_fmt(tmp_path: Path, lswmd: Path) -> None:
    maps, labels = mixed_arrays()
    npz = write_npz(tmp_path / "m.npz", maps, labels)
    xml = write(tmp_path / "g.xml", ASCII_G85)
    assert read_any(npz).num_rows == 4
    assert read_any(xml).num_rows == 2
    assert read_any(lswmd, trust=True).num_rows == 3
    renamed = tmp_path / "lswmd.bin"
    renamed.write_bytes(lswmd.read_bytes())
    with pytest.raises(ReaderError, match=r"cannot tell the format from '\.bin'; pass fmt="):
        read_any(renamed)
    assert read_any(renamed, fmt="wm811k", trust=True).num_rows == 3
    with pytest.raises(ReaderError, match="unknown format 'csv'"):
        read_any(renamed, fmt="csv")


def test_read_any_reads_parquet_wafer_tables(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    t = read_g85(write(tmp_path / "g.xml", ASCII_G85))
    pq.write_table(t, tmp_path / "t.parquet")
    assert read_any(tmp_path / "t.parquet").equals(t)


def test_reader_output_passes_validation(tmp_path: Path, lswmd: Path) -> None:
    validate = pytest.importorskip("fcn_core.validate")
    maps, labels = mixed_arrays()
    for t in (read_wm811k_pickle(lswmd, trust=True), read_mixedwm38(write_npz(tmp_path / "m.npz", maps, labels)),
              read_g85(write(tmp_path / "g.xml", ASCII_G85))):
        result = validate.validate_table(t, n_classes=5)
        assert result.quarantine.num_rows == 0, result.quarantine.to_pylist()
        assert result.valid.num_rows == t.num_rows
