"""The experiment: tokenizers, STD in this process, each DEPT variant through real processes, evaluation, report."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dept_model import Body, ModelConfig, model_preset
from dept_model.std import StdConfig, format_progress, load_std, run_std, save_std
from dept_model.tokenizer import build_tokenizers, load_tokenizer, vocab_digest

from .config import ExperimentConfig
from .dept_run import finished_run, read_records, run_dept
from .evaluation import Scorer, dept_holder, evaluate_holder, std_holder
from .metrics import bytes_summary, dept_curve, std_curve
from .report import averages, write_report


def machine() -> dict[str, Any]:
    """CPU count and model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__}


def body_numel(config: ModelConfig) -> int:
    """Parameters of the shared body (the same for every variant)."""
    return sum(p.numel() for p in Body(config, seed=0).parameters())


def run_experiment(
    config: ExperimentConfig, out: Path, echo: Callable[[str], None], *, reuse: bool = False
) -> Path:
    """Run every variant of ``config`` and write the report under ``out/report``; return report.md.

    With ``reuse``, a variant whose finished run is already in ``out`` with the same training
    settings is not trained again, only evaluated (the numbers are the same: training is
    deterministic, and the evaluation reads the files the run left).
    """
    started = time.monotonic()
    torch.set_num_threads(config.threads)
    out.mkdir(parents=True, exist_ok=True)

    def phase(text: str) -> None:
        echo(f"[{time.monotonic() - started:6.0f} s] {text}")

    phase(f"tokenizers: global ({config.vocab_size}) and per source ({config.source_vocab_size})")
    global_vocab = build_tokenizers(
        list(config.sources),
        vocab_size=config.vocab_size,
        out_dir=out / "tokenizers" / "global",
        per_source=False,
    )["global"]
    own = build_tokenizers(
        list(config.sources),
        vocab_size=config.source_vocab_size,
        out_dir=out / "tokenizers" / "per-source",
        per_source=True,
    )
    source_vocabs = {s: own[s] for s in config.sources}
    toks = {"global": global_vocab, **source_vocabs}
    gtok = load_tokenizer(global_vocab)
    scorer = Scorer(config)
    model_cfg = model_preset(config.model)
    # What standard data parallel of the STD model would move per worker and direction each step.
    ddp_model_bytes = 4 * (body_numel(model_cfg) + int(gtok.get_vocab_size()) * model_cfg.d_model)
    variants: dict[str, Any] = {}
    for variant in config.variants:
        t0 = time.monotonic()
        if variant == "std":
            phase(f"std: {config.std_steps} steps on a tau={config.tau} mixture, in this process")
            std_config = StdConfig(
                sources=config.sources,
                model=config.model,
                steps=config.std_steps,
                batch_size=config.batch_size,
                seq_len=config.seq_len,
                lr=config.lr,
                tau=config.tau,
                seed=config.seed,
                eval_every=len(config.sources) * config.inner_steps,
                eval_batches=config.eval_batches,
            )
            loaded = load_std(out / "std", std_config, gtok) if reuse else None
            if loaded is None:
                result = run_std(
                    std_config, gtok, progress=lambda e: phase("  " + format_progress(e, config.std_steps))
                )
                save_std(result, std_config, gtok, out / "std")
                train_s = time.monotonic() - t0
            else:
                phase("std: reusing the finished run in std/")
                result, train_s = loaded, loaded.wall_s
            phase("std: final evaluation")
            res = evaluate_holder(config, std_holder(result.model, gtok, config.sources), scorer)
            res["curve"] = std_curve(result, config)
            res["mixture"] = {"weights": result.weights, "batches_drawn": result.batches_drawn}
        else:
            done = finished_run(config, variant, out / variant) if reuse else None
            if done is None:
                phase(f"{variant}: dept-server + {len(config.sources)} dept-worker processes on loopback")
                run = run_dept(
                    config,
                    variant,
                    global_vocab=global_vocab,
                    source_vocabs=source_vocabs,
                    out=out / variant,
                    echo=lambda line: echo(line),
                    started=started,
                )
            else:
                phase(f"{variant}: reusing the finished run in {variant}/")
                run = done
            train_s = run.wall_s
            phase(f"{variant}: final evaluation (server checkpoint + worker state files)")
            records = read_records(run.metrics_path)
            res = evaluate_holder(config, dept_holder(config, run, scorer), scorer)
            res["curve"] = dept_curve(records, config.sources)
            res["bytes"] = bytes_summary(records, config, full_model_fp32_bytes=ddp_model_bytes)
            res["metrics_path"] = str(run.metrics_path.relative_to(out))
        res["averages"] = averages(res, list(config.sources))
        res["train_wall_s"] = train_s
        res["wall_s"] = time.monotonic() - t0
        variants[variant] = res
        phase(
            f"{variant}: done in {res['wall_s']:.0f} s; mean test bits/byte"
            f" {res['averages']['test_bits_per_byte']:.4f}"
        )
    results = {
        "config": config.to_dict(),
        "std_steps": config.std_steps,
        "tokens_per_source": config.tokens_per_source,
        "machine": machine(),
        "tokenizers": {name: vocab_digest(load_tokenizer(p)) for name, p in toks.items()},
        "variants": variants,
        "wall_s": time.monotonic() - started,
    }
    report = write_report(results, out / "report")
    phase(f"report: {report}")
    return report
