"""``dept-bench``: run one benchmark and print its JSON object on stdout."""

from __future__ import annotations

import importlib
import inspect
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
    "load": "dept_bench.load",
    "codecs-quality": "dept_bench.codecs_quality",
    "link": "dept_bench.link",
    "overlap": "dept_bench.overlap",
    "pipeline": "dept_bench.pipeline",
}


def load(module: str) -> Any:
    """Import a benchmark's module, ``dept_comm`` first: it chooses gRPC's transport before the
    benchmark imports grpc (``dept_comm.grpc_env``), as in dept-server and dept-worker."""
    importlib.import_module("dept_comm")
    return importlib.import_module(module)


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
    @click.option(
        "--device", default=None, help="cpu or cuda (step, codecs) [default: the benchmark's choice]."
    )
    @click.option("--presets", default=None, help="step: comma-separated presets, e.g. 125m,350m.")
    @click.option(
        "--runs",
        default=None,
        help="load: comma-separated WORKERSxBODY_MIB, e.g. 64x64,8x512 [default: all].",
    )
    @click.option(
        "--staging-memory-mib",
        type=int,
        default=None,
        help="load: the server's --staging-memory-mib [default: the server's, a quarter of the body].",
    )
    def command(
        as_json: bool,
        quick: bool,
        device: str | None,
        presets: str | None,
        runs: str | None,
        staging_memory_mib: int | None,
    ) -> None:
        run = load(module).run
        accepted = inspect.signature(run).parameters
        options: dict[str, Any] = {"quick": quick}
        for key, value in (
            ("device", device),
            ("presets", presets),
            ("runs", runs),
            ("staging_memory_mib", staging_memory_mib),
        ):
            if value is not None:
                if key not in accepted:
                    raise click.UsageError(f"dept-bench {name} takes no --{key}")
                options[key] = value
        _emit(run(**options), as_json)

    command.__doc__ = f"Run the {name} benchmark."
    return click.command(name)(command)


for _name, _module in _BENCHMARKS.items():
    main.add_command(_command(_name, _module))


if __name__ == "__main__":
    main()
