"""The command-line options every parameter-server CLI shares (dept-comm-server, dept-server).

One definition: each CLI applies ``RUN_OPTIONS`` (where and how long), its own options, then
``SERVER_OPTIONS`` (outer step, codecs, persistence, metrics, limits, security) with
:func:`apply_options`. Their parameter names are :class:`~dept_comm.server.ServerConfig` fields.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from dept_comm.channel import BindError
from dept_comm.codecs import parse_codec_spec
from dept_comm.errors import DeptError

from .config import OUTER_OPTIMIZERS, OUTER_WEIGHTINGS

__all__ = ["CODECS", "CODEC_HELP", "PEM_FILE", "RUN_OPTIONS", "SERVER_OPTIONS", "apply_options"]

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[Any], Any]

CODECS = ("fp32", "bf16", "bf16-zstd", "int8", "int4", "topk")
CODEC_HELP = f"One of {', '.join(CODECS)}; topk takes options, e.g. topk:k=0.02,bits=2 (README: Codecs)."


def _codec_spec(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Validate a codec spec (name and options) at the command line, with the codec's own message."""
    try:
        name, _ = parse_codec_spec(value)
    except DeptError as err:
        raise click.BadParameter(str(err)) from None
    if name not in CODECS:
        raise click.BadParameter(f"codec {name!r} is not offered here; choose from {', '.join(CODECS)}")
    return value


PEM_FILE = click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)

RUN_OPTIONS: tuple[Decorator, ...] = (
    click.option("--host", default="127.0.0.1"),
    click.option("--port", type=click.IntRange(0, 65535), default=50051),
    click.option("--rounds", type=click.IntRange(min=1), default=3),
    click.option("--workers", type=click.IntRange(min=1), default=2, help="Workers expected per round."),
    click.option(
        "--min-workers", type=click.IntRange(min=1), default=None, help="Quorum [default: --workers]."
    ),
    click.option("--round-timeout", "round_timeout_s", type=click.FloatRange(min=0.1), default=600.0),
)

SERVER_OPTIONS: tuple[Decorator, ...] = (
    click.option("--outer", type=click.Choice(OUTER_OPTIMIZERS), default="fedavg"),
    click.option("--outer-lr", type=float, default=None, help="[default: 1.0 fedavg, 0.7 nesterov]"),
    click.option("--outer-momentum", type=float, default=None, help="[default: 0.9 nesterov]"),
    click.option(
        "--outer-weighting",
        type=click.Choice(OUTER_WEIGHTINGS),
        default="uniform",
        help="Average updates uniformly (the paper) or weighted by the tokens each worker trained on.",
    ),
    click.option("--codec-up", callback=_codec_spec, default="int4", help=CODEC_HELP),
    click.option("--codec-down", callback=_codec_spec, default="int4", help=CODEC_HELP),
    click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None),
    click.option("--resume", is_flag=True, help="Continue from the newest valid checkpoint."),
    click.option(
        "--staging-memory-mib",
        type=click.IntRange(min=0),
        default=None,
        help="MiB of encoded uploads (open, or committed and waiting to be folded) kept in memory;"
        " beyond it they go to files in --staging-dir [default: a quarter of the fp32 body, about one"
        " int8 upload, within 16-1024].",
    ),
    click.option(
        "--stream-window-kib",
        type=click.IntRange(64, 1 << 20),
        default=1024,
        show_default=True,
        help="HTTP/2 receive window per stream (no BDP growth): at most this much of each upload waits"
        " unread in gRPC's buffers, and one upload's rate is at most window / round-trip time"
        " (1 MiB at 50 ms: ~20 MB/s; raise it for fast links with long round trips).",
    ),
    click.option(
        "--staging-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where uploads beyond --staging-memory-mib wait [default: <checkpoint-dir>/staging, else a"
        " temp dir]; stale files are removed at start.",
    ),
    click.option("--metrics-path", type=click.Path(dir_okay=False, path_type=Path), default=None),
    click.option("--metrics-port", type=click.IntRange(0, 65535), default=None),
    click.option(
        "--linger",
        "linger_s",
        type=click.FloatRange(min=0),
        default=0.0,
        help="Serve final metrics this long.",
    ),
    click.option(
        "--heartbeat-timeout",
        "heartbeat_timeout_s",
        type=click.FloatRange(min=0.1),
        default=60.0,
        help="A worker silent this long is dropped; the round closes without it (at quorum).",
    ),
    click.option(
        "--max-workers",
        type=click.IntRange(min=1),
        default=256,
        help="Live workers at most; a further join is refused with RESOURCE_EXHAUSTED (MembershipFullError).",
    ),
    click.option(
        "--max-streams",
        type=click.IntRange(min=1),
        default=32,
        help="Pulls and pushes in flight at once; more are refused with a retry hint the workers honour.",
    ),
    click.option(
        "--max-update-norm-ratio",
        type=click.FloatRange(min=0),
        default=10.0,
        help="Refuse an update whose norm is over this multiple of the round's median (a guard); 0: off.",
    ),
    click.option(
        "--tokens",
        "tokens_file",
        type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
        default=None,
        help="Per-worker tokens: one 'name token' per line; a worker joins only under its own name.",
    ),
    click.option("--token", envvar="DEPT_TOKEN", default=None, help="Shared secret workers must present."),
    click.option(
        "--tls-cert",
        type=PEM_FILE,
        default=None,
        help="PEM certificate chain; with --tls-key the port speaks TLS.",
    ),
    click.option("--tls-key", type=PEM_FILE, default=None, help="PEM private key of --tls-cert."),
    click.option(
        "--tls-client-ca",
        type=PEM_FILE,
        default=None,
        help="PEM CA: require client certificates it signed (mutual TLS).",
    ),
    click.option(
        "--grace",
        "grace_s",
        type=click.FloatRange(min=0),
        default=5.0,
        help="On SIGTERM/SIGINT: seconds in-flight RPCs get to finish.",
    ),
)


def apply_options(options: Sequence[Decorator]) -> Callable[[F], F]:
    """Apply click options in the order given (the first is listed first in --help)."""

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def setup_logging() -> None:
    """The servers' log format on stderr (INFO)."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )


def serve_until_signal(prog: str, serve: Callable[[threading.Event], int]) -> NoReturn:
    """Run ``serve(stop)`` with SIGINT/SIGTERM setting ``stop``, then exit with its status.

    A refused start (port taken, checkpoint directory locked, a ``--resume`` that does not match)
    prints one line, ``PROG: error: ...``, and exits 1 with no traceback: nothing was served or
    written.
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        code = serve(stop)
    except (BindError, DeptError) as err:
        click.echo(f"{prog}: error: {err}", err=True)
        sys.exit(1)
    sys.exit(code)
