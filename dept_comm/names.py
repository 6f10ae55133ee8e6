"""Tensor names on the ParameterServer protocol, shared by every server and worker that speaks it.

A stream's tensors are keyed by these names, so both ends must spell them alike: the shared
transformer body under ``body.``, and a data source's share of the embeddings, which depends on
the variant: the whole matrix (GLOB), or the rows of the source's vocabulary with their global
ids (TRIM). Variants that keep embeddings private (SPEC) send only ``body.`` tensors.
"""

from __future__ import annotations

from collections.abc import Callable

from dept_comm.digest import Group

__all__ = ["BODY_PREFIX", "EMB_IDS", "EMB_ROWS", "EMB_WEIGHT", "default_group_of", "group_of"]

BODY_PREFIX = "body."
EMB_WEIGHT = "emb.weight"  # glob: the whole global matrix
EMB_ROWS = "emb.rows"  # trim: the rows of the worker's vocabulary V_k
EMB_IDS = "emb.ids"  # trim: their global token ids


def group_of(name: str) -> Group:
    """The accounting group of a protocol tensor: the body, or (everything else) the embeddings."""
    return Group.BODY if name.startswith(BODY_PREFIX) else Group.EMBEDDINGS


def default_group_of(row_subset: str | None = None) -> Callable[[str], Group]:
    """The accounting group of each tensor name for a trainer that is not DEPT: the row-subset
    tensor (if any) and its streamed rows and ids (``emb.rows``, ``emb.ids``) are embeddings;
    every other tensor is the shared body. The server and its participants must use the same
    function: a header whose group differs from the server's manifest is refused."""
    rows = {EMB_ROWS, EMB_IDS} | ({row_subset} if row_subset is not None else set())

    def by_name(name: str) -> Group:
        return Group.EMBEDDINGS if name in rows else Group.BODY

    return by_name
