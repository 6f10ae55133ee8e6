"""Tied input/output token embeddings, one kind per DEPT variant: global (GLOB/STD), trimmed (TRIM), private (SPEC)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the universal PyTorch alias)
from torch import nn

from dept_model.loss import IGNORE_INDEX, chunked_cross_entropy

# Shapes: B batch, T sequence, D model width, V global vocabulary, K rows held locally (V_k),
# R rows being imported or initialised.

_INIT_BLOCK_ROWS = 1024


def init_rows(ids_R: torch.Tensor, d_model: int, *, std: float, seed: int) -> torch.Tensor:
    """Deterministic N(0, std^2) rows for the given global ids, independent of which other ids are asked.

    Rows come from fixed blocks of ``_INIT_BLOCK_ROWS`` ids, each with its own generator, so a TRIM
    worker's rows equal the same rows of a GLOB matrix built with the same seed, without building
    the whole matrix.
    """
    ids_R = ids_R.to(torch.int64).cpu()
    out_RD = torch.empty(ids_R.numel(), d_model)
    block_R = ids_R // _INIT_BLOCK_ROWS
    for block in torch.unique(block_R).tolist():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + block) % (1 << 62))
        rows = torch.randn(_INIT_BLOCK_ROWS, d_model, generator=gen).mul_(std)
        sel_R = block_R == block
        out_RD[sel_R] = rows[ids_R[sel_R] % _INIT_BLOCK_ROWS]
    return out_RD


def _check_present(local_ids: torch.Tensor) -> None:
    """Refuse input ids the embedding does not hold (without a host sync on CUDA)."""
    if local_ids.device.type == "cuda":
        torch._assert_async((local_ids >= 0).all(), "input token id not held by these embeddings")
    elif bool((local_ids < 0).any()):
        raise ValueError("input token id not held by these embeddings (absent from V_k)")


class TiedEmbeddings(nn.Module):
    """A ``weight [K, D]`` used both to embed tokens and as the output softmax matrix.

    Every public method takes GLOBAL token ids (those of the tokenizer); subclasses decide how they
    map to local rows. ``private`` is True for embeddings that never leave the worker (SPEC).
    """

    private: bool = False

    def __init__(self, weight_KD: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(weight_KD)

    @property
    def d_model(self) -> int:
        """Embedding width."""
        return int(self.weight.shape[1])

    @property
    def num_rows(self) -> int:
        """Rows held locally (``V`` for full matrices, ``|V_k|`` for TRIM)."""
        return int(self.weight.shape[0])

    def local_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Local row of each global id, -1 where this embedding has no row for it."""
        inside = (ids >= 0) & (ids < self.num_rows)
        return torch.where(inside, ids, -1)

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Targets as local rows; ids without a row and ``IGNORE_INDEX`` become ``IGNORE_INDEX``."""
        return targets

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Embed global ids: ``[B, T] -> [B, T, D]``."""
        return F.embedding(ids_BT, self.weight)

    def logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Full logits over the local rows ``[B, T, K]`` (tests and generation; training uses :meth:`loss`)."""
        return F.linear(h_BTD, self.weight)

    def loss(
        self,
        h_BTD: torch.Tensor,
        targets_BT: torch.Tensor,
        *,
        reduction: str = "mean",
        chunk_tokens: int | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of global targets over the local rows, chunked over tokens."""
        local_N = self.local_targets(targets_BT).reshape(-1)
        h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])
        return chunked_cross_entropy(
            h_ND, self.weight, local_N, chunk_tokens=chunk_tokens, reduction=reduction
        )

    def global_ids(self) -> torch.Tensor:
        """Global id of each local row, int64 ``[K]``."""
        return torch.arange(self.num_rows, device=self.weight.device)

    def export_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global ids int64 [K], rows [K, D])``: detached copies, for sending or averaging."""
        return self.global_ids().clone(), self.weight.detach().clone()

    @torch.no_grad()
    def import_rows(self, ids_R: torch.Tensor, rows_RD: torch.Tensor, *, strict: bool = True) -> int:
        """Overwrite the rows of the given global ids in place (optimizer state is kept).

        Args:
            ids_R: global ids, int64 ``[R]``, no duplicates.
            rows_RD: new rows, ``[R, D]``.
            strict: raise if an id has no local row; otherwise such rows are skipped.

        Returns:
            How many rows were written.

        Raises:
            ValueError: on shape mismatch, duplicates, or (strict) ids not held here.
        """
        if ids_R.dim() != 1 or rows_RD.shape != (ids_R.numel(), self.d_model):
            raise ValueError(
                f"expected ids [R] and rows [R, {self.d_model}], got {tuple(ids_R.shape)}, {tuple(rows_RD.shape)}"
            )
        ids_R = ids_R.to(device=self.weight.device, dtype=torch.int64)
        if torch.unique(ids_R).numel() != ids_R.numel():
            raise ValueError("import_rows: duplicate ids")
        local_R = self.local_index(ids_R)
        held_R = local_R >= 0
        num_held = int(held_R.sum())
        if strict and num_held != ids_R.numel():
            missing = ids_R[~held_R][:8].tolist()
            raise ValueError(f"import_rows: {ids_R.numel() - num_held} ids not held here, e.g. {missing}")
        self.weight[local_R[held_R]] = rows_RD.to(self.weight)[held_R]
        return num_held


class GlobalEmbeddings(TiedEmbeddings):
    """The full ``[V, D]`` matrix of a shared tokenizer (GLOB and the STD baseline)."""

    def __init__(self, vocab_size: int, d_model: int, *, init_std: float = 0.02, seed: int = 0) -> None:
        if vocab_size < 1 or d_model < 1:
            raise ValueError(f"vocab_size and d_model must be >= 1, got {vocab_size}, {d_model}")
        ids = torch.arange(vocab_size)
        super().__init__(init_rows(ids, d_model, std=init_std, seed=seed), vocab_size)


class SpecEmbeddings(GlobalEmbeddings):
    """A private ``[V, D]`` matrix (SPEC, SPEC-OPT): drawn from ``seed`` when the source is first used, never sent.

    ``vocab_size`` is the global tokenizer's (SPEC) or the source's own tokenizer's (SPEC-OPT).
    """

    private = True

    def __init__(self, vocab_size: int, d_model: int, seed: int, *, init_std: float = 0.02) -> None:
        super().__init__(vocab_size, d_model, init_std=init_std, seed=seed)


class TrimEmbeddings(TiedEmbeddings):
    """Only the rows ``V_k`` of the global matrix that occur in this source (TRIM).

    Inputs are global ids, remapped through ``index_of`` (global id -> local row, -1 if absent).
    The softmax runs over ``V_k`` only; targets absent from ``V_k`` are ignored, and counted in the
    ``ignored_targets`` buffer (a device tensor, so counting never syncs).
    """

    index_of: torch.Tensor
    row_ids: torch.Tensor
    ignored_targets: torch.Tensor

    def __init__(
        self,
        global_ids: torch.Tensor,
        d_model: int,
        *,
        vocab_size: int | None = None,
        init_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        ids_K = global_ids.to(torch.int64).flatten()
        if ids_K.numel() == 0:
            raise ValueError("TrimEmbeddings needs at least one global id")
        if not bool((ids_K[1:] > ids_K[:-1]).all()) or int(ids_K[0]) < 0:
            raise ValueError("global_ids must be sorted, unique and non-negative")
        size = int(ids_K[-1]) + 1 if vocab_size is None else vocab_size
        if int(ids_K[-1]) >= size:
            raise ValueError(f"global id {int(ids_K[-1])} >= vocab_size {size}")
        super().__init__(init_rows(ids_K, d_model, std=init_std, seed=seed), size)
        index_of = torch.full((size,), -1, dtype=torch.int64)
        index_of[ids_K] = torch.arange(ids_K.numel())
        self.register_buffer("row_ids", ids_K.clone())
        self.register_buffer("index_of", index_of, persistent=False)
        self.register_buffer("ignored_targets", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_load_state_dict_post_hook(TrimEmbeddings._rebuild_index)  # type: ignore[no-untyped-call]

    @staticmethod
    def _rebuild_index(module: nn.Module, incompatible_keys: object) -> None:
        """After ``load_state_dict`` the loaded ``row_ids`` define the map; rebuild it to match."""
        assert isinstance(module, TrimEmbeddings)
        ids_K = module.row_ids
        if (
            not bool((ids_K[1:] > ids_K[:-1]).all())
            or int(ids_K[0]) < 0
            or int(ids_K[-1]) >= module.vocab_size
        ):
            raise ValueError("loaded row_ids must be sorted, unique and inside the vocabulary")
        module.index_of.fill_(-1)
        module.index_of[ids_K] = torch.arange(ids_K.numel(), device=ids_K.device)

    def local_index(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= 0) & (ids < self.vocab_size)
        return torch.where(inside, self.index_of[ids.clamp(0, self.vocab_size - 1)], -1)

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        local = self.local_index(targets)
        absent = (local < 0) & (targets != IGNORE_INDEX)
        self.ignored_targets += absent.sum()
        return torch.where(local < 0, IGNORE_INDEX, local)

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        local_BT = self.local_index(ids_BT)
        _check_present(local_BT)
        return F.embedding(local_BT, self.weight)

    def global_ids(self) -> torch.Tensor:
        return self.row_ids
