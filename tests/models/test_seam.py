"""The model maths depends on parallelism only through the seam: no torch.distributed behind dist_egnn.models.

``import torch`` itself loads ``torch.distributed``, so the check reads the sources: it follows every
project module that ``dist_egnn.models`` imports, transitively, and fails if any of them imports
``torch.distributed`` (or ``from torch import distributed``).
"""
import ast
from pathlib import Path

import dist_egnn

PACKAGE = Path(dist_egnn.__file__).resolve().parent


def module_file(name: str) -> Path | None:
    """The source file of a dist_egnn module under dist_egnn/ (None: not one of ours, or mapped elsewhere)."""
    if not name.startswith("dist_egnn"):
        return None
    rel = Path(*name.split(".")[1:])
    for candidate in (PACKAGE / rel / "__init__.py", (PACKAGE / rel).with_suffix(".py")):
        if candidate.is_file():
            return candidate
    if name.startswith(("dist_egnn.datasets", "dist_egnn.partitioners")):
        import importlib.util

        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:                        # `from module import name`: not a module
            return None
        return Path(spec.origin) if spec and spec.origin else None
    return None


def imports_of(path: Path) -> tuple[set[str], list[str]]:
    """(project modules imported, offending torch.distributed imports) of one source file."""
    ours, bad = set(), []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "torch.distributed" or name.startswith("torch.distributed."):
                bad.append(f"{path}: imports {name}")
            if name.startswith("dist_egnn"):
                ours.add(name)
    return ours, bad


def closure(start: str) -> tuple[set[Path], list[str]]:
    seen, bad, todo = set(), [], [start]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        ours, offending = imports_of(path)
        bad += offending
        todo += sorted(ours)
    return seen, bad


def test_models_never_import_torch_distributed():
    files, bad = closure("dist_egnn.models")
    assert PACKAGE / "parallel" / "seam.py" in files      # the model does reach the seam ...
    assert PACKAGE / "parallel" / "collectives.py" not in files
    assert not bad, bad                                   # ... and nothing behind it imports torch.distributed


def test_the_check_sees_an_offending_import():
    """The check itself can fail: the collectives, which do import torch.distributed, are caught."""
    _, bad = closure("dist_egnn.parallel.collectives")
    assert any("torch.distributed" in b for b in bad)
