"""--resume refuses a checkpoint written by a run with another variant or model, and leaves it be."""

from __future__ import annotations

from pathlib import Path

import pytest

from dept_comm.errors import ResumeMismatchError
from dept_comm.server.app import ServerApp
from dept_server.config import ServerConfig
from dept_server.serve import build_app


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _app(tmp_path: Path, **overrides: object) -> ServerApp:
    settings: dict[str, object] = {
        "port": 0, "rounds": 2, "workers": 1, "variant": "spec", "model": "tiny",
        "checkpoint_dir": tmp_path / "ckpt",
    }  # fmt: skip
    return build_app(ServerConfig(**(settings | overrides)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flag", "other"), [("variant", "spec-opt"), ("model", "small")], ids=["variant", "model"]
)
def test_resume_with_other_settings_is_refused(tmp_path: Path, flag: str, other: str) -> None:
    first = _app(tmp_path)
    first.save_checkpoint()
    mine = getattr(first.config, flag)
    first.close()
    before = _snapshot(tmp_path / "ckpt")

    with pytest.raises(ResumeMismatchError) as err:
        _app(tmp_path, resume=True, **{flag: other})
    message = str(err.value)
    assert f"--{flag}" in message and repr(mine) in message and repr(other) in message, message
    assert _snapshot(tmp_path / "ckpt") == before  # nothing written, nothing cleaned

    # The refusal released the directory: the run's own settings still resume from it.
    again = _app(tmp_path, resume=True)
    try:
        assert again.model.version == 0 and again.config.variant == "spec"
    finally:
        again.close()
