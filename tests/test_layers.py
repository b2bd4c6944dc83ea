"""The layers of the package: data and partitioning never depend on the model, the trainer or the collectives.

``datasets/`` and ``partitioners/`` (installed as ``dist_egnn.datasets`` and ``dist_egnn.partitioners``)
may import each other, the glossary ``dist_egnn.keys`` and the user-error classes ``dist_egnn.errors``
(both leaves: they import nothing); nothing else of dist_egnn. Read from the
sources, so a lazy import inside a function counts too.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = ("dist_egnn.datasets", "dist_egnn.partitioners", "dist_egnn.keys", "dist_egnn.errors")


def project_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [n for n in names if n.split(".")[0] in ("dist_egnn", "datasets", "partitioners")]


@pytest.mark.parametrize("folder", ["datasets", "partitioners"])
def test_data_layers_import_only_data_layers(folder):
    files = sorted((ROOT / folder).glob("*.py"))
    assert files
    wrong = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in project_imports(f)
             if not name.startswith(ALLOWED)]
    assert not wrong, wrong


def test_no_top_level_datasets_package_is_installed():
    """``import datasets`` must find Hugging Face's (or nothing), never this project's folder, outside the repo."""
    import importlib.util
    import subprocess
    import sys

    code = "import importlib.util as u; s = u.find_spec('datasets'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert str(ROOT / "datasets") not in out.stdout
    assert importlib.util.find_spec("dist_egnn.datasets.store") is not None
