"""Tensor names on the ParameterServer protocol, shared by every server and worker that speaks it.

A stream's tensors are keyed by these names, so both ends must spell them alike: the shared
transformer body under ``body.``, and a data source's share of the embeddings, which depends on
the variant: the whole matrix (GLOB), or the rows of the source's vocabulary with their global
ids (TRIM). Variants that keep embeddings private (SPEC) send only ``body.`` tensors.
"""

from __future__ import annotations

from dept_comm.digest import Group

__all__ = ["BODY_PREFIX", "EMB_IDS", "EMB_ROWS", "EMB_WEIGHT", "group_of"]

BODY_PREFIX = "body."
EMB_WEIGHT = "emb.weight"  # glob: the whole global matrix
EMB_ROWS = "emb.rows"  # trim: the rows of the worker's vocabulary V_k
EMB_IDS = "emb.ids"  # trim: their global token ids


def group_of(name: str) -> Group:
    """The accounting group of a protocol tensor: the body, or (everything else) the embeddings."""
    return Group.BODY if name.startswith(BODY_PREFIX) else Group.EMBEDDINGS
