"""``dept-bench``: run one benchmark and print its JSON object on stdout."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from typing import Any

import click

# subcommand -> module under dept_bench exposing ``run(**options) -> dict``
_BENCHMARKS = {
    "codecs": "dept_bench.codecs",
    "wire": "dept_bench.wire",
    "step": "dept_bench.step",
}


def _emit(result: dict[str, Any], as_json: bool) -> None:
    text = json.dumps(result, indent=None if as_json else 2, sort_keys=False)
    sys.stdout.write(text + "\n")


@click.group()
def main() -> None:
    """Reproducible measurements; each prints one JSON object."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")


def _command(name: str, module: str) -> click.Command:
    @click.option("--json", "as_json", is_flag=True, help="Print compact JSON (one line).")
    @click.option("--quick", is_flag=True, help="Smaller inputs, for smoke tests.")
    def command(as_json: bool, quick: bool) -> None:
        run = importlib.import_module(module).run
        _emit(run(quick=quick), as_json)

    command.__doc__ = f"Run the {name} benchmark."
    return click.command(name)(command)


for _name, _module in _BENCHMARKS.items():
    main.add_command(_command(_name, _module))
