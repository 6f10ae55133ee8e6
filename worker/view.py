"""DEPT's shared view of a DeptModel: the body, and GLOB's embedding matrix or TRIM's rows."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dept_comm.digest import tensors_digest
from dept_comm.names import BODY_PREFIX, EMB_IDS, EMB_ROWS, EMB_WEIGHT
from dept_comm.participant import Replica
from dept_model import DeptModel, Variant


class DeptView:
    """A ``dept_comm.participant.SharedView`` of a :class:`DeptModel` under ``variant``: the body's
    tensors as ``body.*``; with GLOB also ``emb.weight`` (the global matrix), with TRIM
    ``emb.rows`` and their global ids ``emb.ids`` (the rows of the source's vocabulary)."""

    def __init__(self, model: DeptModel, variant: str) -> None:
        self.model = model
        self.variant = Variant(variant)

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.weight.device

    def shared(self) -> dict[str, torch.Tensor]:
        out = self.body()
        emb = self.model.embeddings
        if self.variant == Variant.GLOB:
            out[EMB_WEIGHT] = emb.weight.detach()
        elif self.variant == Variant.TRIM:
            ids, rows = emb.export_rows()
            out[EMB_ROWS], out[EMB_IDS] = rows.detach(), ids
        return out

    def body(self) -> dict[str, torch.Tensor]:
        """The body's tensors, keyed ``body.*`` (what an overlapped round trains ahead)."""
        return {BODY_PREFIX + name: value for name, value in self.model.body_state().items()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        body = {k.removeprefix(BODY_PREFIX): v for k, v in tensors.items() if k.startswith(BODY_PREFIX)}
        self.model.load_body_state(body)
        emb = self.model.embeddings
        with torch.no_grad():
            if EMB_WEIGHT in tensors:
                emb.weight.copy_(tensors[EMB_WEIGHT].to(emb.weight.device))
            if EMB_ROWS in tensors:
                emb.import_rows(
                    tensors[EMB_IDS].to(emb.weight.device), tensors[EMB_ROWS].to(emb.weight.device)
                )


class DeptReplica(Replica):
    """The generic replica over a :class:`DeptView`, with the body's digest of its own."""

    def __init__(self, model: DeptModel, variant: str) -> None:
        self.dept = DeptView(model, variant)
        super().__init__(self.dept)
        self.model = model
        self.variant = variant

    def body_digest(self) -> bytes:
        """xxh3-128 of the body tensors alone."""
        return tensors_digest({k: v for k, v in self.tensors.items() if k.startswith(BODY_PREFIX)})
