"""The worker's model: a bit-exact replica of the server's shared tensors plus private state."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from dept_comm.digest import tensors_digest
from dept_comm.errors import CommitMismatchError
from dept_comm.names import BODY_PREFIX, EMB_IDS, EMB_ROWS, EMB_WEIGHT
from dept_comm.streaming import StreamOpenInfo
from dept_model import DeptModel

logger = logging.getLogger(__name__)


class Replica:
    """Holds the last pulled shared tensors in fp32, exactly as the server has them, on the
    model's device (on a GPU, the update is computed and quantised there and only packed bytes
    reach the host; float32 additions give the same bits on either device).

    The local model trains away from them for one round; the update sent back is the
    difference. Pulls are applied to the replica first (``+=`` for deltas, the same float32
    addition the server does), verified against the digest of every shared tensor the server
    holds for this replica (body, and GLOB's matrix or TRIM's rows), then loaded into the model.
    """

    def __init__(self, model: DeptModel, variant: str) -> None:
        self.model = model
        self.variant = variant
        self.device = model.embeddings.weight.device
        self.tensors: dict[str, torch.Tensor] = {}
        self.version = -1

    def body_digest(self) -> bytes:
        """xxh3-128 of the body tensors alone."""
        return tensors_digest({k: v for k, v in self.tensors.items() if k.startswith(BODY_PREFIX)})

    def digest(self) -> bytes:
        """xxh3-128 of everything this replica shares with the server: the body, and GLOB's
        embedding matrix or TRIM's rows with their ids. Pulls are verified against it."""
        return tensors_digest(self.tensors)

    def apply_pull(self, info: StreamOpenInfo, tensors: Mapping[str, torch.Tensor]) -> None:
        """Apply a verified pull stream; raises CommitMismatchError if the digest disagrees."""
        if info.is_delta:
            if info.base_version != self.version:
                raise CommitMismatchError(
                    f"delta from version {info.base_version}, replica holds {self.version}"
                )
            for name, t in tensors.items():
                if name in (EMB_ROWS, EMB_IDS):
                    continue
                self.tensors[name].add_(t.to(self.device, torch.float32).reshape(self.tensors[name].shape))
        else:
            self.tensors = {
                k: v.to(self.device, torch.float32, copy=True)
                for k, v in tensors.items()
                if k not in (EMB_ROWS, EMB_IDS)
            }
        if EMB_ROWS in tensors:
            self.tensors[EMB_ROWS] = tensors[EMB_ROWS].to(self.device, torch.float32, copy=True)
            self.tensors[EMB_IDS] = tensors[EMB_IDS].to("cpu", torch.int64, copy=True)
        digest = self.digest()
        if digest != info.target_digest:
            self.version = -1
            raise CommitMismatchError(
                f"replica digest after pull {digest.hex()[:16]} != server's {info.target_digest.hex()[:16]}"
            )
        self.version = info.target_version
        self._load_into_model()

    def _load_into_model(self) -> None:
        body = {k.removeprefix(BODY_PREFIX): v for k, v in self.tensors.items() if k.startswith(BODY_PREFIX)}
        self.model.load_body_state(body)
        emb = self.model.embeddings
        with torch.no_grad():
            if EMB_WEIGHT in self.tensors:
                emb.weight.copy_(self.tensors[EMB_WEIGHT].to(emb.weight.device))
            if EMB_ROWS in self.tensors:
                emb.import_rows(
                    self.tensors[EMB_IDS].to(emb.weight.device), self.tensors[EMB_ROWS].to(emb.weight.device)
                )

    def delta(self) -> dict[str, torch.Tensor]:
        """What this round's training changed in the shared tensors (local - replica), fp32 on the
        replica's device (``emb.ids`` on the CPU)."""
        out: dict[str, torch.Tensor] = {}
        for name, value in self.model.body_state().items():
            key = BODY_PREFIX + name
            out[key] = value.detach().to(self.device, torch.float32) - self.tensors[key]
        if EMB_WEIGHT in self.tensors:
            out[EMB_WEIGHT] = (
                self.model.embeddings.weight.detach().to(self.device, torch.float32)
                - self.tensors[EMB_WEIGHT]
            )
        if EMB_ROWS in self.tensors:
            ids, rows = self.model.embeddings.export_rows()
            ids = ids.to("cpu", torch.int64)
            if not torch.equal(ids, self.tensors[EMB_IDS]):
                raise CommitMismatchError("local embedding rows no longer match the pulled ids")
            out[EMB_ROWS] = rows.detach().to(self.device, torch.float32) - self.tensors[EMB_ROWS]
            out[EMB_IDS] = ids
        return out
