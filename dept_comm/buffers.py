"""Large receive buffers backed by transparent huge pages, to cut page-fault cost on hot paths."""

from __future__ import annotations

import mmap

import torch

# Below this, the allocator's pages are cheap enough; above it, 2 MiB pages cut faults ~500x.
HUGE_MIN_BYTES = 4 << 20
_HUGE = 2 << 20


def empty_bytes(num_bytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``num_bytes``, page aligned.

    Large buffers come from an anonymous mapping advised ``MADV_HUGEPAGE``: on this kind of
    machine a fresh 4 KiB-paged buffer costs ~0.8 ms per MiB in page faults when first written,
    which is as much as the whole receive path. Small ones use torch's allocator.
    """
    if num_bytes < HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(num_bytes, dtype=torch.uint8)
    size = -(-num_bytes // _HUGE) * _HUGE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    # frombuffer keeps a reference to the mapping for as long as the tensor lives.
    return torch.frombuffer(region, dtype=torch.uint8, count=num_bytes)
