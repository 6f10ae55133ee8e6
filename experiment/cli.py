"""``dept-experiment``: STD against GLOB, TRIM, SPEC and SPEC-OPT on the same sources, seeds and budget."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from .config import PRESETS, VARIANTS, preset
from .dept_run import RunFailedError
from .runner import run_experiment


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(s.strip() for s in value.split(",") if s.strip())


@click.command(context_settings={"show_default": True})
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="smoke")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="[default: runs/experiment-PRESET]")  # fmt: skip
@click.option("--variants", default=None, help=f"Comma-separated subset of {','.join(VARIANTS)}.")
@click.option("--sources", default=None, help="Override the preset's training sources.")
@click.option("--heldout", default=None, help="Override the preset's held-out sources ('' for none).")
@click.option("--seed", type=int, default=None)
@click.option("--rounds", type=click.IntRange(min=1), default=None)
@click.option("--inner-steps", type=click.IntRange(min=1), default=None)
@click.option("--model", default=None, help="Model preset (tiny, small, ...).")
@click.option("--reuse", is_flag=True, help="Evaluate runs already finished in --out with the same training settings instead of training them again.")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch/OpenMP threads per process.")
def main(preset_name: str, out: Path | None, reuse: bool, **overrides: Any) -> None:
    """Train std, glob, trim, spec and spec-opt on the same data and budget; write a report folder.

    DEPT variants run through real dept-server and dept-worker processes on 127.0.0.1; STD runs in
    this process. Progress: one line per phase and per round, with the elapsed time.
    """
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = preset(preset_name)
    changes: dict[str, Any] = {}
    for key in ("variants", "sources", "heldout"):
        value = _split(overrides.pop(key))
        if value is not None:
            changes[key] = value
    changes.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = config.replace(**changes)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    folder = out or Path("runs") / f"experiment-{config.preset}"
    click.echo(f"dept-experiment: preset {config.preset}, variants {','.join(config.variants)} -> {folder}")
    try:
        report = run_experiment(config, folder, lambda line: click.echo(line), reuse=reuse)
    except RunFailedError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"report: {report}")


if __name__ == "__main__":
    main()
