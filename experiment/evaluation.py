"""The final evaluation, computed the same way for every variant by this process.

Models are rebuilt from what the runs wrote, with the real readers: the final shared tensors
from the server's newest checkpoint (``CheckpointStore.latest``), each source's private
embeddings from its worker's state file (``dept_model.load_state``), STD's model from memory.
Scored: validation and test splits of the training sources, held-out sources (out of
distribution) and the UDHR parallel texts, each capped at ``final_eval_batches`` batches.

Which embeddings score which text:
- std, glob: the one global matrix for everything.
- trim: a source's own validation and test text through its rows V_k (softmax over V_k, as it
  trained), plus the global rows of any token of that text missing from V_k (a handful: their
  count is reported), so every token is scored; held-out text and all UDHR texts (6-8% of a
  UDHR text's tokens are outside V_k) through the server's whole global matrix.
- spec: a source's own text through its own matrix; held-out text through the mean of the
  sources' matrices (same global vocabulary, so rows align).
- spec-opt: a source's own text through its own tokenizer and matrix; held-out text through the
  source tokenizer and matrix that score best on the held-out source's validation split (named).
A UDHR text in a training language counts as in-distribution (that source's embeddings; TRIM:
the global matrix).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from dept_comm.checkpoint import CheckpointStore
from dept_comm.names import BODY_PREFIX, EMB_WEIGHT
from dept_model import DeptModel, Variant, build_model, evaluate, load_state, model_preset
from dept_model.data import eval_batches, load_texts, tokenize_texts
from dept_model.tokenizer import load_tokenizer, token_byte_lengths, vocab_digest

from .config import ExperimentConfig
from .dept_run import DeptRun, read_records

Scores = dict[str, float]


def udhr_language(name: str) -> str:
    """``udhr_en`` -> ``en``; ``udhr_ur`` -> ``ur_ui`` (the training source of that language)."""
    lang = name.removeprefix("udhr_")
    return "ur_ui" if lang == "ur" else lang


class TextCache:
    """Token streams per (tokenizer, spec, split), encoded once."""

    def __init__(self) -> None:
        self._texts: dict[tuple[str, str], list[str]] = {}
        self._tokens: dict[tuple[str, str, str], np.ndarray] = {}
        self._lengths: dict[str, torch.Tensor] = {}

    def texts(self, spec: str, split: str) -> list[str]:
        key = (spec, split)
        if key not in self._texts:
            self._texts[key] = load_texts(spec, split)
        return self._texts[key]

    def tokens(self, tok: Tokenizer, spec: str, split: str) -> np.ndarray:
        key = (vocab_digest(tok), spec, split)
        if key not in self._tokens:
            self._tokens[key] = tokenize_texts(tok, self.texts(spec, split))
        return self._tokens[key]

    def byte_lengths(self, tok: Tokenizer) -> torch.Tensor:
        key = vocab_digest(tok)
        if key not in self._lengths:
            self._lengths[key] = token_byte_lengths(tok)
        return self._lengths[key]


@dataclass
class Scorer:
    """Evaluates a model on a text with the experiment's batch shape and cap."""

    config: ExperimentConfig
    cache: TextCache = field(default_factory=TextCache)

    def batches(self, tokens: np.ndarray, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return eval_batches(
            tokens, seq_len=self.config.seq_len, batch_size=self.config.batch_size, max_batches=max_batches
        )

    def texts_of(self, source: str, tok: Tokenizer) -> list[np.ndarray]:
        """The token streams scored as ``source``'s own text: its validation and test splits."""
        return [self.cache.tokens(tok, source, split) for split in ("validation", "test")]

    def score(
        self, model: DeptModel, tok: Tokenizer, spec: str, split: str, max_batches: int | None = None
    ) -> Scores:
        tokens = self.cache.tokens(tok, spec, split)
        cap = self.config.final_eval_batches if max_batches is None else max_batches
        out = evaluate(model, self.batches(tokens, cap), self.cache.byte_lengths(tok))
        return {k: float(v) for k, v in out.items()}


@dataclass
class Holder:
    """The models of one variant: per source (what scores its own text) and for held-out text."""

    per_source: dict[str, tuple[DeptModel, Tokenizer]]
    heldout: list[tuple[str, DeptModel, Tokenizer]]  # (label, model, tokenizer); best one reported
    embedding_params: dict[str, int]  # per source: embedding parameters that worker holds
    distinct_embedding_params: int  # distinct embedding parameters in the whole system
    body_params: int
    checks: dict[str, dict[str, float]] = field(default_factory=dict)
    single_model: bool = False  # STD: one model serves every source
    udhr_via_heldout: bool = False  # TRIM: UDHR text, even in a training language, via the global matrix
    notes: dict[str, Any] = field(default_factory=dict)


def std_holder(model: DeptModel, tok: Tokenizer, sources: tuple[str, ...]) -> Holder:
    n = model.embeddings.weight.numel()
    return Holder(
        per_source={s: (model, tok) for s in sources},
        heldout=[("global", model, tok)],
        embedding_params=dict.fromkeys(sources, n),
        distinct_embedding_params=n,
        body_params=sum(p.numel() for p in model.body_parameters()),
        single_model=True,
    )


def final_shared(run: DeptRun) -> dict[str, torch.Tensor]:
    """The shared tensors of the server's newest checkpoint (after the last round)."""
    with CheckpointStore(run.checkpoint_dir) as store:
        ckpt = store.latest()
    if ckpt is None:
        raise RuntimeError(f"no valid checkpoint in {run.checkpoint_dir}")
    return ckpt.tensors["shared"]


def worker_model(
    config: ExperimentConfig, run: DeptRun, source: str, shared: dict[str, torch.Tensor]
) -> DeptModel:
    """The worker's replica at the end of the run: its state file, then the server's final shared tensors."""
    worker_dir = run.worker_dirs[source]
    tags = sorted(worker_dir.glob("trainer-*.safetensors"))
    if not tags:
        raise RuntimeError(f"no trainer state in {worker_dir}")
    state = load_state(tags[-1])["model"]
    tok = load_tokenizer(run.vocabs[source])
    variant = Variant(run.variant)
    row_ids = state.get("embeddings.row_ids") if variant is Variant.TRIM else None
    model = build_model(
        model_preset(config.model),
        variant,
        vocab_size=int(tok.get_vocab_size()),
        source_ids=row_ids,
        seed=config.seed,
    )
    model.load_state_dict(state, strict=True)
    body = {k.removeprefix(BODY_PREFIX): v for k, v in shared.items() if k.startswith(BODY_PREFIX)}
    model.load_body_state(body)
    with torch.no_grad():
        if variant is Variant.GLOB:
            model.embeddings.weight.copy_(shared[EMB_WEIGHT])
        elif variant is Variant.TRIM:
            model.embeddings.weight.copy_(shared[EMB_WEIGHT][model.embeddings.global_ids()])
    return model.eval()


def global_model(config: ExperimentConfig, shared: dict[str, torch.Tensor], vocab_size: int) -> DeptModel:
    """A model with the server's final body and whole global matrix (glob, trim)."""
    model = build_model(model_preset(config.model), Variant.GLOB, vocab_size=vocab_size, seed=config.seed)
    body = {k.removeprefix(BODY_PREFIX): v for k, v in shared.items() if k.startswith(BODY_PREFIX)}
    model.load_body_state(body)
    with torch.no_grad():
        model.embeddings.weight.copy_(shared[EMB_WEIGHT])
    return model.eval()


def trim_eval_model(
    config: ExperimentConfig, shared: dict[str, torch.Tensor], replica: DeptModel, scored: list[np.ndarray]
) -> DeptModel:
    """TRIM's model for one source's text: its rows V_k, plus the rows (from the server's global
    matrix) of any token of the ``scored`` streams missing from V_k, so every token is scored; the
    softmax runs over those rows, as the worker's ran over V_k when it trained."""
    vk = replica.embeddings.global_ids()
    ids = torch.unique(torch.cat([vk, *(torch.from_numpy(t) for t in scored)]))  # sorted
    model = build_model(
        model_preset(config.model),
        Variant.TRIM,
        vocab_size=int(shared[EMB_WEIGHT].shape[0]),
        source_ids=ids,
        seed=config.seed,
    )
    model.load_body_state(replica.body_state())
    with torch.no_grad():
        model.embeddings.weight.copy_(shared[EMB_WEIGHT][ids])
    return model.eval()


def dept_holder(config: ExperimentConfig, run: DeptRun, scorer: Scorer) -> Holder:
    """Rebuild a DEPT variant's final models; check each against the worker's own final evaluation."""
    shared = final_shared(run)
    replicas = {s: worker_model(config, run, s, shared) for s in config.sources}
    toks = {s: load_tokenizer(run.vocabs[s]) for s in config.sources}
    # The worker scored its final replica on eval_batches validation batches and reported it at
    # Leave (the metrics file's final line): the rebuilt replica must score the same.
    final_line: dict[str, Any] = next(
        (r for r in read_records(run.metrics_path) if r.get("kind") == "final"), {"eval": {}}
    )
    checks: dict[str, dict[str, float]] = {}
    for s in config.sources:
        ours = scorer.score(replicas[s], toks[s], s, "validation", max_batches=config.eval_batches)
        theirs = final_line["eval"].get(s, {})
        checks[s] = {"rebuilt": ours["bits_per_byte"], "worker": float(theirs.get("bits_per_byte", math.nan))}
    body_params = sum(p.numel() for p in next(iter(replicas.values())).body_parameters())
    variant = Variant(run.variant)
    per_worker = {s: replicas[s].embeddings.weight.numel() for s in config.sources}
    if variant in (Variant.GLOB, Variant.TRIM):
        gtok = toks[config.sources[0]]
        model = global_model(config, shared, int(gtok.get_vocab_size()))
        notes: dict[str, Any] = {}
        if variant is Variant.GLOB:
            per_source = {s: (model, gtok) for s in config.sources}
        else:
            per_source = {
                s: (trim_eval_model(config, shared, replicas[s], scorer.texts_of(s, gtok)), gtok)
                for s in config.sources
            }
            notes["test_tokens_outside_vk"] = {
                s: _outside(replicas[s], scorer.cache.tokens(gtok, s, "test")) for s in config.sources
            }
        heldout: list[tuple[str, DeptModel, Tokenizer]] = [("global", model, gtok)]
        distinct = shared[EMB_WEIGHT].numel()
    elif variant is Variant.SPEC:
        per_source = {s: (replicas[s], toks[s]) for s in config.sources}
        first = replicas[config.sources[0]]
        mean = build_model(
            model_preset(config.model),
            Variant.SPEC,
            vocab_size=int(first.embeddings.weight.shape[0]),
            seed=config.seed,
        )
        mean.load_body_state(first.body_state())
        with torch.no_grad():
            stacked = torch.stack([replicas[s].embeddings.weight.detach() for s in config.sources])
            mean.embeddings.weight.copy_(stacked.mean(0))
        heldout = [("mean of sources", mean.eval(), toks[config.sources[0]])]
        distinct = sum(per_worker.values())
    else:
        per_source = {s: (replicas[s], toks[s]) for s in config.sources}
        heldout = [(s, replicas[s], toks[s]) for s in config.sources]
        distinct = sum(per_worker.values())
    return Holder(
        per_source=per_source,
        heldout=heldout,
        embedding_params=per_worker,
        distinct_embedding_params=distinct,
        body_params=body_params,
        checks=checks,
        udhr_via_heldout=variant is Variant.TRIM,
        notes=notes if variant is Variant.TRIM else {},
    )


def _outside(replica: DeptModel, tokens: np.ndarray) -> dict[str, int]:
    """How many tokens of a stream are outside the replica's rows (TRIM's V_k)."""
    inside = torch.isin(torch.from_numpy(tokens), replica.embeddings.global_ids())
    return {"outside": int((~inside).sum()), "tokens": int(inside.numel())}


def _choose(scorer: Scorer, holder: Holder, spec: str, split: str) -> str:
    """The held-out embeddings with the lowest bits per byte on ``spec``'s ``split``."""
    if len(holder.heldout) == 1:
        return holder.heldout[0][0]
    scores = {label: scorer.score(m, t, spec, split)["bits_per_byte"] for label, m, t in holder.heldout}
    return min(scores, key=lambda label: scores[label])


def evaluate_holder(config: ExperimentConfig, holder: Holder, scorer: Scorer) -> dict[str, Any]:
    """Bits per byte, perplexity and loss on every text the experiment scores.

    Where a variant offers several embeddings for held-out text (spec-opt: every source's), the
    one with the lowest validation bits per byte on the held-out source is chosen, and its test
    split reported; a UDHR text in a language that is neither trained nor held out (no
    validation split to choose on) is scored with the best on the text itself, and says so.
    """
    in_dist: dict[str, dict[str, Scores]] = {}
    for s in config.sources:
        model, tok = holder.per_source[s]
        in_dist[s] = {split: scorer.score(model, tok, s, split) for split in ("validation", "test")}
    by_label = {label: (m, t) for label, m, t in holder.heldout}
    several = len(holder.heldout) > 1
    chosen = {h: _choose(scorer, holder, h, "validation") for h in config.heldout}
    heldout: dict[str, dict[str, Any]] = {}
    for h in config.heldout:
        model, tok = by_label[chosen[h]]
        via = f"{chosen[h]}, chosen on validation" if several else chosen[h]
        heldout[h] = {**scorer.score(model, tok, h, "test"), "via": via}
    udhr: dict[str, dict[str, Any]] = {}
    for name in config.udhr:
        lang = udhr_language(name)
        if lang in holder.per_source and not holder.udhr_via_heldout:
            model, tok = holder.per_source[lang]
            via = lang
        elif lang in chosen:
            model, tok = by_label[chosen[lang]]
            via = heldout[lang]["via"]
        else:
            label = _choose(scorer, holder, name, "test")
            model, tok = by_label[label]
            via = f"{label}, best on this text" if several else label
        udhr[name] = {**scorer.score(model, tok, name, "test"), "via": via}
    return {
        "in_distribution": in_dist,
        "heldout": heldout,
        "udhr": udhr,
        "embedding_params": holder.embedding_params,
        "embedding_params_sum_over_workers": (
            holder.distinct_embedding_params if holder.single_model else sum(holder.embedding_params.values())
        ),
        "distinct_embedding_params": holder.distinct_embedding_params,
        "body_params": holder.body_params,
        "checks": holder.checks,
        **holder.notes,
    }
