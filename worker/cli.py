"""``dept-worker``: parse flags, build the WorkerConfig, run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from dept_comm.grpc_env import transport
from dept_comm.memory import keep_freed_memory
from dept_comm.parallel import DEFAULT_STREAMS, MAX_STREAMS

from .config import WorkerConfig
from .device import DEVICE_HELP
from .dist import NodeEnv
from .loop import run
from .node import launch_torchrun, prepare, run_node
from .signals import run_until_signalled

PEM_FILE = click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)


@click.command(context_settings={"show_default": True})
@click.option("--server", default="127.0.0.1:50051", help="dept-server address, HOST:PORT.")
@click.option("--source", required=True, help="Data source id, e.g. sw (embedded corpus) .")
@click.option("--name", default=None, help="Stable worker name [default: the source id].")
@click.option("--inner-steps", type=click.IntRange(min=1), default=20)
@click.option("--batch-size", type=click.IntRange(min=1), default=8)
@click.option("--seq-len", type=click.IntRange(min=8), default=128)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3)
@click.option("--device", default="auto", help=DEVICE_HELP)
@click.option("--data", default=None, help="Catalog spec: SOURCE, local:PATH or hf:NAME[/CONFIG].")
@click.option("--vocab", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option(
    "--vocab-size", type=click.IntRange(min=64), default=2048, help="When training its own tokenizer."
)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--eval-batches", type=click.IntRange(min=1), default=4)
@click.option("--seed", type=int, default=0)
@click.option("--token", envvar="DEPT_TOKEN", default=None)
@click.option("--tls-ca", type=PEM_FILE, default=None, help="PEM CA that verifies the server; turns TLS on.")
@click.option("--tls-cert", type=PEM_FILE, default=None, help="PEM client certificate (mutual TLS).")
@click.option("--tls-key", type=PEM_FILE, default=None, help="PEM private key of --tls-cert.")
@click.option(
    "--tls-server-name", default=None, help="Name the server certificate must carry [default: the host]."
)
@click.option(
    "--min-bandwidth-mbps",
    type=click.FloatRange(min=0.001),
    default=1.0,
    show_default=True,
    help="A pull or push that moves no 1 MiB chunk in 3x the time this rate needs is cancelled and resumed.",
)
@click.option(
    "--progress-interval",
    "progress_interval_s",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds between progress lines of a long pull or push (bytes, rate, ETA) and of the inner steps "
    "(step k/K, running loss); shorter work logs none.",
)
@click.option(
    "--streams",
    type=click.IntRange(1, MAX_STREAMS),
    default=DEFAULT_STREAMS,
    show_default=True,
    help="Concurrent gRPC streams each pull and push is spread over (one stream is bound by one CPU "
    "core near 1.3-1.5 GB/s; 1: the single-stream protocol).",
)
@click.option("--compile", is_flag=True, help="torch.compile the training step.")
@click.option(
    "--overlap",
    is_flag=True,
    help="Train the next round while this round's update is sent and the new body pulled (a "
    "one-round-delayed outer update; spec/spec-opt, single-process workers). README: Overlap.",
)
@click.option(
    "--attn",
    type=click.Choice(["auto", "flex", "sdpa"]),
    default="auto",
    help="ALiBi attention: auto = flex on CUDA.",
)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, help="Micro-batches per inner step.")
@click.option("--activation-checkpointing", is_flag=True, help="Recompute each block in the backward pass.")
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    help="Run one worker across this many ranks (GPUs) of this host: launches torchrun (README: Multi-GPU nodes).",
)
@click.option(
    "--parallel",
    type=click.Choice(["auto", "ddp", "fsdp"]),
    default="auto",
    help="Under torchrun: whole model per rank (ddp) or sharded (fsdp); auto: fsdp for the 1.3b preset.",
)
@click.option(
    "--dist-timeout",
    "dist_timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    help="Under torchrun: seconds a collective, or rank 0's silence, may last before the ranks give up.",
)
@click.option(
    "--reconnect-timeout",
    "reconnect_timeout_s",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="Seconds a call keeps retrying while the server cannot be reached (e.g. it restarts with --resume).",
)
def main(**options: object) -> None:
    """Train one data source and exchange body updates with dept-server.

    Exit status: 0 once the run finished (final evaluation reported); on SIGTERM or SIGINT the
    round in flight is dropped uncommitted (an upload still streaming is cancelled), the worker
    sends Leave (reason "terminated") and exits with 128 + the signal number: 143 for SIGTERM,
    130 for SIGINT. A second signal while it leaves ends it at once.
    """
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # Reuse freed memory instead of page-faulting fresh chunks in: ~2x the stream throughput here.
    keep_freed_memory(max_arenas=0)
    logging.getLogger(__name__).info(transport().describe())
    nproc_per_node = int(options.pop("nproc_per_node"))  # type: ignore[call-overload]
    env = NodeEnv.from_environ()  # set by torchrun: this process is one rank of a node's worker
    try:
        config = WorkerConfig(**options)  # type: ignore[arg-type]
        config.channel_credentials()  # unreadable or non-PEM files: a usage error now, not at connect
        config = prepare(config, env, nproc_per_node)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    if env is None and nproc_per_node > 1:
        launch_torchrun(sys.argv[1:], nproc_per_node)
    # Under torchrun the ranks stop as torchrun tells them; a single process leaves on SIGTERM.
    sys.exit(run_node(config, env) if env is not None else run_until_signalled(config, run))


if __name__ == "__main__":
    main()
