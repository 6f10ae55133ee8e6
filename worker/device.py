"""``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:K``, checked once and resolved to one torch device."""

from __future__ import annotations

import re

import torch

DEVICE_HELP = (
    "auto (the local rank's GPU when CUDA is available, else the CPU), cpu, cuda (the local rank's GPU) "
    "or cuda:K (GPU K; single-process workers only)."
)
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def check_device(spec: str) -> None:
    """Refuse a --device value that is none of the accepted forms (no CUDA query: usable anywhere).

    Raises:
        ValueError: naming the value and the accepted forms.
    """
    if spec in ("auto", "cpu", "cuda") or _CUDA_INDEX.fullmatch(spec):
        return
    raise ValueError(f"device must be auto, cpu, cuda or cuda:K (K a GPU index), got {spec!r}")


def resolve_device(spec: str, *, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The torch device a process with ``local_rank`` on its node uses for ``spec``.

    ``auto`` is the local rank's GPU when CUDA is available, else the CPU; ``cuda`` is the local
    rank's GPU; ``cuda:K`` is GPU K, refused for a node of several ranks (each rank needs its own
    GPU, and NCCL refuses two ranks on one device).

    Raises:
        ValueError: a malformed value, CUDA asked for but unavailable, or a GPU index out of range.
    """
    check_device(spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {spec}: CUDA is not available (torch {torch.__version__}, "
            f"{torch.cuda.device_count()} GPUs visible); use --device cpu or auto"
        )
    match = _CUDA_INDEX.fullmatch(spec)
    if match is not None and world_size > 1:
        raise ValueError(
            f"--device {spec} names one GPU, but this worker runs {world_size} ranks: use --device auto "
            "or cuda (each rank takes the GPU of its local rank)"
        )
    index = int(match.group(1)) if match is not None else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"--device {spec}: GPU {index} asked for, but only {count} CUDA devices are visible")
    return torch.device("cuda", index)
