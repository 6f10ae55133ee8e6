"""Two network namespaces joined by a tbf-shaped veth (``dept_bench.netns``): bytes cross intact,
the namespaces are gone afterwards. Skipped, with the reason, where root or iproute2 is missing.

``setns`` moves only the calling thread, so each side runs in its own thread.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest

from dept_bench import netns

REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"netns+tbf unavailable: {REASON}")
WAIT_S = 30.0


def test_bytes_cross_the_shaped_link_intact_and_namespaces_are_removed() -> None:
    data = os.urandom(1 << 20)
    got = bytearray()
    errors: list[BaseException] = []
    with netns.tbf_link(200) as link:
        ready = threading.Event()

        def server() -> None:
            try:
                netns.enter(link.server_ns)
                with socket.create_server((link.server_ip, 0)) as listener:
                    listener.settimeout(WAIT_S)
                    server.port = listener.getsockname()[1]  # type: ignore[attr-defined]
                    ready.set()
                    conn, _ = listener.accept()
                    with conn:
                        conn.settimeout(WAIT_S)
                        while chunk := conn.recv(1 << 16):
                            got.extend(chunk)
            except BaseException as err:
                errors.append(err)
                ready.set()

        def client() -> None:
            try:
                netns.enter(link.client_ns)
                with socket.create_connection((link.server_ip, server.port), timeout=WAIT_S) as s:  # type: ignore[attr-defined]
                    s.sendall(data)
            except BaseException as err:
                errors.append(err)

        srv = threading.Thread(target=server)
        srv.start()
        assert ready.wait(WAIT_S)
        cli = threading.Thread(target=client)
        cli.start()
        cli.join(WAIT_S)
        srv.join(WAIT_S)
        assert not errors, errors
        names = (link.server_ns, link.client_ns)
    assert bytes(got) == data
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(n in listed for n in names)
