"""What a participant keeps in its state dir so that, killed and restarted, it continues.

Everything is safetensors and JSON (no pickle), each file written atomically (temp file, fsync,
rename); ``progress.json`` goes last and names the round the rest belongs to.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


class TrainerFile(Protocol):
    """What writes the trainer file: a module's state (``ModuleFile``), a ``dept_model.Trainer``, or a
    DEPT node's replicas."""

    def save(self, path: str | os.PathLike[str], *, include_model: bool = True) -> None: ...


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically write a safetensors file (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ModuleFile:
    """The trainer file of a plain ``nn.Module``: its whole ``state_dict`` (shared and local
    tensors, buffers included) as one safetensors file."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def save(self, path: str | os.PathLike[str], *, include_model: bool = True) -> None:
        """Write the module's state atomically (``include_model`` is accepted for the protocol)."""
        del include_model
        save_tensors(Path(path), {k: v.detach().clone() for k, v in self.module.state_dict().items()})

    def load(self, path: str | os.PathLike[str]) -> None:
        """Copy a saved state into the module in place (its parameters keep their identity)."""
        device = next((t.device for t in self.module.state_dict().values()), torch.device("cpu"))
        self.module.load_state_dict(load_file(str(path), device=str(device)), strict=True)


class WorkerState:
    """Files under the state dir: the trainer file (model incl. local tensors, perhaps the inner
    optimizer), error-feedback residuals, and progress (round, data position, participant state).

    ``progress.json`` is written last and names the round the rest belongs to, so a kill
    between files leaves the previous consistent set recognisable.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.dir.glob(".*.tmp"):
            leftover.unlink()

    def save(
        self,
        *,
        round_idx: int,
        trainer: TrainerFile,
        feedback: dict[str, torch.Tensor],
        data: Mapping[str, Any],
        participant: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the trainer file, the residuals and then the progress naming them (with the data
        position ``data`` and, if given, the participant's JSON state)."""
        tag = f"{round_idx:06d}"
        trainer.save(self.dir / f"trainer-{tag}.safetensors", include_model=True)
        save_tensors(self.dir / f"feedback-{tag}.safetensors", feedback)
        progress: dict[str, Any] = {"round_idx": round_idx, "tag": tag, "data": dict(data)}
        if participant is not None:
            progress["participant"] = dict(participant)
        _atomic_write_bytes(self.dir / "progress.json", json.dumps(progress).encode())
        for old in self.dir.glob("*-*.safetensors"):
            if not old.stem.endswith(tag):
                old.unlink()

    def record_digest(self, version: int, body_digest_hex: str, digest_hex: str) -> None:
        """Append the digests of each pulled and verified version (proof of bit-identical replicas):
        the body's alone, and the replica's whole shared state (what the pull was verified against)."""
        row = {"version": version, "body_digest": body_digest_hex, "digest": digest_hex}
        with open(self.dir / "digests.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or None when the directory holds none."""
        path = self.dir / "progress.json"
        if not path.exists():
            return None
        progress = json.loads(path.read_text())
        tag = progress["tag"]
        out: dict[str, Any] = dict(progress)
        out["trainer_path"] = self.dir / f"trainer-{tag}.safetensors"
        out["feedback"] = load_file(str(self.dir / f"feedback-{tag}.safetensors"))
        logger.info("restored worker state round=%d from %s", progress["round_idx"], self.dir)
        return out
