"""Token streams and batches: eos-joined documents cut into (x, y) windows, shuffled, resumable.

Shapes: B batch size, T sequence length. A window is T + 1 consecutive tokens; x is its first T,
y its last T (next-token targets). Window i starts at token i * T, so windows do not overlap
except for the one token y shares with the next window's x.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from dept_model.data.errors import StreamTooShortError
from dept_model.tokenizer import encode_batch, eos_id

logger = logging.getLogger(__name__)

_ENCODE_CHUNK_DOCS = 512


def tokenize_texts(tok: Tokenizer, texts: Iterable[str]) -> np.ndarray:
    """Encode documents into one flat int64 stream with eos after every document."""
    eos = eos_id(tok)
    texts = list(texts)
    parts: list[np.ndarray] = []
    for start in range(0, len(texts), _ENCODE_CHUNK_DOCS):
        for ids in encode_batch(tok, texts[start : start + _ENCODE_CHUNK_DOCS]):
            parts.append(np.asarray(ids, dtype=np.int64))
            parts.append(np.array([eos], dtype=np.int64))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(parts)


def _num_windows(tokens: np.ndarray, seq_len: int, what: str) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a flat 1-D stream, got shape {tokens.shape}")
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise StreamTooShortError(len(tokens), seq_len, what)
    return n


def _windows(tokens: np.ndarray, starts_B: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx_BT1 = starts_B[:, None] + np.arange(seq_len + 1)[None, :]
    w_BT1 = torch.from_numpy(tokens[idx_BT1].astype(np.int64, copy=False))
    return w_BT1[:, :-1].contiguous(), w_BT1[:, 1:].contiguous()


class TokenBatches:
    """Endless shuffled training batches over one token stream, resumable from `state_dict()`.

    Each epoch visits every window once in an order drawn from (seed, epoch); a batch may span two
    epochs, so batch_size may exceed the number of windows (tiny sources such as `sw`).
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_windows = _num_windows(tokens, seq_len, "training token stream")
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # windows of the current epoch already served
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed & (2**63 - 1), epoch])))
        return rng.permutation(self.num_windows)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x_BT, y_BT) pair, int64, y shifted by one token."""
        picked: list[np.ndarray] = []
        need = self.batch_size
        while need:
            take = min(need, self.num_windows - self.position)
            picked.append(self._order[self.position : self.position + take])
            self.position += take
            need -= take
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
        return _windows(self.tokens, np.concatenate(picked) * self.seq_len, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: epoch, position within it, seed (and the shape it was built with)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where `state` was taken (same tokens, seq_len and seed required).

        Raises:
            ValueError: if the state belongs to another stream, or its position is out of range.
        """
        for key in ("seq_len", "num_windows"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"state {key}={state[key]} but this stream has {getattr(self, key)}: resume with the same "
                    "tokenizer, data and seq_len, or start afresh"
                )
        epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        if epoch < 0 or not 0 <= position < self.num_windows:
            raise ValueError(
                f"state epoch={epoch} position={position} out of range (num_windows={self.num_windows})"
            )
        self.seed, self.epoch, self.position = seed, epoch, position
        self._order = self._permutation(epoch)


def eval_batches(
    tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows in stream order, batched (the last batch may be smaller).

    Raises:
        StreamTooShortError: if not even one window fits (raised at the first next()).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_windows = _num_windows(tokens, seq_len, "evaluation token stream")
    stream = np.ascontiguousarray(tokens, dtype=np.int64)
    for num_done, first in enumerate(range(0, num_windows, batch_size)):
        if max_batches is not None and num_done >= max_batches:
            return
        starts_B = np.arange(first, min(first + batch_size, num_windows)) * seq_len
        yield _windows(stream, starts_B, seq_len)
