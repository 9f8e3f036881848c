"""The one atomic writer: all or nothing, no temporary file after a handled error, stale ones cleaned."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fcn_core.atomic import atomic_write, clean_stale_temps, temp_path, write_bytes_atomic


def test_replaces_the_target_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_bytes(b"new but broken")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["out.bin"]  # the handled error left no temporary file
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(target.parent) == ["out.bin"]


def test_a_folder_as_target_is_refused_before_writing(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"), atomic_write(tmp_path / "out") as tmp:
        tmp.write_bytes(b"x")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


def test_temp_names_are_hidden_per_process_and_unique(tmp_path):
    a, b = temp_path(tmp_path / "x.parquet"), temp_path(tmp_path / "x.parquet")
    assert a != b and a.parent == tmp_path
    assert a.name.startswith(".x.parquet.tmp-") and f"-{os.getpid()}-" in a.name and not a.name.endswith(".parquet")


def test_clean_stale_temps_removes_dead_writers_only(tmp_path):
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout)
    dead = tmp_path / f".out.parquet.tmp-{dead_pid}-deadbeef"
    mine = temp_path(tmp_path / "out.parquet")
    legacy_old, legacy_new = tmp_path / f".tmp-{'a' * 32}.parquet", tmp_path / f".tmp-{'b' * 32}.parquet"
    keep = [tmp_path / "out.parquet", tmp_path / ".out.parquet.tmp-notapid-deadbeef", mine, legacy_new]
    for p in [dead, legacy_old, *keep]:
        p.write_bytes(b"x")
    os.utime(legacy_old, (1, 1))  # written by an old version long ago
    assert sorted(clean_stale_temps(tmp_path)) == sorted([dead, legacy_old])
    assert all(p.exists() for p in keep)
    assert clean_stale_temps(tmp_path / "missing") == []
