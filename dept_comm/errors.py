"""Domain errors of dept_comm; each names the gRPC status a servicer should answer with."""

from __future__ import annotations

from typing import ClassVar


class DeptError(Exception):
    """Base of every error dept_comm raises on purpose.

    ``status`` is the name of the ``grpc.StatusCode`` member a servicer maps it to, kept as a
    string so that this module needs no gRPC import.
    """

    status: ClassVar[str] = "INTERNAL"


class InvalidInputError(DeptError):
    """Malformed input that retrying will not fix."""

    status = "INVALID_ARGUMENT"


class UnknownCodecError(InvalidInputError):
    """A codec name that is not registered."""


class SizeLimitError(InvalidInputError):
    """A declared or decoded size is over its cap (oversized tensors, decompression bombs)."""


class ManifestMismatchError(InvalidInputError):
    """A tensor's name, shape, dtype or count disagrees with the expected manifest."""


class ResumeMismatchError(ManifestMismatchError):
    """A checkpoint made by a run with other settings (variant, model, vocabulary) than this one."""


class NonFiniteError(InvalidInputError):
    """A decoded tensor holds NaN or Inf."""


class StreamOrderError(InvalidInputError):
    """Chunks out of sequence, missing headers, or indices past the declared counts."""


class MalformedMessageError(InvalidInputError):
    """Bytes that do not parse as the expected protobuf message."""


class CommitMismatchError(InvalidInputError):
    """A commit whose chunk count or digest does not match what was received."""


class ChecksumError(DeptError):
    """A chunk whose checksum does not match its bytes; resend that chunk."""

    status = "DATA_LOSS"


class ConflictError(DeptError):
    """The same chunk or upload id arrived twice with different content."""

    status = "ALREADY_EXISTS"


class StaleRoundError(DeptError):
    """A message for a round that has closed (or a base state that is no longer current)."""

    status = "ABORTED"


class RoundNotOpenError(DeptError):
    """A message for a round that is not open yet, or a worker not admitted to it."""

    status = "FAILED_PRECONDITION"


class RunFinishedError(DeptError):
    """The run is over; nothing more is accepted."""

    status = "FAILED_PRECONDITION"


class UnauthenticatedError(DeptError):
    """Missing or wrong credentials."""

    status = "UNAUTHENTICATED"


class PermissionDeniedError(DeptError):
    """Valid credentials used for another worker's resources."""

    status = "PERMISSION_DENIED"


class OverloadedError(DeptError):
    """The server is busy (too many streams at once); back off and retry.

    ``retry_after_s`` is the server's hint: the client waits at least that long, with jitter,
    before trying again (it travels as the ``dept-retry-after-ms`` trailing metadata).
    """

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class MembershipFullError(DeptError):
    """The server already has ``--max-workers`` live workers; this one cannot join (no retry hint)."""

    status = "RESOURCE_EXHAUSTED"


class OutlierUpdateError(DeptError):
    """An update whose norm is far outside the round's (``--max-update-norm-ratio``): refused, not
    counted; the worker skips this round's contribution and takes part in the next one."""

    status = "FAILED_PRECONDITION"


class NotFoundError(DeptError):
    """An unknown worker or upload id."""

    status = "NOT_FOUND"


class ServerUnreachableError(DeptError):
    """No connection to the parameter server at ``address`` within ``waited_s`` seconds."""

    status = "UNAVAILABLE"

    def __init__(self, address: str, waited_s: float = 0.0) -> None:
        super().__init__(f"no parameter server answered at {address} within {waited_s:.1f} s")
        self.address = address
        self.waited_s = waited_s
