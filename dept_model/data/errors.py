"""Errors raised while finding, reading or packing training text."""

from __future__ import annotations


class DataSourceError(ValueError):
    """A data spec cannot be resolved or read; the message names the fix."""


class StreamTooShortError(DataSourceError):
    """A token stream holds fewer than seq_len + 1 tokens, so not even one training window fits."""

    def __init__(self, num_tokens: int, seq_len: int, what: str = "token stream") -> None:
        self.num_tokens = num_tokens
        self.seq_len = seq_len
        super().__init__(
            f"{what} has {num_tokens} tokens but seq_len={seq_len} needs at least {seq_len + 1}: "
            "lower seq_len, use a smaller vocabulary, or give the source more text"
        )
