"""DEPT's hooks on the generic parameter server: the join check, resume identity, TRIM's rows, label.

``JoinRequest.attributes`` of schema ``dept/1`` carry ``dept.variant`` (unset: the server's) and
``dept.vocab_digest`` (hex; GLOB and TRIM workers must have the server's global vocabulary).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dept_comm.errors import ManifestMismatchError
from dept_comm.names import EMB_WEIGHT, group_of
from dept_comm.server import ServerHooks

from .config import ServerConfig

__all__ = ["ATTRIBUTES_SCHEMA", "RESUME_FLAGS", "dept_hooks"]

ATTRIBUTES_SCHEMA = "dept/1"  # JoinRequest.attributes: dept.variant, dept.vocab_digest (hex)
# How a checkpoint's identity keys are named when a --resume does not match.
RESUME_FLAGS = {"variant": "--variant", "model": "--model", "vocab_digest": "--vocab (digest)"}


class _Admission:
    """Refuse a worker of another attributes schema, variant, or (GLOB/TRIM) vocabulary."""

    def __init__(self, config: ServerConfig, vocab_digest: str) -> None:
        self._variant = config.variant
        self._shares_embeddings = config.shares_embeddings
        self._vocab_digest = vocab_digest

    def __call__(self, attributes: Mapping[str, str], schema: str) -> str:
        """Check a join's attributes; returns the worker's vocabulary digest (its registration)."""
        if attributes and schema != ATTRIBUTES_SCHEMA:
            raise ManifestMismatchError(
                f"join attributes of schema {schema!r}; this server reads {ATTRIBUTES_SCHEMA!r}"
            )
        variant = attributes.get("dept.variant", "") or self._variant  # unset: the server's variant
        if variant != self._variant:
            raise ManifestMismatchError(f"server runs variant {self._variant}, worker asked for {variant}")
        worker_vocab = attributes.get("dept.vocab_digest", "")
        if self._shares_embeddings and worker_vocab != self._vocab_digest:
            raise ManifestMismatchError(
                f"vocabulary digest mismatch: the server's global tokenizer is {self._vocab_digest[:16]}...,"
                f" the worker's is {worker_vocab[:16]}...; pass the server's --vocab file to the worker"
            )
        return worker_vocab


def dept_hooks(config: ServerConfig, vocab_digest: str, run_info: Mapping[str, Any]) -> ServerHooks:
    """The hooks that make the generic server dept-server: DEPT's join check, the run
    description (``dept_server.initial.describe_run``), the checkpoint identity (variant, model,
    vocabulary digest), TRIM's per-worker embedding rows, ``body.``/``emb.`` accounting groups
    and the variant as the metrics label."""
    return ServerHooks(
        admit=_Admission(config, vocab_digest),
        run_info=dict(run_info),
        resume_identity={"variant": config.variant, "model": config.model, "vocab_digest": vocab_digest},
        resume_labels=RESUME_FLAGS,
        row_subset=EMB_WEIGHT if config.variant == "trim" else None,
        group_of=group_of,
        label=config.variant,
    )
