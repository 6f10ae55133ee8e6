"""A participant's replica: a bit-exact fp32 copy of the server's shared tensors."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from dept_comm.digest import tensors_digest
from dept_comm.errors import CommitMismatchError
from dept_comm.names import EMB_ROWS
from dept_comm.streaming import StreamOpenInfo

from .view import SharedView

__all__ = ["Replica"]

logger = logging.getLogger(__name__)


class Replica:
    """Holds the last pulled shared tensors in fp32, exactly as the server has them, on the
    view's device (on a GPU, the update is computed and quantised there and only packed bytes
    reach the host; float32 additions give the same bits on either device).

    The local model trains away from them for one round; the update sent back is the
    difference. Pulls are applied to the replica first (``+=`` for deltas, the same float32
    addition the server does; integer index tensors such as ``emb.ids`` are copied, and a row
    subset such as ``emb.rows`` replaced), verified against the digest of every shared tensor
    the server holds for this replica, then loaded into the model through the view.
    """

    REPLACED = frozenset({EMB_ROWS})  # float tensors a pull always sends whole (never as a delta)

    def __init__(self, view: SharedView) -> None:
        self.view = view
        self.device = view.device
        self.tensors: dict[str, torch.Tensor] = {}
        self.version = -1

    def digest(self) -> bytes:
        """xxh3-128 of everything this replica shares with the server (``tensors_digest``);
        pulls are verified against it."""
        return tensors_digest(self.tensors)

    def _copy(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.to(self.device, torch.float32, copy=True)
        return t.to("cpu", torch.int64, copy=True)  # an index tensor (emb.ids)

    def apply_pull(self, info: StreamOpenInfo, tensors: Mapping[str, torch.Tensor]) -> None:
        """Apply a verified pull stream; raises CommitMismatchError if the digest disagrees."""
        if info.is_delta:
            if info.base_version != self.version:
                raise CommitMismatchError(
                    f"delta from version {info.base_version}, replica holds {self.version}"
                )
            for name, t in tensors.items():
                if name in self.REPLACED or not t.is_floating_point():
                    self.tensors[name] = self._copy(name, t)
                else:
                    self.tensors[name].add_(
                        t.to(self.device, torch.float32).reshape(self.tensors[name].shape)
                    )
        else:
            self.tensors = {k: self._copy(k, v) for k, v in tensors.items()}
        digest = self.digest()
        if digest != info.target_digest:
            self.version = -1
            raise CommitMismatchError(
                f"replica digest after pull {digest.hex()[:16]} != server's {info.target_digest.hex()[:16]}"
            )
        self.version = info.target_version
        self.load_into_model()

    def load_into_model(self) -> None:
        """Write the replica's values into the model (in place, through the view)."""
        self.view.load(self.tensors)

    def delta(self) -> dict[str, torch.Tensor]:
        """What training changed in the shared tensors (local - replica), fp32 on the replica's
        device; integer index tensors go as they are (on the CPU), and must still be the pulled ones.

        Raises:
            CommitMismatchError: an index tensor changed since the pull, or a shared tensor is missing.
        """
        local = self.view.shared()
        out: dict[str, torch.Tensor] = {}
        for name, base in self.tensors.items():
            value = local.get(name)
            if value is None:
                raise CommitMismatchError(f"the model no longer holds the shared tensor {name}")
            if not base.is_floating_point():
                ids = value.to("cpu", torch.int64)
                if not torch.equal(ids, base):
                    raise CommitMismatchError(f"local {name} no longer matches the pulled one")
                out[name] = ids
            else:
                out[name] = value.detach().to(self.device, torch.float32) - base
        return out
