"""The report folder: results.json, report.md and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

from .config import DEPT_VARIANTS  # noqa: E402


def fmt(value: float | None, digits: int = 3) -> str:
    """A number as the report prints it ("–" for a missing one)."""
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def averages(result: dict[str, Any], sources: list[str]) -> dict[str, float]:
    """Mean over the training sources of validation and test bits per byte and perplexity."""
    ind = result["in_distribution"]
    return {
        f"{split}_{key}": _mean([ind[s][split][key] for s in sources])
        for split in ("validation", "test")
        for key in ("bits_per_byte", "ppl")
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def plot_curves(results: dict[str, Any], out: Path) -> list[str]:
    """bits_per_byte.png (mean validation bpb vs rounds), bits_per_byte_per_source.png and bytes.png
    (cumulative payload bytes vs rounds). The curves are the workers' per-round validation scores
    (STD: its own, every sources x inner steps steps) on ``eval_batches`` batches."""
    variants = results["variants"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, res in variants.items():
        pts = [(p["rounds_done"], p["mean"]) for p in res["curve"] if p["mean"] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=name)
    ax.set_xlabel("rounds (STD: steps / (sources x inner steps))")
    ax.set_ylabel("validation bits per byte (mean over sources)")
    ax.set_title("Validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bits_per_byte.png", dpi=110)
    plt.close(fig)

    sources = list(results["config"]["sources"])
    fig, axes = plt.subplots(1, len(sources), figsize=(3.2 * len(sources), 3.4), squeeze=False)
    for ax, source in zip(axes[0], sources, strict=True):
        for name, res in variants.items():
            pts = [
                (p["rounds_done"], p["per_source"][source]) for p in res["curve"] if source in p["per_source"]
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=2, label=name)
        ax.set_title(source)
        ax.set_xlabel("rounds")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation bits per byte")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "bits_per_byte_per_source.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, res in variants.items():
        per_round = res.get("bytes", {}).get("per_round", [])
        if not per_round:
            continue
        total, xs, ys = 0, [], []
        for r in per_round:
            total += r["up"] + r["down"]
            xs.append(r["round"] + 1)
            ys.append(total)
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("rounds")
    ax.set_ylabel("cumulative payload bytes (up + down)")
    ax.set_yscale("log")  # starts at round 1: the first pull is the first byte
    ax.set_title("Bytes on the wire")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=110)
    plt.close(fig)
    return ["bits_per_byte.png", "bits_per_byte_per_source.png", "bytes.png"]


def _train_times(variants: dict[str, Any]) -> str:
    """'std 209 s, glob 273 s, ...; 1,234 s in all': each variant's training time, as it was trained."""
    times = {name: float(res.get("train_wall_s", 0.0)) for name, res in variants.items()}
    each = ", ".join(f"{name} {t:.0f} s" for name, t in times.items())
    return f"{each}; {sum(times.values()):,.0f} s in all"


def render_markdown(results: dict[str, Any], plots: list[str]) -> str:
    """The report as markdown: every number comes from ``results``."""
    cfg = results["config"]
    sources: list[str] = list(cfg["sources"])
    variants: dict[str, Any] = results["variants"]
    names = list(variants)
    lines = [
        f"# DEPT experiment: preset {cfg['preset']}",
        "",
        f"Sources {', '.join(sources)}; held out {', '.join(cfg['heldout']) or 'none'}; model {cfg['model']};"
        f" {cfg['rounds']} rounds x {cfg['inner_steps']} inner steps per source (STD: {results['std_steps']}"
        f" steps, tau {cfg['tau']}); batch {cfg['batch_size']} x {cfg['seq_len']} tokens; seed {cfg['seed']};"
        f" {results['tokens_per_source']:,} training tokens per source for DEPT, the same total for STD.",
        f"Training wall time {_train_times(variants)} on {results['machine']['nproc']} CPUs"
        f" ({results['machine']['cpu']}); this invocation took {results['wall_s']:.0f} s (runs reused with"
        f" --reuse are evaluated, not trained again). Final evaluation: at most {cfg['final_eval_batches']}"
        " batches per split.",
        "",
        "Final numbers are computed by dept-experiment for every variant alike: the server's last checkpoint",
        "(body; GLOB/TRIM global matrix) and each worker's state file (SPEC/SPEC-OPT private matrices),",
        "scored on the same windows. STD and GLOB score all text through the one global matrix; TRIM a source's",
        "own text through its rows V_k (plus the global rows of any token of that text outside V_k), held-out and",
        "UDHR text through the whole global matrix; SPEC and SPEC-OPT a source's text through its own matrix (SPEC-OPT: and",
        "tokenizer). Held-out text: SPEC uses the",
        "mean of the sources' matrices, SPEC-OPT the source tokenizer and matrix chosen on the held-out",
        "validation split. Bits per byte compare across tokenizers; perplexity does not (SPEC-OPT's tokens are",
        "shorter).",
        "",
        "## Average over training sources",
        "",
    ]
    rows = []
    for n in names:
        avg = variants[n]["averages"]
        rows.append(
            [n, fmt(avg["validation_bits_per_byte"]), fmt(avg["test_bits_per_byte"]),
             fmt(avg["validation_ppl"], 2), fmt(avg["test_ppl"], 2)]
        )  # fmt: skip
    lines += _table(["variant", "val bits/byte", "test bits/byte", "val ppl", "test ppl"], rows)
    lines += ["", "## Per source (test bits per byte / perplexity; validation bits per byte)", ""]
    rows = []
    for s in sources:
        row = [s]
        for n in names:
            r = variants[n]["in_distribution"][s]
            row.append(
                f"{fmt(r['test']['bits_per_byte'])} / {fmt(r['test']['ppl'], 1)}; {fmt(r['validation']['bits_per_byte'])}"
            )
        rows.append(row)
    lines += _table(["source", *names], rows)
    outside = variants.get("trim", {}).get("test_tokens_outside_vk")
    if outside:
        counts = ", ".join(f"{s} {outside[s]['outside']} of {outside[s]['tokens']:,}" for s in sources)
        lines += [
            "",
            f"TRIM: test tokens outside the source's rows V_k (scored through their global rows): {counts}.",
        ]
    if cfg["heldout"]:
        lines += [
            "",
            "## Held-out sources (out of distribution, test bits per byte, via which embeddings)",
            "",
        ]
        rows = [
            [h, *(f"{fmt(variants[n]['heldout'][h]['bits_per_byte'])} ({variants[n]['heldout'][h]['via']})" for n in names)]
            for h in cfg["heldout"]
        ]  # fmt: skip
        lines += _table(["source", *names], rows)
    if cfg["udhr"]:
        lines += ["", "## UDHR parallel texts (test bits per byte, via which embeddings)", ""]
        rows = [
            [u, *(f"{fmt(variants[n]['udhr'][u]['bits_per_byte'])} ({variants[n]['udhr'][u]['via']})" for n in names)]
            for u in cfg["udhr"]
        ]  # fmt: skip
        lines += _table(["text", *names], rows)
    lines += ["", "## Embedding parameters", ""]
    rows = []
    for n in names:
        v = variants[n]
        per = ", ".join(f"{s} {v['embedding_params'][s]:,}" for s in sources)
        rows.append(
            [
                n,
                per,
                f"{max(v['embedding_params'].values()):,}",
                f"{v['embedding_params_sum_over_workers']:,}",
                f"{v['body_params']:,}",
            ]
        )
    lines += _table(["variant", "per source", "max per worker", "sum over workers", "body"], rows)
    lines += [
        "",
        "STD is one model: its sum is its one matrix. GLOB and TRIM workers hold replicas of (rows of) the one",
        "global matrix; SPEC and SPEC-OPT workers hold private matrices.",
        "",
        "## Communication (payload bytes on the wire, both directions)",
        "",
    ]
    rows = []
    for n in names:
        b = variants[n].get("bytes")
        if not b:
            rows.append([n, "–", "–", "–", "–", "no server (STD)"])
            continue
        rows.append(
            [n, f"{b['mean_per_round']:,.0f}", f"{b['total_up']:,}", f"{b['total_down']:,}", f"{b['total']:,}",
             f"{b['ddp_equivalent_bytes'] / max(b['total'], 1):,.0f}x less than data parallel"]
        )  # fmt: skip
    lines += _table(["variant", "per round", "total up", "total down", "total", "vs DDP (computed)"], rows)
    dept = [n for n in names if n in DEPT_VARIANTS]
    if dept:
        lines += ["", "Per round (up + down):", ""]
        rounds = range(cfg["rounds"])
        per_round = {
            n: {r["round"]: r["up"] + r["down"] for r in variants[n]["bytes"]["per_round"]} for n in dept
        }
        rows = [[str(r + 1), *(f"{per_round[n].get(r, 0):,}" for n in dept)] for r in rounds]
        rows.append(["final pull", *(f"{variants[n]['bytes']['final_pull_down']:,}" for n in dept)])
        lines += _table(["round", *dept], rows)
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", "## Checks", ""]
    for n in dept:
        checks = variants[n]["checks"]
        worst = max(abs(c["rebuilt"] - c["worker"]) for c in checks.values())
        lines.append(
            f"- {n}: the rebuilt final replicas score the workers' own final validation bits per byte"
            f" to within {worst:.2e}."
        )
    lines.append("")
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write results.json, the plots and report.md into ``out``; return report.md's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True), encoding="utf-8")
    plots = plot_curves(results, out)
    path = out / "report.md"
    path.write_text(render_markdown(results, plots), encoding="utf-8")
    return path
