"""``dept-tokenizer``: train the global (and per-source) tokenizers from data specs and print their digests.

GLOB and TRIM need one global tokenizer that the server and every worker share: build it once
here, copy the folder to each machine, and check the printed digest (dept-server and dept-worker
compare the same digest at Join). ``--per-source`` also trains SPEC-OPT's per-source tokenizers.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from dept_model.data import DataSourceError
from dept_model.tokenizer import KINDS, build_tokenizers, load_tokenizer, vocab_digest


@click.command(context_settings={"show_default": True})
@click.option("--data", "data", required=True,
              help="Comma-separated data specs, as dept-worker --data takes them: sw,en,local:/x,hf:NAME.")  # fmt: skip
@click.option("--vocab-size", type=click.IntRange(min=258), default=2048)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--per-source", is_flag=True, help="Also one tokenizer per source (spec-opt).")
@click.option("--kind", type=click.Choice(KINDS), default="bpe")
@click.option("--split", default="train")
@click.option("--limit-bytes", type=click.IntRange(min=1), default=None, help="Text read per source.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per tokenizer instead of a table.")
def main(
    data: str,
    vocab_size: int,
    out: Path,
    per_source: bool,
    kind: str,
    split: str,
    limit_bytes: int | None,
    as_json: bool,
) -> None:
    """Train (or reuse, when the inputs are unchanged) the tokenizers and print name, size, digest, path."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    specs = [s.strip() for s in data.split(",") if s.strip()]
    try:
        paths = build_tokenizers(
            specs,
            vocab_size=vocab_size,
            out_dir=out,
            per_source=per_source,
            split=split,
            kind=kind,
            limit_bytes=limit_bytes,
        )
    except (ValueError, DataSourceError) as err:
        raise click.UsageError(str(err)) from err
    for name, path in paths.items():
        tok = load_tokenizer(path)
        row = {
            "name": name,
            "vocab_size": tok.get_vocab_size(),
            "digest": vocab_digest(tok),
            "path": str(path),
        }
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(f"{name:<12} {row['vocab_size']:>7} {row['digest']} {path}")


if __name__ == "__main__":
    main()
