"""Error feedback: carry each tensor's compression error into its next encode.

``ErrorFeedback(codec).encode(name, x)`` encodes ``x + r`` (``r`` the residual stored for
``name``, zero at first), decodes the payload itself and keeps ``r' = x + r - decoded``. The sum of
what receivers decode over k rounds is then ``sum(x) - r_k``: the error does not accumulate, so
the accumulated relative error of a repeated tensor falls like 1/k. Residuals are float32 on the
CPU. A lossless codec keeps zero residuals. A non-finite input makes that tensor's residual
non-finite too (and every later payload for it): callers that hit one should ``reset`` it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dept_comm.codecs._common import float32_flat
from dept_comm.codecs.base import Codec
from dept_comm.errors import ManifestMismatchError


class ErrorFeedback:
    """Per-name residuals around one codec. Not thread-safe: one instance per sender."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._residuals: dict[str, torch.Tensor] = {}

    def encode(self, name: str, x: torch.Tensor) -> bytes:
        """The payload for ``x`` plus the stored residual; updates the residual."""
        return self.encode_with_decoded(name, x)[0]

    def encode_with_decoded(self, name: str, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """The payload and what it decodes to (float32, ``x``'s shape): a sender applies the
        decoded value, not ``x``, so that its replica matches every receiver's."""
        shape = tuple(x.shape)
        flat = float32_flat(x)
        residual = self._residuals.get(name)
        if residual is None:
            target = flat
        else:
            if tuple(residual.shape) != shape:
                raise ManifestMismatchError(
                    f"error feedback for {name!r}: residual has shape {list(residual.shape)}, "
                    f"tensor has {list(shape)}"
                )
            target = flat + residual.view(-1)
        payload = self.codec.encode(target)
        decoded = self.codec.decode(payload, (target.numel(),), torch.float32)
        if residual is None:
            residual = (target - decoded).view(shape)
        else:
            torch.sub(target, decoded, out=residual.view(-1))
            residual = residual.view(shape)
        self._residuals[name] = residual
        return payload, decoded.view(shape)

    def residual(self, name: str) -> torch.Tensor | None:
        """The residual stored for ``name`` (float32, the last tensor's shape), or None before
        its first encode."""
        return self._residuals.get(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of every residual (float32), e.g. for a safetensors checkpoint."""
        return {name: r.clone() for name, r in self._residuals.items()}

    def residuals(self) -> dict[str, torch.Tensor]:
        """The residuals themselves (no copy): for a save that finishes before the next encode."""
        return dict(self._residuals)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace every residual with (float32 CPU copies of) ``state``'s."""
        loaded: dict[str, torch.Tensor] = {}
        for name, r in state.items():
            if not isinstance(r, torch.Tensor) or not r.dtype.is_floating_point:
                raise ManifestMismatchError(f"error feedback state {name!r} is not a floating tensor")
            loaded[name] = r.detach().to("cpu", torch.float32).clone().contiguous()
        self._residuals = loaded

    def reset(self, name: str | None = None) -> None:
        """Forget the residual of ``name``, or every residual when None."""
        if name is None:
            self._residuals.clear()
        else:
            self._residuals.pop(name, None)
