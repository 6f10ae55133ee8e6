"""Everything a worker builds before its first round: tokenizer, data, model, trainer."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from dept_model import DeptModel, TrainConfig, Trainer, Variant, build_model, model_preset
from dept_model.data import TokenBatches, load_texts, tokenize_texts
from dept_model.tokenizer import (
    load_tokenizer,
    save_tokenizer,
    source_vocab,
    token_byte_lengths,
    train_tokenizer,
)

from .config import WorkerConfig

logger = logging.getLogger(__name__)


@dataclass
class WorkerSetup:
    """The worker's tokenizer, data streams and model."""

    tokenizer: Tokenizer
    vocab_digest: str
    train_batches: TokenBatches
    val_tokens: np.ndarray
    byte_lengths: torch.Tensor
    model: DeptModel
    trainer: Trainer


def resolve_tokenizer(config: WorkerConfig, state_dir: Path) -> Tokenizer:
    """The --vocab tokenizer, or one trained on this source's data (cached in the state dir)."""
    if config.vocab is not None:
        return load_tokenizer(config.vocab)
    path = state_dir / f"tokenizer-{config.source}-{config.vocab_size}.json"
    if path.exists():
        return load_tokenizer(path)
    logger.info("training a %d-token tokenizer for source=%s", config.vocab_size, config.source)
    tok = train_tokenizer(load_texts(config.data_spec, "train"), vocab_size=config.vocab_size)
    save_tokenizer(tok, path)
    return tok


def source_seed(seed: int, source: str) -> int:
    """A per-source seed, stable across processes (unlike hash())."""
    return (seed * 1_000_003 + zlib.crc32(source.encode())) % (2**31)


def build_setup(config: WorkerConfig, run: dict[str, Any], tokenizer: Tokenizer, digest: str) -> WorkerSetup:
    """Load data and build the model and trainer for the variant the server runs."""
    train_texts = load_texts(config.data_spec, "train")
    val_texts = load_texts(config.data_spec, "validation")
    train_tokens = tokenize_texts(tokenizer, train_texts)
    val_tokens = tokenize_texts(tokenizer, val_texts)
    variant = Variant(run["variant"])
    source_ids = source_vocab(tokenizer, train_texts + val_texts) if variant == Variant.TRIM else None
    seed = source_seed(config.seed, config.source)
    model = build_model(
        model_preset(run["model"]),
        variant,
        vocab_size=int(tokenizer.get_vocab_size()),
        source_ids=source_ids,
        seed=seed,
    ).to(config.device)
    total_steps = max(1, int(run["rounds"]) * config.inner_steps)
    trainer = Trainer(
        model,
        TrainConfig(
            lr=config.lr,
            warmup_steps=min(max(total_steps // 20, 1), 100),
            total_steps=total_steps,
            compile=config.compile,
            attn_impl=config.attn,
            grad_accum=config.grad_accum,
            activation_checkpointing=config.activation_checkpointing,
        ),
        torch.device(config.device),
    )
    batches = TokenBatches(train_tokens, seq_len=config.seq_len, batch_size=config.batch_size, seed=seed)
    return WorkerSetup(
        tokenizer=tokenizer,
        vocab_digest=digest,
        train_batches=batches,
        val_tokens=val_tokens,
        byte_lengths=token_byte_lengths(tokenizer),
        model=model,
        trainer=trainer,
    )
