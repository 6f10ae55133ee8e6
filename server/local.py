"""``dept-local``: one dept-server and N dept-worker processes on loopback, then the report."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import click

from dept_model.tokenizer import build_tokenizers

from .config import VARIANTS

logger = logging.getLogger(__name__)


def _start_server(args: list[str], log: IO[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dept_server.cli", *args], stdout=subprocess.PIPE, stderr=log, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise click.ClickException(f"dept-server exited with {proc.wait()} before listening; see {log.name}")
    return proc, int(json.loads(line)["port"])


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt_eval(evals: dict[str, Any], source: str, key: str) -> str:
    value = evals.get(source, {}).get(key)
    return f"{value:.3f}" if isinstance(value, int | float) else "–"


def run_local(
    *,
    variant: str,
    sources: list[str],
    rounds: int,
    inner_steps: int,
    model: str,
    out: Path,
    codec_up: str,
    codec_down: str,
    vocab_size: int,
    batch_size: int,
    seq_len: int,
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    click.echo(
        f"dept-local: variant={variant} sources={','.join(sources)} rounds={rounds} model={model} -> {out}"
    )
    toks = build_tokenizers(
        sources, vocab_size=vocab_size, out_dir=out / "tokenizers", per_source=variant == "spec-opt"
    )
    server_args = [
        "--port", "0", "--rounds", str(rounds), "--workers", str(len(sources)), "--variant", variant,
        "--model", model, "--vocab", str(toks["global"]), "--codec-up", codec_up, "--codec-down", codec_down,
        "--metrics-path", str(metrics), "--checkpoint-dir", str(out / "checkpoints"), "--round-timeout", "1800",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / "server.log", "w") as server_log:
        server, port = _start_server(server_args, server_log)
        workers = []
        for source in sources:
            vocab = toks.get(source, toks["global"]) if variant == "spec-opt" else toks["global"]
            args = [
                "--server", f"127.0.0.1:{port}", "--source", source, "--vocab", str(vocab),
                "--inner-steps", str(inner_steps), "--batch-size", str(batch_size), "--seq-len", str(seq_len),
                "--state-dir", str(out / "workers" / source),
            ]  # fmt: skip
            log = open(logs / f"worker-{source}.log", "w")  # noqa: SIM115 (closed below)
            cmd = [sys.executable, "-m", "dept_worker.cli", *args]
            workers.append((source, subprocess.Popen(cmd, stdout=log, stderr=log, env=env), log))
        seen = 0
        started = time.monotonic()
        while server.poll() is None or any(p.poll() is None for _, p, _ in workers):
            for rec in _records(metrics)[seen:]:
                seen += 1
                if rec.get("kind") == "final":
                    continue
                losses = ", ".join(
                    f"{w['source']}={w['train_loss']:.3f}"
                    for w in rec["workers"]
                    if w.get("train_loss") is not None
                )
                click.echo(
                    f"  round {rec['round']}: up {rec['up_payload_bytes']:,} B, down {rec['down_payload_bytes']:,} B,"
                    f" train loss {losses} ({time.monotonic() - started:.0f} s)"
                )
            if any(p.poll() not in (None, 0) for _, p, _ in workers):
                break
            time.sleep(0.5)
        codes = {source: p.wait() for source, p, _ in workers}
        for _, _, log in workers:
            log.close()
        if any(codes.values()):
            server.terminate()
        server_code = server.wait(timeout=120)
    if server_code != 0 or any(codes.values()):
        raise click.ClickException(f"server exit {server_code}, workers {codes}; logs in {logs}")
    records = _records(metrics)
    _print_tables(records, sources)
    from .report import write_report

    report = write_report(metrics, out / "report")
    click.echo(f"report: {report}")
    return 0


def _print_tables(records: list[dict[str, Any]], sources: list[str]) -> None:
    rounds = [r for r in records if r.get("kind") != "final"]
    final: dict[str, Any] = next((r for r in records if r.get("kind") == "final"), {"eval": {}})
    click.echo("\nbytes per round (payload = protobuf bytes on the wire; raw = fp32 tensor bytes)")
    click.echo(
        f"{'round':>5} {'up payload':>12} {'up raw':>12} {'down payload':>13} {'down raw':>12} {'up/raw':>8}"
    )
    for r in rounds:
        ratio = r["up_payload_bytes"] / max(r["up_raw_bytes"], 1)
        click.echo(
            f"{r['round']:>5} {r['up_payload_bytes']:>12,} {r['up_raw_bytes']:>12,} {r['down_payload_bytes']:>13,}"
            f" {r['down_raw_bytes']:>12,} {ratio:>8.3f}"
        )
    before = rounds[0].get("eval", {}) if rounds else {}
    click.echo("\nvalidation per source, before training -> after the last round")
    click.echo(f"  {'source':>10} {'perplexity':>22} {'bits per byte':>18}")
    for source in sources:
        ppl = f"{_fmt_eval(before, source, 'ppl')} -> {_fmt_eval(final['eval'], source, 'ppl')}"
        bpb = f"{_fmt_eval(before, source, 'bits_per_byte')} -> {_fmt_eval(final['eval'], source, 'bits_per_byte')}"
        click.echo(f"  {source:>10} {ppl:>22} {bpb:>18}")


@click.command(context_settings={"show_default": True})
@click.option("--variant", type=click.Choice(VARIANTS), default="spec")
@click.option("--sources", default="sw,en,zh", help="Comma-separated embedded sources, one worker each.")
@click.option("--rounds", type=click.IntRange(min=1), default=3)
@click.option("--inner-steps", type=click.IntRange(min=1), default=30)
@click.option("--model", default="tiny")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="[default: runs/local-VARIANT]",
)
@click.option("--codec-up", default="int4")
@click.option("--codec-down", default="int4")
@click.option("--vocab-size", type=click.IntRange(min=300), default=2048)
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option("--seq-len", type=click.IntRange(min=8), default=128)
def main(variant: str, sources: str, out: Path | None, **options: Any) -> None:
    """Run DEPT end to end on this machine: a server and one worker per source, on loopback."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    source_list = [s.strip() for s in sources.split(",") if s.strip()]
    sys.exit(
        run_local(
            variant=variant, sources=source_list, out=out or Path("runs") / f"local-{variant}", **options
        )
    )
