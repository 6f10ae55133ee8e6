"""ServerHooks: what a trainer adds to the generic parameter server (all optional).

The server runs rounds over any named tensors; a hook decides who may join (from the opaque
``JoinRequest.attributes``), what workers are told at join, what a checkpoint must match to be
resumed, which 2-D tensor participants hold only rows of, and what happens after each round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dept_comm.accounting import RoundMetrics
from dept_comm.digest import Group
from dept_comm.errors import ResumeMismatchError
from dept_comm.names import default_group_of

__all__ = ["ServerHooks", "accept_any", "check_resume_identity", "default_group_of"]

Admit = Callable[[Mapping[str, str], str], "str | None"]
RoundClosed = Callable[[RoundMetrics, Mapping[str, torch.Tensor]], None]


def accept_any(attributes: Mapping[str, str], schema: str) -> str | None:
    """The default join check: every participant is welcome, whatever its attributes."""
    return None


def check_resume_identity(
    meta: Mapping[str, Any], identity: Mapping[str, str], labels: Mapping[str, str] | None = None
) -> None:
    """Refuse to resume a checkpoint whose identity differs from this server's.

    Only keys the checkpoint holds are compared; each differing key is named (by ``labels[key]``
    if given, e.g. the flag that sets it, else the key itself).

    Raises:
        ResumeMismatchError: naming the checkpoint's value and this server's, for each that differs.
    """
    names = labels or {}
    differ = [
        f"{names.get(k, k)}: checkpoint {meta.get(k)!r}, this server {v!r}"
        for k, v in identity.items()
        if k in meta and meta[k] != v
    ]
    if differ:
        raise ResumeMismatchError(
            "cannot --resume: the checkpoint was made by another run ("
            + "; ".join(differ)
            + "). Start with the same settings, or use another --checkpoint-dir."
        )


@dataclass(frozen=True, kw_only=True)
class ServerHooks:
    """What a trainer adds to the generic server; every field is optional.

    Attributes:
        admit: called at each join with ``JoinRequest.attributes`` and ``attributes_schema``;
            raise ``dept_comm.errors.ManifestMismatchError`` to refuse the join (the worker gets
            FAILED_PRECONDITION with the message). It may return a registration key (e.g. the
            worker's vocabulary digest): a worker name that joins again with another key is
            refused (``ConflictError``). Default: accept anything (no key).
        run_info: JSON-able description sent to every worker at join
            (``JoinReply.run_config_json``). Default: rounds, codecs, tensor count, parameters
            and ``full_model_fp32_bytes`` (4 bytes per element of every tensor).
        resume_identity: key -> value a checkpoint must match to be resumed (saved in every
            checkpoint's metadata); a difference raises ``ResumeMismatchError`` naming the keys.
        resume_labels: how each ``resume_identity`` key is named in that message (e.g. its flag).
        row_subset: the name of a 2-D tensor of which each participant holds only some rows,
            named in ``PullRequest.row_ids``; they stream as ``emb.rows`` and ``emb.ids`` and are
            averaged per row over the participants that hold it. None: every participant holds
            every tensor.
        group_of: the accounting group of a tensor name (``Group.BODY`` tensors are the shared
            body: ``uncompressed_body_bytes``, ``body_digest``). Default: ``default_group_of``.
        label: the run's label in metrics (``RoundMetrics.variant``).
        on_round_closed: called after each round closed (and was checkpointed) with its metrics
            and the new global tensors (read-only: the server's own, never changed afterwards).
    """

    admit: Admit = accept_any
    run_info: Mapping[str, Any] | None = None
    resume_identity: Mapping[str, str] = field(default_factory=dict)
    resume_labels: Mapping[str, str] = field(default_factory=dict)
    row_subset: str | None = None
    group_of: Callable[[str], Group] | None = None
    label: str = ""
    on_round_closed: RoundClosed | None = None

    def groups(self) -> Callable[[str], Group]:
        """``group_of``, or the default for ``row_subset``."""
        return self.group_of if self.group_of is not None else default_group_of(self.row_subset)
