"""What a worker keeps in --state-dir so a killed worker restarted with the same flags continues."""

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
    """What writes the trainer file: a ``dept_model.Trainer``, or a node's replicas (worker.replicas)."""

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


class WorkerState:
    """Files under the state dir: model with private embeddings, inner optimizer, residuals, progress.

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
    ) -> None:
        """Write the trainer (model incl. private embeddings, AdamW state), residuals and progress."""
        tag = f"{round_idx:06d}"
        trainer.save(self.dir / f"trainer-{tag}.safetensors", include_model=True)
        save_tensors(self.dir / f"feedback-{tag}.safetensors", feedback)
        progress = {"round_idx": round_idx, "tag": tag, "data": dict(data)}
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


def single_process_position(data: Mapping[str, Any], where: Path) -> dict[str, int]:
    """The data position a single-process worker continues from: its own, or a 1-rank DDP node's
    (whose one shard is the whole stream); a node of more ranks, or an FSDP one, needs torchrun.

    Raises:
        ValueError: the state belongs to a node this process cannot continue.
    """
    ranks = data.get("ranks")
    if ranks is None:
        return dict(data)
    mode = data.get("parallel", "ddp")
    if len(ranks) == 1 and mode == "ddp":
        return dict(ranks[0])
    raise ValueError(
        f"{where} holds the state of a {len(ranks)}-rank {mode} node: run it under torchrun with "
        f"--nproc-per-node {len(ranks)} --parallel {mode}"
    )
