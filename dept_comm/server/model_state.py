"""The authoritative shared tensors: versions, digests, the outer step and the down-link update."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch

from dept_comm.codecs import get_codec
from dept_comm.codecs.feedback import ErrorFeedback
from dept_comm.digest import Group, TensorSpec, tensors_digest
from dept_comm.errors import ManifestMismatchError
from dept_comm.names import EMB_IDS, EMB_ROWS, default_group_of
from dept_comm.outer import OuterOptimizer
from dept_comm.streaming import StreamConfig

from .downlink import Downlink

logger = logging.getLogger(__name__)


class GlobalModel:
    """The global tensors held by the server (DEPT: the shared body and, for glob/trim, the global
    embedding matrix; any named tensors otherwise).

    ``row_subset`` names a 2-D tensor of which each worker holds (and sends) only its own rows
    (DEPT TRIM's ``emb.weight``); ``group_of`` gives each tensor's accounting group, and the
    ``Group.BODY`` tensors are "the body" of ``body_numel`` and ``body_digest``.

    Down-link without drift: the outer update is encoded once with the down codec (with error
    feedback), the *decoded* update is added to the server's copy, and the same bytes go to every
    worker, which adds the same decoded values; the digest after each round proves it.
    """

    def __init__(
        self,
        *,
        shared: dict[str, torch.Tensor],
        outer: OuterOptimizer,
        codec_down: str,
        version: int = 0,
        copy: bool = True,
        row_subset: str | None = None,
        group_of: Callable[[str], Group] | None = None,
    ) -> None:
        """``copy=False``: take the caller's fp32 contiguous tensors as they are (the caller keeps
        no reference and never writes them), instead of one copy of the body more at start."""
        if row_subset is not None and (row_subset not in shared or shared[row_subset].dim() != 2):
            raise ValueError(f"row subset {row_subset!r} must name a 2-D tensor of the model")
        self.row_subset = row_subset
        self._group_of = group_of if group_of is not None else default_group_of(row_subset)
        self.shared = {
            k: (
                v.detach().to(torch.float32).contiguous().clone()
                if copy
                else v.detach().to(torch.float32).contiguous()
            )
            for k, v in shared.items()
        }
        self.outer = outer
        self._codec_down = get_codec(codec_down)
        self._fp32 = get_codec("fp32")
        self._raw = get_codec("raw")
        self.feedback = ErrorFeedback(self._codec_down)
        self.version = version
        self.digest = self.shared_digest()
        self._stream_config = StreamConfig()
        self.downlink = self._build_downlink(prev_digest=b"", delta=None)

    def _build_downlink(self, *, prev_digest: bytes, delta: Mapping[str, bytes] | None) -> Downlink:
        return Downlink(
            row_subset=self.row_subset,
            group_of=self._group_of,
            version=self.version,
            shared=self.shared,
            digest=self.digest,
            prev_digest=prev_digest,
            delta=delta,
            codec_down=self._codec_down,
            config=self._stream_config,
        )

    def body_digest(self) -> bytes:
        """xxh3-128 of the body group's tensors alone (reported beside the round digest)."""
        return tensors_digest({k: v for k, v in self.shared.items() if self.group_of(k) == Group.BODY})

    def shared_digest(self) -> bytes:
        """The round digest: xxh3-128 of every global tensor (DEPT: the body, and GLOB/TRIM's
        global embedding matrix), as the server holds them after each round."""
        return tensors_digest(self.shared)

    def replica_tensors(self, row_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """What one worker's replica holds of the shared state, exactly as the server holds it.

        Replicas hold every global tensor, except with a row subset (DEPT TRIM): then every
        other tensor and the worker's own rows (``emb.rows`` with their global ids ``emb.ids``).
        """
        return self.downlink.replica_tensors(row_ids)

    def replica_digest(self, row_ids: torch.Tensor | None) -> bytes:
        """The digest a worker's replica must have at the current version (see replica_tensors).

        Equal to the round digest except with a row subset, where it covers the worker's own
        rows; those are cached per version and set of rows, so each pull and push hashes the body once at most.
        """
        return self.downlink.replica_digest(row_ids)

    # -- what crosses the wire -------------------------------------------------------------
    def group_of(self, name: str) -> Group:
        """The accounting group of a tensor name."""
        return self._group_of(name)

    @property
    def body_numel(self) -> int:
        """Elements of the body group's tensors."""
        return sum(t.numel() for k, t in self.shared.items() if self.group_of(k) == Group.BODY)

    def upload_manifest(self, row_ids: torch.Tensor | None) -> dict[str, TensorSpec]:
        """The tensors a worker's update must contain, with shapes and dtypes."""
        manifest = {
            name: TensorSpec(name, tuple(t.shape), torch.float32, self.group_of(name))
            for name, t in self.shared.items()
        }
        if self.row_subset is not None:
            if row_ids is None:
                raise ManifestMismatchError("trim worker has not declared its vocabulary rows (pull first)")
            del manifest[self.row_subset]
            dim = self.shared[self.row_subset].shape[1]
            n = int(row_ids.numel())
            manifest[EMB_ROWS] = TensorSpec(EMB_ROWS, (n, dim), torch.float32, Group.EMBEDDINGS)
            manifest[EMB_IDS] = TensorSpec(EMB_IDS, (n,), torch.int64, Group.EMBEDDINGS)
        return manifest

    def check_row_ids(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Validate a worker's declared row ids of the row subset (TRIM: its vocabulary's global
        ids): 1-D, in range, sorted and unique."""
        assert self.row_subset is not None
        vocab = self.shared[self.row_subset].shape[0]
        ids = row_ids.to(torch.int64).flatten()
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ManifestMismatchError(f"embedding row ids must be non-empty and in [0, {vocab})")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ManifestMismatchError("embedding row ids must be sorted and unique")
        return ids

    # -- the outer step ----------------------------------------------------------------------
    def apply_round(
        self, mean_delta: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> dict[str, int]:
        """Run the outer optimizer on the averaged deltas, encode, apply the decoded update.

        ``mean_delta`` holds the averaged worker deltas by shared tensor name (a mapping, or
        pairs produced one at a time, e.g. ``RoundAggregate.take_means()``); a row subset's
        delta is dense, zero on rows no contributing worker had.

        Tensor by tensor: the outer step, the encode with error feedback, and a *new* tensor
        ``old + decoded`` (the old one may still be streaming to a pull; it goes when nothing
        holds it). Nothing of the size of the whole body is allocated besides the new tensors.
        Then the down-link of the new version is built. Returns the encoded bytes per tensor.
        """
        pairs = mean_delta.items() if isinstance(mean_delta, Mapping) else mean_delta
        new_shared = dict(self.shared)
        encoded: dict[str, bytes] = {}
        steps_before = self.outer.num_steps
        for name, mean in pairs:
            if name not in self.shared:
                continue
            (u,) = self.outer.step({name: mean}).values()
            del mean
            data, dec = self.feedback.encode_with_decoded(name, u)
            del u
            encoded[name] = data
            new_shared[name] = torch.add(
                self.shared[name], dec.to(torch.float32).reshape(self.shared[name].shape)
            )
            del dec
        self.outer.num_steps = steps_before + 1  # one outer step per round, however many tensors
        self.shared = new_shared
        prev_digest = self.digest
        self.version += 1
        self.digest = self.shared_digest()
        self.downlink = self._build_downlink(prev_digest=prev_digest, delta=encoded)
        logger.info("outer_step version=%d digest=%s", self.version, self.digest.hex()[:16])
        return {k: len(v) for k, v in encoded.items()}

    # -- persistence -------------------------------------------------------------------------
    def checkpoint_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "shared": dict(self.shared),
            "outer": dict(self.outer.state_dict()),
            "feedback": self.feedback.residuals(),
        }

    def restore(self, groups: Mapping[str, Mapping[str, torch.Tensor]], version: int) -> None:
        shared = groups["shared"]
        if set(shared) != set(self.shared):
            raise ManifestMismatchError("checkpoint tensors do not match the configured model")
        for name, t in shared.items():
            if tuple(t.shape) != tuple(self.shared[name].shape):
                raise ManifestMismatchError(f"checkpoint tensor {name} has shape {tuple(t.shape)}")
        self.shared = {
            name: shared[name].detach().to(torch.float32).contiguous().clone() for name in self.shared
        }
        self.outer.load_state_dict(dict(groups.get("outer", {})))
        self.feedback.load_state_dict(dict(groups.get("feedback", {})))
        self.version = version
        self.digest = self.shared_digest()
        self.downlink = self._build_downlink(prev_digest=b"", delta=None)
