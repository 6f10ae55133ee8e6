"""Package boundaries import-linter cannot see: dept_comm never touches torch.nn/torch.optim, except
that dept_comm.participant wraps a user's ``nn.Module`` (torch.nn there, never torch.optim)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_dept_comm_is_model_free() -> None:
    offenders = []
    participant = ROOT / "dept_comm" / "participant"
    for path in sorted((ROOT / "dept_comm").rglob("*.py")):
        forbidden = ("torch.optim",) if path.is_relative_to(participant) else ("torch.nn", "torch.optim")
        for name in _imports(path):
            if name.startswith(forbidden):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders


def test_importing_dept_comm_loads_no_model_or_apps() -> None:
    code = (
        "import sys, dept_comm, dept_comm.codecs;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('dept_model','dept_server','dept_worker','server','worker')];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
