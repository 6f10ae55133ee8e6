"""TLS material for gRPC: credentials for servers (optionally mutual) and channels, PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc

__all__ = ["channel_credentials", "read_pem", "server_credentials"]


def server_credentials(
    cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None
) -> grpc.ServerCredentials:
    """TLS credentials for ``bind``: the server's certificate chain and key, PEM-encoded.

    With ``client_ca_pem`` the server does mutual TLS: the handshake fails (before any handler
    or interceptor runs) unless the client presents a certificate signed by that CA.

    Raises:
        ValueError: an empty certificate or key.
    """
    if not cert_pem or not key_pem:
        raise ValueError("server TLS needs both a certificate chain and its private key")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=client_ca_pem,
        require_client_auth=client_ca_pem is not None,
    )


def channel_credentials(
    ca_pem: bytes | None, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for ``open_channel``: the roots that verify the server, and an optional client cert.

    ``ca_pem`` None means gRPC's default roots. ``cert_pem`` and ``key_pem`` (both or neither)
    are the client certificate for a server that requires mutual TLS.

    Raises:
        ValueError: only one of ``cert_pem`` and ``key_pem``.
    """
    if (cert_pem is None) != (key_pem is None):
        raise ValueError("a client certificate needs its private key and vice versa (both or neither)")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def read_pem(path: Path, flag: str) -> bytes:
    """The bytes of a PEM file, checked for a ``-----BEGIN`` line so a wrong file fails here, clearly.

    ``flag`` names the option the path came from, for the message.

    Raises:
        ValueError: the file cannot be read or holds no PEM block.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot read it ({err.strerror})") from err
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data
