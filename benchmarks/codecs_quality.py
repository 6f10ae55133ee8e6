"""``dept-bench codecs-quality``: what each codec costs in model quality, through real rounds.

Every run is a real ``dept-server`` and one ``dept-worker`` process per source on loopback (the
experiment's ``run_dept``), with the same seeds, data, tokenizer and schedule; only the codec (the
same both ways) or the variant changes. Per run: body payload bytes per round up (all workers
together) and down (all workers together), every payload byte per round (body, embeddings,
control), and the mean over sources of the final validation bits per byte (the workers' own
evaluation after the last round, ``eval_batches`` batches per source). ``glob`` with ``fp32`` is
the full-model baseline (its global embedding matrix travels each round); the ``spec`` runs send
the body alone.

Bytes are means over rounds 2..R (the first round's down-link is every worker's pull of the whole
initial body, the same for every codec). Settings: the ``tiny`` model, 3 sources (en, it, code), 8 rounds of 30 inner steps (batch 8 x 128
tokens), a global vocabulary of 8192 tokens; ``--quick``: 2 sources, 2 rounds of 4 steps, 1024
tokens, two codecs. Runs take several minutes each on 2 cores; use ``nice``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

from dept_experiment.config import ExperimentConfig
from dept_experiment.dept_run import read_records, run_dept
from dept_model.tokenizer import build_tokenizers

logger = logging.getLogger(__name__)

# (variant, codec up, codec down): the full-model baseline first, then the spec frontier; the
# codec goes both ways except in the rows that pair a sparse up-link with a dense down-link.
RUNS: tuple[tuple[str, str, str], ...] = (
    ("glob", "fp32", "fp32"),
    ("spec", "fp32", "fp32"),
    ("spec", "bf16-zstd", "bf16-zstd"),
    ("spec", "int8", "int8"),
    ("spec", "int4", "int4"),
    ("spec", "topk:k=0.03,bits=4", "topk:k=0.03,bits=4"),
    ("spec", "topk:k=0.02,bits=2", "topk:k=0.02,bits=2"),
    ("spec", "topk:k=0.01,bits=2", "topk:k=0.01,bits=2"),
    ("spec", "topk:k=0.1,bits=2", "topk:k=0.1,bits=2"),
    ("spec", "topk:k=0.03,bits=4", "int4"),
    ("spec", "topk:k=0.1,bits=2", "int4"),
)
EXTRA = RUNS[8:]  # added after the first eight were measured (same config, seeds and data)
QUICK_RUNS: tuple[tuple[str, str, str], ...] = (
    ("spec", "fp32", "fp32"),
    ("spec", "topk:k=0.02,bits=2", "topk:k=0.02,bits=2"),
)

CONFIG = ExperimentConfig(
    preset="codecs-quality",
    sources=("en", "it", "code"),
    heldout=(),
    udhr=(),
    variants=("glob", "spec"),
    model="tiny",
    rounds=8,
    inner_steps=30,
    batch_size=8,
    seq_len=128,
    vocab_size=8192,
    lr=2e-3,
    eval_batches=8,
)
QUICK_CONFIG = CONFIG.replace(
    sources=("en", "it"), rounds=2, inner_steps=4, batch_size=4, seq_len=64, vocab_size=1024, eval_batches=2
)


def summarise(records: list[dict[str, Any]], sources: tuple[str, ...]) -> dict[str, Any]:
    """Bytes per round (means over the rounds, all workers together) and the final mean bpb."""
    closed = [r for r in records if r.get("kind") != "final"]
    if not closed:
        raise ValueError("the run closed no round")
    # Steady state: the first round's down-link is the whole initial body (every worker's first
    # pull), the same for every codec; it is left out when there are later rounds.
    rounds = closed[1:] or closed

    def body(rec: dict[str, Any], direction: str) -> int:
        return sum(
            int(w[f"{direction}_by_group"].get("body", {}).get("payload_bytes", 0)) for w in rec["workers"]
        )

    last = records[-1].get("eval", {})
    bpb = [last[s]["bits_per_byte"] for s in sources if "bits_per_byte" in last.get(s, {})]
    if len(bpb) != len(sources):
        raise ValueError(f"the last record evaluates {sorted(last)}, expected {list(sources)}")
    return {
        "body_up_bytes_per_round": mean(body(r, "up") for r in rounds),
        "body_down_bytes_per_round": mean(body(r, "down") for r in rounds),
        "total_bytes_per_round": mean(
            int(r["up_payload_bytes"]) + int(r["down_payload_bytes"]) for r in rounds
        ),
        "avg_val_bpb": mean(bpb),
        "rounds": len(closed),
    }


def run(quick: bool = False) -> dict[str, Any]:
    return run_rows(QUICK_RUNS if quick else RUNS, QUICK_CONFIG if quick else CONFIG)


def run_rows(runs: tuple[tuple[str, str, str], ...], config: ExperimentConfig = CONFIG) -> dict[str, Any]:
    """The runs ``runs`` (variant, codec up, codec down) under ``config``."""
    started = time.monotonic()
    out_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dept-codecs-quality-") as tmp:
        root = Path(tmp)
        global_vocab = build_tokenizers(
            list(config.sources), vocab_size=config.vocab_size, out_dir=root / "tok", per_source=False
        )["global"]
        for i, (variant, up, down) in enumerate(runs):
            cfg = config.replace(codec_up=up, codec_down=down)
            t0 = time.monotonic()
            dept = run_dept(
                cfg,
                variant,
                global_vocab=global_vocab,
                source_vocabs={},
                out=root / f"run{i}",
                echo=lambda line: logger.info("%s", line),
                started=started,
            )
            row = {
                "codec": up,
                "codec_down": down,
                "variant": variant,
                **summarise(read_records(dept.metrics_path), cfg.sources),
            }
            row["wall_s"] = round(time.monotonic() - t0, 1)
            logger.info("codecs-quality %s", row)
            out_runs.append(row)
    add_ratios(out_runs)
    return {
        "benchmark": "codecs-quality",
        "config": {k: v for k, v in config.to_dict().items() if k not in ("heldout", "udhr", "variants")},
        "runs": out_runs,
        "wall_s": round(time.monotonic() - started, 1),
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against spec + fp32 (body bytes up, bits per byte) and glob + fp32 (total bytes)."""
    fp32 = next((r for r in rows if r["variant"] == "spec" and r["codec"] == r["codec_down"] == "fp32"), None)
    glob = next((r for r in rows if r["variant"] == "glob" and r["codec"] == r["codec_down"] == "fp32"), None)
    for r in rows:
        if fp32 is not None:
            r["body_up_vs_spec_fp32"] = round(
                fp32["body_up_bytes_per_round"] / max(r["body_up_bytes_per_round"], 1), 2
            )
            r["body_vs_spec_fp32"] = round(
                (fp32["body_up_bytes_per_round"] + fp32["body_down_bytes_per_round"])
                / max(r["body_up_bytes_per_round"] + r["body_down_bytes_per_round"], 1),
                2,
            )
            r["bpb_vs_spec_fp32"] = round(r["avg_val_bpb"] / fp32["avg_val_bpb"] - 1, 5)
        if glob is not None:
            r["total_vs_glob_fp32"] = round(
                glob["total_bytes_per_round"] / max(r["total_bytes_per_round"], 1), 2
            )
