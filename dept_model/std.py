"""STD, the paper's baseline: one model, one global vocabulary, batches from a temperature-sampled mixture.

No server and no rounds: a single AdamW run whose batches come from :class:`MixtureBatches` over
the sources' training streams, weighted by ``temperature_weights(tokens per source, tau)``. To
match a DEPT run of ``R`` rounds of ``N`` inner steps on ``K`` sources, give it ``K * R * N``
steps of the same batch shape: the same number of optimiser steps and tokens in total.

``dept-std`` runs it from the command line; ``dept-experiment`` calls :func:`run_std` directly.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from tokenizers import Tokenizer

from dept_model.config import model_preset
from dept_model.data import TokenBatches, eval_batches, load_texts, tokenize_texts
from dept_model.evaluate import evaluate
from dept_model.model import DeptModel
from dept_model.state import load_state, save_state
from dept_model.tokenizer import build_tokenizers, load_tokenizer, token_byte_lengths, vocab_digest
from dept_model.train import TrainConfig, Trainer
from dept_model.variants import MixtureBatches, Variant, build_model, temperature_weights

logger = logging.getLogger(__name__)

DEFAULT_TAU = 3.33  # p_k ∝ n_k^0.3, the mT5 / XLM-R setting (alpha = 0.3)
MODEL_FILE = "std-model.safetensors"
HISTORY_FILE = "history.jsonl"


def source_seed(seed: int, source: str) -> int:
    """A per-source seed, stable across processes; the same formula dept-worker uses for its data order."""
    return (seed * 1_000_003 + zlib.crc32(source.encode())) % (2**31)


def warmup_for(total_steps: int) -> int:
    """Warmup steps for a run of ``total_steps`` (the rule dept-worker uses: 5%, at most 100)."""
    return min(max(total_steps // 20, 1), 100)


@dataclass(frozen=True, kw_only=True, slots=True)
class StdConfig:
    """One STD run: the sources (data specs), the model, the step budget and the mixture."""

    sources: tuple[str, ...]
    model: str = "tiny"
    steps: int
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    tau: float = DEFAULT_TAU
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_batches: int = 4

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("STD needs at least one source")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources contain duplicates: {list(self.sources)}")
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class StdResult:
    """What a run leaves: the model, the mixture it used, how often each source was drawn, the curve."""

    model: DeptModel
    weights: dict[str, float]
    train_tokens: dict[str, int]
    batches_drawn: dict[str, int]
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


def mixture_weights(train_tokens: dict[str, int], tau: float) -> dict[str, float]:
    """Sampling probability per source: ``p_k ∝ n_k^(1/tau)`` over the sources' training tokens."""
    names = list(train_tokens)
    return dict(zip(names, temperature_weights([train_tokens[n] for n in names], tau), strict=True))


def _validation_eval(
    model: DeptModel, val_tokens: dict[str, np.ndarray], lengths: torch.Tensor, config: StdConfig
) -> dict[str, dict[str, float]]:
    out = {}
    for source, tokens in val_tokens.items():
        batches = eval_batches(
            tokens, seq_len=config.seq_len, batch_size=config.batch_size, max_batches=config.eval_batches
        )
        out[source] = evaluate(model, batches, lengths)
    return out


def run_std(
    config: StdConfig,
    tokenizer: Tokenizer,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> StdResult:
    """Train the STD baseline and return it with its validation curve.

    The initial body and embeddings are those of the DEPT server for ``seed`` (``build_model``
    with GLOB and the same seed), so STD and GLOB start from the same weights. Every
    ``eval_every`` steps (and before the first and after the last) each source's validation
    split is scored on ``eval_batches`` batches, as dept-worker scores it every round.

    Args:
        config: the run.
        tokenizer: the global tokenizer.
        progress: called with each history entry as it is recorded.
    """
    started = time.monotonic()
    train_tokens = {s: tokenize_texts(tokenizer, load_texts(s, "train")) for s in config.sources}
    val_tokens = {s: tokenize_texts(tokenizer, load_texts(s, "validation")) for s in config.sources}
    counts = {s: int(len(t)) for s, t in train_tokens.items()}
    weights = mixture_weights(counts, config.tau)
    streams = [
        TokenBatches(
            train_tokens[s],
            seq_len=config.seq_len,
            batch_size=config.batch_size,
            seed=source_seed(config.seed, s),
        )
        for s in config.sources
    ]
    mixture = MixtureBatches(streams, [weights[s] for s in config.sources], seed=config.seed)
    model = build_model(
        model_preset(config.model), Variant.STD, vocab_size=int(tokenizer.get_vocab_size()), seed=config.seed
    )
    trainer = Trainer(
        model,
        TrainConfig(lr=config.lr, warmup_steps=warmup_for(config.steps), total_steps=config.steps),
        "cpu",
    )
    lengths = token_byte_lengths(tokenizer)
    drawn = dict.fromkeys(config.sources, 0)
    result = StdResult(model=model, weights=weights, train_tokens=counts, batches_drawn=drawn)

    def record(step: int, losses: list[float]) -> None:
        entry: dict[str, Any] = {
            "step": step,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "eval": _validation_eval(model, val_tokens, lengths, config),
            "batches_drawn": dict(drawn),
            "elapsed_s": time.monotonic() - started,
        }
        result.history.append(entry)
        if progress is not None:
            progress(entry)

    record(0, [])
    losses: list[float] = []
    for step in range(1, config.steps + 1):
        x_BT, y_BT = mixture.next_batch()
        drawn[config.sources[mixture.last_source]] += 1
        losses.append(trainer.step(x_BT, y_BT))
        if step == config.steps or (config.eval_every and step % config.eval_every == 0):
            record(step, losses)
            losses = []
    result.wall_s = time.monotonic() - started
    return result


def save_std(result: StdResult, config: StdConfig, tokenizer: Tokenizer, out: Path) -> Path:
    """Write the model (safetensors state), ``history.jsonl`` and ``summary.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    save_state(out / MODEL_FILE, {"format": 1, "model": result.model.state_dict()})
    with open(out / HISTORY_FILE, "w", encoding="utf-8") as fh:
        for entry in result.history:
            fh.write(json.dumps(entry) + "\n")
    summary = {
        "config": asdict(config),
        "vocab_digest": vocab_digest(tokenizer),
        "vocab_size": int(tokenizer.get_vocab_size()),
        "weights": result.weights,
        "train_tokens": result.train_tokens,
        "batches_drawn": result.batches_drawn,
        "tokens_trained": config.steps * config.batch_size * config.seq_len,
        "wall_s": result.wall_s,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return out / MODEL_FILE


def load_std(out: Path, config: StdConfig, tokenizer: Tokenizer) -> StdResult | None:
    """The run :func:`save_std` wrote under ``out``, if it was trained with ``config`` and ``tokenizer``."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        lines = (out / HISTORY_FILE).read_text(encoding="utf-8").splitlines()
        state = load_state(out / MODEL_FILE)
    except (OSError, ValueError):
        return None
    if summary.get("config") != json.loads(json.dumps(asdict(config))) or summary.get(
        "vocab_digest"
    ) != vocab_digest(tokenizer):
        return None
    model = build_model(
        model_preset(config.model), Variant.STD, vocab_size=int(tokenizer.get_vocab_size()), seed=config.seed
    )
    model.load_state_dict(state["model"])
    return StdResult(
        model=model,
        weights=summary["weights"],
        train_tokens=summary["train_tokens"],
        batches_drawn=summary["batches_drawn"],
        history=[json.loads(line) for line in lines],
        wall_s=float(summary["wall_s"]),
    )


def format_progress(entry: dict[str, Any], total_steps: int) -> str:
    """One progress line: step, train loss, mean validation bits per byte, elapsed time."""
    bpb = [e["bits_per_byte"] for e in entry["eval"].values()]
    loss = "–" if entry["train_loss"] is None else f"{entry['train_loss']:.3f}"
    return (
        f"std step {entry['step']}/{total_steps}: train loss {loss},"
        f" val bits/byte {sum(bpb) / len(bpb):.3f} ({entry['elapsed_s']:.0f} s)"
    )


def _split(value: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip())


@click.command(context_settings={"show_default": True})
@click.option(
    "--sources", required=True, help="Comma-separated data specs (same syntax as --data), e.g. en,it,zh."
)
@click.option("--vocab", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Global tokenizer file [default: train one over the sources into OUT/tokenizers].")  # fmt: skip
@click.option("--vocab-size", type=click.IntRange(min=258), default=2048)
@click.option("--model", default="tiny")
@click.option("--steps", type=click.IntRange(min=1), required=True,
              help="Optimiser steps; K sources x R rounds x N inner steps matches a DEPT run.")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option("--seq-len", type=click.IntRange(min=8), default=128)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3)
@click.option("--tau", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TAU,
              help="Sampling temperature: p_k ∝ tokens_k^(1/tau).")  # fmt: skip
@click.option("--seed", type=int, default=0)
@click.option("--eval-every", type=click.IntRange(min=0), default=0)
@click.option("--eval-batches", type=click.IntRange(min=1), default=4)
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch intra-op threads.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/std"))
def main(sources: str, vocab: Path | None, vocab_size: int, threads: int, out: Path, **options: Any) -> None:
    """Train the STD baseline: one model, one vocabulary, a temperature-sampled mixture of the sources."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(threads)
    try:
        config = StdConfig(sources=_split(sources), **options)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    if vocab is None:
        vocab = build_tokenizers(
            list(config.sources), vocab_size=vocab_size, out_dir=out / "tokenizers", per_source=False
        )["global"]
    tokenizer = load_tokenizer(vocab)
    click.echo(
        f"dept-std: sources={','.join(config.sources)} steps={config.steps} model={config.model} -> {out}"
    )
    result = run_std(config, tokenizer, progress=lambda e: click.echo(format_progress(e, config.steps)))
    shares = ", ".join(f"{s}={w:.3f}" for s, w in result.weights.items())
    click.echo(f"mixture weights (tau={config.tau}): {shares}")
    click.echo(f"model: {save_std(result, config, tokenizer, out)} ({result.wall_s:.0f} s)")


if __name__ == "__main__":
    main()
