"""dept_comm: a low-communication library for DiLoCo-style training over gRPC.

Tensor codecs, chunked tensor streams with checksums and an explicit commit, byte accounting,
the round coordinator and outer optimizers. It knows tensors, never ``nn.Module``.
"""

from __future__ import annotations

__version__ = "0.1.0"
