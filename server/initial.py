"""The run's starting point: initial shared tensors from dept_model and the run description."""

from __future__ import annotations

from typing import Any

import torch

from dept_comm.names import BODY_PREFIX, EMB_WEIGHT
from dept_model import Variant, build_model, model_preset
from dept_model.tokenizer import load_tokenizer, vocab_digest

from .config import ServerConfig

InitialState = tuple[dict[str, torch.Tensor], str, dict[str, Any]]  # shared tensors, vocab digest, run info


def describe_run(
    config: ServerConfig, *, body_params: int, vocab_size: int, vocab_digest: str, full_model_fp32_bytes: int
) -> dict[str, Any]:
    """The run description every worker gets at join (and checkpoints keep)."""
    return {
        "variant": config.variant,
        "model": config.model,
        "rounds": config.rounds,
        "seed": config.seed,
        "codec_up": config.codec_up,
        "codec_down": config.codec_down,
        "vocab_size": vocab_size,
        "vocab_digest": vocab_digest,
        "body_params": body_params,
        "full_model_fp32_bytes": full_model_fp32_bytes,
    }


def initial_shared_tensors(config: ServerConfig) -> InitialState:
    """Build the initial body (and global embeddings for glob/trim) deterministically from the seed.

    Returns the shared tensors by wire name, the global vocabulary digest ("" without one) and
    the run description sent to every worker at join.
    """
    model_config = model_preset(config.model)
    digest, vocab_size = "", 0
    if config.vocab is not None:
        tok = load_tokenizer(config.vocab)
        digest, vocab_size = vocab_digest(tok), int(tok.get_vocab_size())
    # The server holds the whole global matrix for glob and trim (trim workers take their rows).
    variant = Variant.GLOB if config.shares_embeddings else Variant(config.variant)
    model = build_model(model_config, variant, vocab_size=max(vocab_size, 2), seed=config.seed)
    # The model's own tensors, not copies: the model goes when this returns, so the server's
    # start-up holds one body, not three (measured: the 125m server's start-up peak 1.29 GB).
    shared = {BODY_PREFIX + k: v.detach() for k, v in model.body.state_dict().items()}
    if config.shares_embeddings:
        shared[EMB_WEIGHT] = model.embeddings.weight.detach()
    del model
    body_numel = sum(t.numel() for t in shared.values() if t is not shared.get(EMB_WEIGHT))
    # What standard data parallel would send every step: the whole model in fp32.
    full = 4 * (body_numel + vocab_size * model_config.d_model)
    run_info = describe_run(
        config, body_params=body_numel, vocab_size=vocab_size, vocab_digest=digest, full_model_fp32_bytes=full
    )
    return shared, digest, run_info
