"""dept-report: render a dept-server metrics JSONL as a Markdown report with plots."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from dept_comm.errors import InvalidInputError

from .report_plots import BYTE_FIELDS, human_bytes, is_final, number, render_plots

logger = logging.getLogger(__name__)

MISSING = "–"
REPORT_NAME = "report.md"
# Keys of the ``ratios`` object dept-server writes on every round line
# (dept_comm.accounting.RoundMetrics.ratios), with their column headers.
_RATIO_FIELDS = (
    ("up_vs_full_model", "Up / full fp32"),
    ("down_vs_full_model", "Down / full fp32"),
    ("up_vs_uncompressed", "Up / uncompressed"),
    ("down_vs_uncompressed", "Down / uncompressed"),
)
_BYTE_HEADERS = ("Up payload", "Down payload", "Up raw", "Down raw")


class MetricsFileError(InvalidInputError):
    """A metrics JSONL line that is not a JSON object with an integer ``round``."""


def load_records(path: Path) -> list[dict[str, Any]]:
    """Read one metrics record per non-blank line.

    Args:
        path: JSONL file written by dept-server (``--metrics-path``).

    Returns:
        The records in file order.

    Raises:
        MetricsFileError: A line is not valid JSON, not an object, or lacks an integer ``round``;
            the message names the file and line number.
    """
    records: list[dict[str, Any]] = []
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                raise MetricsFileError(f"{path}:{lineno}: invalid JSON: {err}") from None
            if not isinstance(record, dict):
                raise MetricsFileError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            round_idx = record.get("round")
            if isinstance(round_idx, bool) or not isinstance(round_idx, int):
                raise MetricsFileError(f"{path}:{lineno}: missing or non-integer 'round' (got {round_idx!r})")
            records.append(record)
    if not records:
        logger.warning("metrics_empty path=%s", path)
    return records


def _fmt(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _bytes_cell(value: float | None) -> str:
    """Human units plus the exact count, e.g. ``1.50 KiB (1,536 B)``."""
    if value is None:
        return MISSING
    human = human_bytes(value)
    return human if value < 1024 else f"{human} ({int(value):,} B)"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _ratio(record: Mapping[str, Any], key: str) -> float | None:
    """One of the round's payload ratios, from the ``ratios`` object the server writes."""
    return number(record.get("ratios"), key)


def _workers(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    workers = record.get("workers")
    return [w for w in workers if isinstance(w, Mapping)] if isinstance(workers, list) else []


def _num_workers(record: Mapping[str, Any]) -> str:
    count = number(record, "num_workers")
    if count is None and isinstance(record.get("workers"), list):
        count = float(len(record["workers"]))
    return _fmt(count, ".0f")


def _sum_cell(records: Sequence[Mapping[str, Any]], key: str) -> str:
    values = [v for v in (number(r, key) for r in records) if v is not None]
    if not values:
        return MISSING
    note = "" if len(values) == len(records) else f" ({len(values)} of {len(records)} rounds)"
    return _bytes_cell(sum(values)) + note


def _payload_over_raw(records: Sequence[Mapping[str, Any]], direction: str) -> str:
    pairs = [(number(r, f"{direction}_payload_bytes"), number(r, f"{direction}_raw_bytes")) for r in records]
    both = [(p, q) for p, q in pairs if p is not None and q is not None]
    raw_total = sum(q for _, q in both)
    return MISSING if not raw_total else f"{sum(p for p, _ in both) / raw_total:.3g}"


def _byte_rows(records: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Payload bytes, raw bytes and their ratio, up and down, summed over ``records``."""
    return [
        ["Payload bytes", _sum_cell(records, "up_payload_bytes"), _sum_cell(records, "down_payload_bytes")],
        ["Raw bytes", _sum_cell(records, "up_raw_bytes"), _sum_cell(records, "down_raw_bytes")],
        ["Payload / raw", _payload_over_raw(records, "up"), _payload_over_raw(records, "down")],
    ]


def _totals_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    durations = [v for v in (number(r, "duration_s") for r in rounds) if v is not None]
    summary = f"Rounds: {len(rounds)}"
    if durations:
        summary += f"; duration: {sum(durations):.1f} s total, {sum(durations) / len(durations):.1f} s mean"
    return ["## Totals", "", summary, "", *_table(["", "Up", "Down"], _byte_rows(rounds)), ""]


def _final_pull_section(
    finals: Sequence[Mapping[str, Any]], rounds: Sequence[Mapping[str, Any]]
) -> list[str]:
    """The pulls of the final body that workers make after the last round to evaluate it.

    dept-server writes them on its final line (``"kind": "final"``): they belong to no round, so
    they are shown here and not as a round whose upload fell to zero.
    """
    if not finals:
        return []
    final = finals[-1]
    after = f"after round {max(int(r['round']) for r in rounds)}" if rounds else "after the last round"
    lines = [
        "## Final pull",
        "",
        f"Workers pulled the final body {after} to evaluate it (the server's final line, not a round).",
        "",
        *_table(["", "Up", "Down"], _byte_rows([final])),
        "",
    ]
    whole = {d: [number(r, f"{d}_payload_bytes") for r in (*rounds, final)] for d in ("up", "down")}
    if all(v is not None for values in whole.values() for v in values):
        up, down = (sum(v or 0.0 for v in whole[d]) for d in ("up", "down"))
        lines += [
            f"Whole run, rounds plus final pull: {_bytes_cell(up)} up, {_bytes_cell(down)} down (payload).",
            "",
        ]
    return lines


def _bytes_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    headers = ["Round", "Workers", *_BYTE_HEADERS, *(label for _, label in _RATIO_FIELDS), "Duration (s)"]
    rows = [
        [
            str(r["round"]),
            _num_workers(r),
            *(_bytes_cell(number(r, key)) for key in BYTE_FIELDS),
            *(_fmt(_ratio(r, key), ".3g") for key, _ in _RATIO_FIELDS),
            _fmt(number(r, "duration_s"), ".1f"),
        ]
        for r in rounds
    ]
    body = _table(headers, rows) if rows else ["No rounds recorded."]
    return ["## Bytes per round", "", "Summed over the round's workers.", "", *body, ""]


def _workers_section(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [
        [
            str(r["round"]),
            str(w.get("worker_id", MISSING)),
            str(w.get("source", MISSING)),
            *(_bytes_cell(number(w, key)) for key in BYTE_FIELDS),
            _fmt(number(w, "train_loss"), ".4f"),
        ]
        for r in rounds
        for w in _workers(r)
    ]
    headers = ["Round", "Worker", "Source", *_BYTE_HEADERS, "Train loss"]
    return ["## Bytes per worker", "", *(_table(headers, rows) if rows else ["No per-worker data."]), ""]


def _eval_points(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, tuple[int, Mapping[str, Any]]]]:
    """Per source: its first and last per-round evaluation and the final one, as (round, result)."""
    points: dict[str, dict[str, tuple[int, Mapping[str, Any]]]] = {}
    for record in sorted(records, key=lambda r: int(r["round"])):
        evals = record.get("eval")
        if not isinstance(evals, Mapping):
            continue
        for source, result in evals.items():
            if not isinstance(result, Mapping):
                continue
            slots = points.setdefault(str(source), {})
            entry = (int(record["round"]), result)
            if is_final(record):
                slots["final"] = entry
            else:
                slots.setdefault("first", entry)
                slots["last"] = entry
    return points


def _perplexity_section(records: Sequence[Mapping[str, Any]]) -> list[str]:
    headers = ["Source"]
    for label in ("First", "Last", "Final"):
        headers += [f"{label} round", f"{label} ppl", f"{label} bits/byte"]
    rows = []
    for source, slots in sorted(_eval_points(records).items()):
        row = [source]
        for slot in ("first", "last", "final"):
            round_idx, result = slots.get(slot, (None, {}))
            row += [MISSING if round_idx is None else str(round_idx)]
            row += [_fmt(number(result, "ppl"), ".2f"), _fmt(number(result, "bits_per_byte"), ".4f")]
        rows.append(row)
    return ["## Perplexity", "", *(_table(headers, rows) if rows else ["No evaluations recorded."]), ""]


def render_markdown(
    records: Sequence[Mapping[str, Any]], *, images: Sequence[str] = (), title: str = "DEPT run report"
) -> str:
    """Render the report: totals, bytes per round, bytes per worker, final pull, perplexity, plots.

    Args:
        records: Metrics records as returned by ``load_records``; every field but ``round`` optional.
            A record with ``"kind": "final"`` is the run's final pull and evaluation, not a round.
        images: Relative links of PNGs to embed under "Plots".
        title: Top-level heading.

    Returns:
        The Markdown text.
    """
    # The final line (the final pull and evaluation) is no round: it gets its own section.
    rounds = [r for r in records if not is_final(r)]
    finals = [r for r in records if is_final(r)]
    variants = sorted({str(r["variant"]) for r in records if "variant" in r})
    lines = [f"# {title}", "", f"Variant: {', '.join(variants) or MISSING}", ""]
    sections: tuple[Callable[[Sequence[Mapping[str, Any]]], list[str]], ...] = (
        _totals_section,
        _bytes_section,
        _workers_section,
    )
    for section in sections:
        lines += section(rounds)
    lines += _final_pull_section(finals, rounds)
    lines += _perplexity_section(records)
    if images:
        lines += ["## Plots", ""]
        lines += [f"![{Path(link).stem.replace('_', ' ')}]({link})\n" for link in images]
    return "\n".join(lines).rstrip() + "\n"


def write_report(metrics_path: Path, out_dir: Path) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir``.

    Args:
        metrics_path: JSONL file written by dept-server.
        out_dir: Output directory, created if needed.

    Returns:
        Path of ``report.md``.

    Raises:
        MetricsFileError: ``metrics_path`` has a malformed line.
    """
    records = load_records(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = render_plots(records, out_dir)
    links = [png.relative_to(out_dir).as_posix() for png in pngs]
    report_path = out_dir / REPORT_NAME
    report_path.write_text(
        render_markdown(records, images=links, title=f"DEPT run report: {metrics_path.name}")
    )
    logger.info("report_written path=%s num_records=%d num_plots=%d", report_path, len(records), len(pngs))
    return report_path


@click.command()
@click.argument("metrics", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output directory  [default: report/ next to METRICS]",
)
def main(metrics: Path, out_dir: Path | None) -> None:
    """Render METRICS (dept-server's JSONL) as report.md plus plots; print the report path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        report_path = write_report(metrics, out_dir or metrics.parent / "report")
    except MetricsFileError as err:
        raise click.ClickException(str(err)) from err
    click.echo(str(report_path))
