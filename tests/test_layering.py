"""The one direction of imports: import-linter's contracts in pyproject.toml, and no side effects at import.

flows > tasks > tracking > fcn_core; fcn_core imports no Prefect, MLflow, tasks, tracking or flows;
tracking imports no Prefect, tasks or flows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import fcn_core

ROOT = Path(fcn_core.__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("fcn_core", "tracking", "tasks", "flows")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_contracts_cover_every_package_and_forbid_what_they_should():
    linter = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = {c["id"]: c for c in linter["contracts"]}
    assert contracts["layers"]["layers"] == ["flows", "tasks", "tracking", "fcn_core"]
    assert {"prefect", "mlflow", "tasks", "tracking", "flows"} <= set(contracts["pure-core"]["forbidden_modules"])
    assert {"prefect", "tasks", "flows"} <= set(contracts["tracking-without-orchestration"]["forbidden_modules"])
    assert set(linter["root_packages"]) == set(PACKAGES)


def test_the_tree_keeps_its_import_contracts():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module,source,contract", [
    ("fcn_core/leak.py", "import mlflow\n", "fcn_core is the pure library"),
    ("fcn_core/upward.py", "from tracking import store\n", "fcn_core is the pure library"),
    ("tracking/orchestrated.py", "import prefect\n", "tracking talks to MLflow only"),
    ("tasks/upward.py", "import flows.cli\n", "no layer imports a layer above it"),
])
def test_a_broken_contract_fails_the_check(tmp_path, module, source, contract):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / module).write_text(source)
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert re.search(rf"{re.escape(contract)}.* BROKEN$", out.stdout, re.MULTILINE), out.stdout[-3000:]


def test_importing_fcn_core_modules_loads_no_orchestration():
    code = ("import sys, importlib, pkgutil, fcn_core\n"
            "for m in pkgutil.iter_modules(fcn_core.__path__): importlib.import_module('fcn_core.' + m.name)\n"
            "bad = [m for m in ('prefect', 'mlflow') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
