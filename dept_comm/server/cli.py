"""``dept-comm-server``: a parameter server over the tensors of a safetensors file.

Workers speaking ``dept_comm``'s protocol join, pull these tensors, push their deltas each round;
the server averages them and runs the outer step. ``--save`` writes the final tensors.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import click
import torch

from .config import ServerConfig
from .hooks import ServerHooks
from .options import RUN_OPTIONS, SERVER_OPTIONS, apply_options, serve_until_signal, setup_logging
from .run import RunningServer, run, start_server, tune_malloc

__all__ = ["load_tensors", "main"]

LIBRARY_OPTIONS = (
    click.option(
        "--tensors",
        "tensors_path",
        type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
        required=True,
        help="The initial tensors (a .safetensors file: name -> tensor; floating point).",
    ),
    click.option(
        "--save",
        "save_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Write the final tensors here (.safetensors) when the server stops.",
    ),
    click.option("--label", default="", help="The run's label in metrics (RoundMetrics.variant)."),
)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a safetensors file, as float32.

    Raises:
        ValueError: the file cannot be read, holds no tensor, or one that is not floating point.
    """
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own types for a bad header
        raise ValueError(f"--tensors {path}: not a readable safetensors file ({err})") from err
    if not tensors:
        raise ValueError(f"--tensors {path}: holds no tensor")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"--tensors {path}: tensor {name!r} is {t.dtype}, not floating point")
    return {name: t.to(torch.float32) for name, t in tensors.items()}


def _save(running: RunningServer, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in running.app.model.shared.items()}, str(path))
    logging.getLogger(__name__).info("saved tensors=%d path=%s", len(running.app.model.shared), path)


@click.command(context_settings={"show_default": True})
@apply_options([*RUN_OPTIONS, *LIBRARY_OPTIONS, *SERVER_OPTIONS])
def main(tensors_path: Path, save_path: Path | None, label: str, **options: object) -> None:
    """Run a parameter server for DiLoCo-style rounds over the tensors of --tensors.

    Prints {"event": "listening", "port": P, ...} once it serves and a summary at the end.
    SIGTERM or SIGINT stops it gracefully (an unfinished run is checkpointed with
    --checkpoint-dir); exit status 0, or 1 with one line on a refused start.
    """
    setup_logging()
    tune_malloc()
    try:
        config = ServerConfig(**options)  # type: ignore[arg-type]
        config.tls_pems()
        tensors = load_tensors(tensors_path)
    except ValueError as err:
        raise click.UsageError(str(err)) from err

    def serve(stop: threading.Event) -> int:
        running = start_server(config, tensors, ServerHooks(label=label), copy=False)
        code = run(running, stop)
        if save_path is not None:
            _save(running, save_path)
        return code

    serve_until_signal("dept-comm-server", serve)


if __name__ == "__main__":
    main()
