"""The authoritative shared tensors: versions, digests, the outer step and the down-link update."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from dept_comm.codecs import Codec, get_codec
from dept_comm.codecs.feedback import ErrorFeedback
from dept_comm.digest import Group, TensorSpec, tensors_digest
from dept_comm.errors import ManifestMismatchError
from dept_comm.names import BODY_PREFIX, EMB_IDS, EMB_ROWS, EMB_WEIGHT, group_of
from dept_comm.outer import OuterOptimizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PullPlan:
    """What one pull sends: the tensors, how each is encoded, and the versions involved."""

    tensors: dict[str, torch.Tensor]
    groups: dict[str, Group]
    codec_for: Callable[[str, torch.Tensor], Codec]
    encoder: Callable[[str, torch.Tensor, Codec], bytes]
    is_delta: bool
    base_version: int
    base_digest: bytes
    target_version: int
    target_digest: bytes


class GlobalModel:
    """Shared body (and, for glob/trim, the global embedding matrix) held by the server.

    Down-link without drift: the outer update is encoded once with the down codec (with error
    feedback), the *decoded* update is added to the server's copy, and the same bytes go to every
    worker, which adds the same decoded values; the digest after each round proves it.
    """

    def __init__(
        self,
        *,
        variant: str,
        shared: dict[str, torch.Tensor],
        outer: OuterOptimizer,
        codec_down: str,
        version: int = 0,
    ) -> None:
        self.variant = variant
        self.shared = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in shared.items()}
        self.outer = outer
        self._codec_down = get_codec(codec_down)
        self._fp32 = get_codec("fp32")
        self._raw = get_codec("raw")
        self.feedback = ErrorFeedback(self._codec_down)
        self.version = version
        self.digest = self.shared_digest()
        self._replica_digests: dict[bytes, bytes] = {}  # trim: digest of the ids -> replica digest
        self._prev_digest = b""
        self._update: dict[str, torch.Tensor] | None = None
        self._update_bytes: dict[str, bytes] = {}

    def body_digest(self) -> bytes:
        """xxh3-128 of the body tensors alone (reported beside the round digest)."""
        return tensors_digest({k: v for k, v in self.shared.items() if k.startswith(BODY_PREFIX)})

    def shared_digest(self) -> bytes:
        """The round digest: xxh3-128 of every shared tensor (the body, and GLOB/TRIM's global
        embedding matrix), as the server holds them after each round."""
        return tensors_digest(self.shared)

    def replica_tensors(self, row_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """What one worker's replica holds of the shared state, exactly as the server holds it.

        GLOB and SPEC replicas hold every shared tensor; a TRIM replica holds the body and the
        rows of its own vocabulary (``emb.rows`` with their global ids ``emb.ids``).
        """
        if self.variant != "trim":
            return self.shared
        out = {k: v for k, v in self.shared.items() if k != EMB_WEIGHT}
        if row_ids is not None:
            out[EMB_ROWS] = self.shared[EMB_WEIGHT].index_select(0, row_ids)
            out[EMB_IDS] = row_ids
        return out

    def replica_digest(self, row_ids: torch.Tensor | None) -> bytes:
        """The digest a worker's replica must have at the current version (see replica_tensors).

        Equal to the round digest except for TRIM, where it covers the worker's own rows; those
        are cached per version and vocabulary, so each pull and push hashes the body once at most.
        """
        if self.variant != "trim":
            return self.digest
        key = tensors_digest({EMB_IDS: row_ids}) if row_ids is not None else b""
        cached = self._replica_digests.get(key)
        if cached is None:
            cached = tensors_digest(self.replica_tensors(row_ids))
            self._replica_digests[key] = cached
        return cached

    # -- what crosses the wire -------------------------------------------------------------
    def group_of(self, name: str) -> Group:
        return group_of(name)

    @property
    def body_numel(self) -> int:
        return sum(t.numel() for k, t in self.shared.items() if k.startswith(BODY_PREFIX))

    def upload_manifest(self, row_ids: torch.Tensor | None) -> dict[str, TensorSpec]:
        """The tensors a worker's update must contain, with shapes and dtypes."""
        manifest = {
            name: TensorSpec(name, tuple(t.shape), torch.float32, self.group_of(name))
            for name, t in self.shared.items()
        }
        if self.variant == "trim":
            if row_ids is None:
                raise ManifestMismatchError("trim worker has not declared its vocabulary rows (pull first)")
            del manifest[EMB_WEIGHT]
            dim = self.shared[EMB_WEIGHT].shape[1]
            n = int(row_ids.numel())
            manifest[EMB_ROWS] = TensorSpec(EMB_ROWS, (n, dim), torch.float32, Group.EMBEDDINGS)
            manifest[EMB_IDS] = TensorSpec(EMB_IDS, (n,), torch.int64, Group.EMBEDDINGS)
        return manifest

    def check_row_ids(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Validate a trim worker's declared global ids: 1-D, in range, sorted and unique."""
        vocab = self.shared[EMB_WEIGHT].shape[0]
        ids = row_ids.to(torch.int64).flatten()
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ManifestMismatchError(f"embedding row ids must be non-empty and in [0, {vocab})")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ManifestMismatchError("embedding row ids must be sorted and unique")
        return ids

    def pull_plan(self, *, have_version: int, full: bool, row_ids: torch.Tensor | None) -> PullPlan:
        """Plan a pull: the encoded outer update when the worker is one version behind, else full."""
        delta = not full and self._update is not None and have_version == self.version - 1
        if delta:
            assert self._update is not None
            tensors = {
                k: v for k, v in self._update.items() if not (self.variant == "trim" and k == EMB_WEIGHT)
            }
        else:
            tensors = {
                k: v for k, v in self.shared.items() if not (self.variant == "trim" and k == EMB_WEIGHT)
            }
        if self.variant == "trim" and row_ids is not None:
            # Trim rows travel as current values (lossless), so a worker's rows equal the server's.
            tensors[EMB_ROWS] = self.shared[EMB_WEIGHT].index_select(0, row_ids)
            tensors[EMB_IDS] = row_ids
        cached = self._update_bytes if delta else {}

        def codec_for(name: str, t: torch.Tensor) -> Codec:
            if name == EMB_IDS:
                return self._raw
            return self._codec_down if name in cached else self._fp32

        def encoder(name: str, t: torch.Tensor, codec: Codec) -> bytes:
            return cached[name] if name in cached else codec.encode(t)

        return PullPlan(
            tensors=tensors,
            groups={k: self.group_of(k) for k in tensors},
            codec_for=codec_for,
            encoder=encoder,
            is_delta=delta,
            base_version=have_version if delta else 0,
            base_digest=self._prev_digest if delta else b"",
            target_version=self.version,
            target_digest=self.replica_digest(row_ids),
        )

    # -- the outer step ----------------------------------------------------------------------
    def apply_round(self, mean_delta: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Run the outer optimizer on the averaged deltas, encode, apply the decoded update.

        ``mean_delta`` holds the averaged worker deltas by shared tensor name; for trim,
        ``emb.weight`` is a dense delta that is zero on rows no chosen source had.
        Returns the encoded byte count of the update per tensor.
        """
        update = self.outer.step({k: v for k, v in mean_delta.items() if k in self.shared})
        decoded: dict[str, torch.Tensor] = {}
        encoded: dict[str, bytes] = {}
        for name, u in update.items():
            data, dec = self.feedback.encode_with_decoded(name, u)
            encoded[name] = data
            decoded[name] = dec.to(torch.float32).reshape(self.shared[name].shape)
            self.shared[name].add_(decoded[name])
        self._prev_digest = self.digest
        self.version += 1
        self.digest = self.shared_digest()
        self._replica_digests = {}
        self._update, self._update_bytes = decoded, encoded
        logger.info("outer_step version=%d digest=%s", self.version, self.digest.hex()[:16])
        return {k: len(v) for k, v in encoded.items()}

    # -- persistence -------------------------------------------------------------------------
    def checkpoint_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "shared": dict(self.shared),
            "outer": dict(self.outer.state_dict()),
            "feedback": dict(self.feedback.state_dict()),
        }

    def restore(self, groups: Mapping[str, Mapping[str, torch.Tensor]], version: int) -> None:
        shared = groups["shared"]
        if set(shared) != set(self.shared):
            raise ManifestMismatchError("checkpoint tensors do not match the configured model")
        for name, t in shared.items():
            if tuple(t.shape) != tuple(self.shared[name].shape):
                raise ManifestMismatchError(f"checkpoint tensor {name} has shape {tuple(t.shape)}")
            self.shared[name].copy_(t)
        self.outer.load_state_dict(dict(groups.get("outer", {})))
        self.feedback.load_state_dict(dict(groups.get("feedback", {})))
        self.version = version
        self.digest = self.shared_digest()
        self._replica_digests = {}
        self._update, self._update_bytes, self._prev_digest = None, {}, b""
