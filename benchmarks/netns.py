"""A kernel-shaped link: two network namespaces joined by a veth pair with a ``tbf`` rate limit.

``tbf_link(rate_mbit)`` creates namespaces ``dept-<pid>-s`` (server side, 10.203.0.1) and
``dept-<pid>-c`` (client side, 10.203.0.2), a veth pair between them with ``tbf`` on both ends,
and removes all of it on exit (deleting a namespace deletes its veth end). A process joins one
with ``enter(name)`` (``setns`` through libc) before it opens sockets. Needs root and ``ip``/``tc``
(iproute2); ``unavailable()`` says why not where they are missing. This kernel has no ``netem``,
so delay still comes from the userspace relay (``linkemu``), run inside the server namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
SERVER_IP = "10.203.0.1"
CLIENT_IP = "10.203.0.2"


@dataclass(frozen=True)
class TbfLink:
    server_ns: str
    client_ns: str
    server_ip: str = SERVER_IP
    client_ip: str = CLIENT_IP


def unavailable() -> str | None:
    """Why namespaces cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (iproute2) is not installed"
    probe = f"dept-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as err:
        return f"ip netns add failed: {err.stderr.strip() if err.stderr else err}"
    _ip("netns", "del", probe)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def tbf_link(rate_mbit: float) -> Iterator[TbfLink]:
    """Two namespaces joined by veth, each end shaped to ``rate_mbit`` by tbf; removed on exit."""
    tag = f"dept-{os.getpid()}"
    link = TbfLink(f"{tag}-s", f"{tag}-c")
    veth_s, veth_c = f"{tag[:9]}s", f"{tag[:9]}c"
    created: list[str] = []
    try:
        for ns in (link.server_ns, link.client_ns):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", veth_s, "type", "veth", "peer", "name", veth_c)
        _ip("link", "set", veth_s, "netns", link.server_ns)
        _ip("link", "set", veth_c, "netns", link.client_ns)
        rate = f"{rate_mbit}mbit"
        # burst: at least one rate-interval's worth (10 ms) and 64 KiB; latency bounds tbf's queue
        burst = max(64 << 10, int(rate_mbit * 1e6 / 8 / 100))
        for ns, dev, ip in (
            (link.server_ns, veth_s, link.server_ip),
            (link.client_ns, veth_c, link.client_ip),
        ):
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _tc(
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                str(burst),
                "latency",
                "100ms",
            )
        yield link
    finally:
        for ns in created:
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _ip("netns", "del", ns)


def enter(ns: str) -> None:
    """Move the calling process (all of its later sockets) into namespace ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)
