"""dept_model: the decoupled-embedding transformer, tokenizers, data and the training step."""

from __future__ import annotations

from dept_model.config import PRESETS, ModelConfig, model_preset
from dept_model.embeddings import GlobalEmbeddings, SpecEmbeddings, TiedEmbeddings, TrimEmbeddings
from dept_model.evaluate import evaluate
from dept_model.loss import IGNORE_INDEX, chunked_cross_entropy
from dept_model.model import Body, DeptModel
from dept_model.state import load_state, save_state, state_from_bytes, state_to_bytes
from dept_model.train import TrainConfig, Trainer, lr_at
from dept_model.variants import (
    MixtureBatches,
    Variant,
    build_model,
    shares_embeddings,
    temperature_weights,
    uses_global_vocab,
)

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "Body",
    "DeptModel",
    "GlobalEmbeddings",
    "MixtureBatches",
    "ModelConfig",
    "SpecEmbeddings",
    "TiedEmbeddings",
    "TrainConfig",
    "Trainer",
    "TrimEmbeddings",
    "Variant",
    "build_model",
    "chunked_cross_entropy",
    "evaluate",
    "load_state",
    "lr_at",
    "model_preset",
    "save_state",
    "shares_embeddings",
    "state_from_bytes",
    "state_to_bytes",
    "temperature_weights",
    "uses_global_vocab",
]
