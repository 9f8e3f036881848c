"""fcn_core is the pure library: no orchestration or tracking imports, no side effects at import."""

import ast
import subprocess
import sys
from pathlib import Path

import fcn_core

FORBIDDEN = {"prefect", "mlflow", "prefect_dask", "dask"}


def test_fcn_core_never_imports_prefect_or_mlflow():
    root = Path(fcn_core.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_fcn_core_modules_loads_no_orchestration():
    code = ("import sys, importlib, pkgutil, fcn_core\n"
            "for m in pkgutil.iter_modules(fcn_core.__path__): importlib.import_module('fcn_core.' + m.name)\n"
            "bad = [m for m in ('prefect', 'mlflow') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
