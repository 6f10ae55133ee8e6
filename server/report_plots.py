"""dept-report plots: bytes per round and perplexity per source, drawn with the Agg canvas."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BYTES_PNG = "bytes_per_round.png"
PPL_PNG = "perplexity.png"
_LOG_SCALE_SPREAD = 50.0  # max/min above this: values would hug the axis on a linear scale
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
BYTE_FIELDS = ("up_payload_bytes", "down_payload_bytes", "up_raw_bytes", "down_raw_bytes")


def number(mapping: Any, key: str) -> float | None:
    """``mapping[key]`` when it is a finite number (not a bool), else None."""
    if not isinstance(mapping, Mapping):
        return None
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def human_bytes(num_bytes: float, spec: str = ".2f") -> str:
    """``1536`` -> ``"1.50 KiB"``; below 1 KiB the exact count."""
    value, unit = float(num_bytes), 0
    while abs(value) >= 1024 and unit < len(_BYTE_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{int(num_bytes)} B" if unit == 0 else f"{value:{spec}} {_BYTE_UNITS[unit]}"


def is_final(record: Mapping[str, Any]) -> bool:
    """Whether a record is the final evaluation written after the last round."""
    return record.get("kind") == "final"


def _wide_range(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) >= 2 and max(positive) / min(positive) > _LOG_SCALE_SPREAD


def _plot_bytes(all_records: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Bytes of each round, up and down; the final pull (the final line) as its own marker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    records = sorted((r for r in all_records if not is_final(r)), key=lambda r: int(r["round"]))
    finals = [r for r in all_records if is_final(r)]
    rounds = [int(r["round"]) for r in records]
    series = {
        (direction, kind): [number(r, f"{direction}_{kind}_bytes") for r in records]
        for direction in ("up", "down")
        for kind in ("payload", "raw")
    }
    final_pull = {
        direction: (int(finals[-1]["round"]), value)
        for direction in ("up", "down")
        if finals and (value := number(finals[-1], f"{direction}_payload_bytes"))
    }
    present = [v for values in series.values() for v in values if v is not None]
    present += [v for _, v in final_pull.values()]
    if not present:
        logger.info("plot_skipped plot=%s reason=no_byte_fields", path.name)
        return False
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, direction in zip(axes, ("up", "down"), strict=True):
        for kind, style in (("payload", "-o"), ("raw", "--s")):
            ys = [math.nan if v is None else v for v in series[(direction, kind)]]
            ax.plot(rounds, ys, style, label=f"{kind} bytes", markersize=4)
        if direction in final_pull:  # after the last round: a pull to evaluate, not a round
            ax.plot(*final_pull[direction], "*", color="grey", markersize=12, label="final pull (payload)")
        ax.set_title(f"{direction}load (all workers)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
    if _wide_range(present):
        axes[0].set_yscale("log", base=2)  # ticks land on whole KiB/MiB
    else:
        axes[0].set_ylim(bottom=0)  # payload vs raw reads as a true proportion
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v, ".3g") if v >= 0 else ""))
    axes[0].set_ylabel("bytes per round")
    fig.savefig(path, dpi=110)
    return True


def _plot_perplexity(records: Sequence[Mapping[str, Any]], path: Path) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    per_round: dict[str, list[tuple[int, float]]] = {}
    final: dict[str, tuple[int, float]] = {}
    for record in records:
        evals = record.get("eval")
        if not isinstance(evals, Mapping):
            continue
        for source, result in evals.items():
            ppl = number(result, "ppl")
            if ppl is None:
                continue
            if is_final(record):
                final[str(source)] = (int(record["round"]), ppl)
            else:
                per_round.setdefault(str(source), []).append((int(record["round"]), ppl))
    sources = sorted(set(per_round) | set(final))
    if not sources:
        logger.info("plot_skipped plot=%s reason=no_eval_ppl", path.name)
        return False
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    all_ppl: list[float] = []
    for idx, source in enumerate(sources):
        color = f"C{idx % 10}"
        points = sorted(per_round.get(source, []))
        if source in final:
            # Dashed hop to the final evaluation so it reads as part of the same run.
            tail = points[-1:] + [final[source]]
            ax.plot([p[0] for p in tail], [p[1] for p in tail], ":", color=color)
            ax.plot(*final[source], "*", color=color, markersize=12)
            all_ppl.append(final[source][1])
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color=color, label=source, markersize=4)
        all_ppl.extend(p[1] for p in points)
    if final:
        ax.plot([], [], "*", color="grey", markersize=10, label="final")
    if _wide_range(all_ppl):
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("perplexity")
    ax.set_title("eval perplexity per source")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    return True


def render_plots(records: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """Draw ``bytes_per_round.png`` and ``perplexity.png`` into ``out_dir``.

    A plot with no data is skipped with a logged note. The final line (``"kind": "final"``) is
    no round: its pull is drawn as one marker after the rounds, its evaluation as the final point.

    Args:
        records: Metrics records as returned by ``load_records``.
        out_dir: Existing or new directory for the PNGs.

    Returns:
        Paths of the PNGs written, in the order above.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, plot in ((BYTES_PNG, _plot_bytes), (PPL_PNG, _plot_perplexity)):
        path = out_dir / name
        if plot(records, path):
            written.append(path)
    return written
