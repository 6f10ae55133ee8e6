"""dept_comm's public API: every name in ``__all__`` exists, is documented, and is typed."""

from __future__ import annotations

import inspect
from pathlib import Path

import dept_comm
import dept_comm.participant
import dept_comm.server


def test_every_public_name_exists_and_has_a_docstring() -> None:
    for module in (dept_comm, dept_comm.server, dept_comm.participant):
        assert module.__all__, module.__name__
        for name in module.__all__:
            obj = getattr(module, name)  # AttributeError: __all__ names something that is not there
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"


def test_public_methods_have_docstrings() -> None:
    for name in dept_comm.__all__:
        obj = getattr(dept_comm, name)
        if not inspect.isclass(obj):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_") or not (callable(value) or isinstance(value, property)):
                continue
            assert inspect.getdoc(value), f"dept_comm.{name}.{attr} has no docstring"


def test_the_package_says_it_is_typed() -> None:
    assert (Path(dept_comm.__file__).parent / "py.typed").is_file()
