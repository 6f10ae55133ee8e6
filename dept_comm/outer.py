"""Outer optimizers: turn the round's mean worker update into the update the server applies."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Protocol

import torch

from dept_comm.errors import InvalidInputError, ManifestMismatchError, NonFiniteError

logger = logging.getLogger(__name__)

# DiLoCo convention. Worker k sends Δ_k = θ_k − θ_{t−1}; the outer gradient is g = −mean_k Δ_k.
# An optimizer returns the UPDATE u_t to add (θ_t = θ_{t−1} + u_t) and never applies it itself:
# the server encodes u_t for the down-link, decodes it, and adds the *decoded* update to its own
# copy, so that its body stays bit-identical to every worker's.


# State is one flat ``dict[str, Tensor]`` so that it is a checkpoint group as it stands: scalars
# are 0-d tensors, the optimizer kind is its name in ASCII bytes (uint8), momentum buffers are
# ``buf.<tensor name>``. An empty mapping means "fresh state".
KIND_KEY = "kind"
STEPS_KEY = "num_steps"
BUF_PREFIX = "buf."


def _kind_tensor(name: str) -> torch.Tensor:
    return torch.tensor(list(name.encode("ascii")), dtype=torch.uint8)


def _scalar(x: float | int) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64 if isinstance(x, float) else torch.int64)


class OuterOptimizer(Protocol):
    """Maps the round's mean update ``mean_k Δ_k`` to the update the server adds to the body."""

    name: str
    num_steps: int  # outer steps taken (rounds applied)

    def step(self, avg_delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the update to add to the global parameters (fp32, new tensors)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Snapshot the state (momentum buffers, step count, hyperparameters) as CPU tensors."""
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a snapshot of the same optimizer kind; an empty mapping leaves a fresh state."""
        ...


def _checked_fp32(avg_delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 views of every tensor, after checking that all are finite (before touching any state)."""
    out: dict[str, torch.Tensor] = {}
    for name, delta in avg_delta.items():
        if not delta.is_floating_point():
            raise InvalidInputError(f"outer update {name!r} must be floating point, got {delta.dtype}")
        d = delta.detach().to(torch.float32)
        if not bool(torch.isfinite(d).all()):
            raise NonFiniteError(f"outer update {name!r} holds NaN or Inf; the round must not be applied")
        out[name] = d
    return out


def _check_kind(state: Mapping[str, torch.Tensor], name: str) -> None:
    kind_t = state.get(KIND_KEY)
    kind = bytes(kind_t.to(torch.uint8).tolist()).decode("ascii", "replace") if kind_t is not None else None
    if kind != name:
        raise InvalidInputError(f"outer optimizer state is for {kind!r}, cannot load it into {name!r}")


def _warn_hparam(name: str, key: str, configured: float, state: Mapping[str, torch.Tensor]) -> None:
    saved = state.get(key)
    if saved is not None and float(saved) != configured:
        logger.warning(
            "outer_hparam_changed optimizer=%s key=%s saved=%s configured=%s (keeping configured)",
            name,
            key,
            float(saved),
            configured,
        )


class FedAvg:
    """Federated averaging: ``update = lr · mean Δ`` (lr 1 replaces the body by the workers' mean).

    This is the DEPT paper's default outer optimizer. It has no state besides the step count.
    """

    name = "fedavg"

    def __init__(self, *, lr: float = 1.0) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"fedavg lr must be a positive finite number, got {lr}")
        self.lr = lr
        self.num_steps = 0

    def step(self, avg_delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``lr · mean Δ`` for every tensor of ``avg_delta``.

        Raises:
            NonFiniteError: a tensor holds NaN or Inf (nothing is changed).
        """
        deltas = _checked_fp32(avg_delta)
        self.num_steps += 1
        return {name: d * self.lr for name, d in deltas.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Kind, step count and lr as 0-d tensors."""
        return {KIND_KEY: _kind_tensor(self.name), "lr": _scalar(self.lr), STEPS_KEY: _scalar(self.num_steps)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the step count; a different saved lr is logged and the configured one kept.

        Raises:
            InvalidInputError: the state is another optimizer's.
        """
        if not state:
            return
        _check_kind(state, self.name)
        _warn_hparam(self.name, "lr", self.lr, state)
        self.num_steps = int(state[STEPS_KEY]) if STEPS_KEY in state else 0


class Nesterov:
    """DiLoCo's outer SGD with Nesterov momentum on the outer gradient ``g = −mean Δ``.

    ``m ← μ·m + g``; ``update = −lr·(g + μ·m)``. This equals ``torch.optim.SGD(lr, momentum=μ,
    nesterov=True)`` stepping on ``g`` (whose first step sets ``m = g``, as a zero buffer does
    here). A tensor seen for the first time (a new embedding row block, say) starts with a zero
    buffer. Tensors absent from a step keep their buffer untouched, as SGD skips parameters
    without a gradient. A tensor whose shape changes raises ManifestMismatchError.
    """

    name = "nesterov"

    def __init__(self, *, lr: float = 0.7, momentum: float = 0.9) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"nesterov lr must be a positive finite number, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"nesterov momentum must be in [0, 1), got {momentum}")
        self.lr = lr
        self.momentum = momentum
        self.num_steps = 0
        self._buf: dict[str, torch.Tensor] = {}

    def step(self, avg_delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Advance the momentum buffers and return the update to add.

        Raises:
            NonFiniteError: a tensor holds NaN or Inf (no buffer is changed).
            ManifestMismatchError: a tensor's shape differs from its buffer's.
        """
        deltas = _checked_fp32(avg_delta)
        for name, d in deltas.items():
            buf = self._buf.get(name)
            if buf is not None and buf.shape != d.shape:
                raise ManifestMismatchError(
                    f"outer update {name!r} has shape {tuple(d.shape)}, its momentum {tuple(buf.shape)}"
                )
        mu = self.momentum
        update: dict[str, torch.Tensor] = {}
        for name, d in deltas.items():
            g = d.neg()
            buf = self._buf.get(name)
            if buf is None or buf.device != g.device:
                buf = torch.zeros_like(g) if buf is None else buf.to(g.device)
                self._buf[name] = buf
            buf.mul_(mu).add_(g)
            update[name] = g.add(buf, alpha=mu).mul_(-self.lr)
        self.num_steps += 1
        return update

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Momentum buffers (``buf.<name>``, cloned to the CPU), kind, lr, momentum, step count."""
        out = {
            KIND_KEY: _kind_tensor(self.name),
            "lr": _scalar(self.lr),
            "momentum": _scalar(self.momentum),
            STEPS_KEY: _scalar(self.num_steps),
        }
        for name, b in self._buf.items():
            out[BUF_PREFIX + name] = b.detach().to("cpu", copy=True)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore buffers and step count; different saved hyperparameters are logged, not used.

        Raises:
            InvalidInputError: the state is another optimizer's, or holds unknown keys.
            NonFiniteError: a buffer holds NaN or Inf.
        """
        if not state:
            return
        _check_kind(state, self.name)
        _warn_hparam(self.name, "lr", self.lr, state)
        _warn_hparam(self.name, "momentum", self.momentum, state)
        known = {KIND_KEY, "lr", "momentum", STEPS_KEY}
        unknown = [k for k in state if k not in known and not k.startswith(BUF_PREFIX)]
        if unknown:
            raise InvalidInputError(f"unknown keys in nesterov state: {sorted(unknown)[:5]}")
        bufs = _checked_fp32({k[len(BUF_PREFIX) :]: v for k, v in state.items() if k.startswith(BUF_PREFIX)})
        self._buf = {name: b.clone() for name, b in bufs.items()}
        self.num_steps = int(state[STEPS_KEY]) if STEPS_KEY in state else 0


OUTER_OPTIMIZERS: tuple[str, ...] = (FedAvg.name, Nesterov.name)


def build_outer(name: str, lr: float | None = None, momentum: float | None = None) -> OuterOptimizer:
    """Build an outer optimizer by name; ``None`` keeps that optimizer's default.

    Args:
        name: ``"fedavg"`` (DEPT's default, lr 1.0) or ``"nesterov"`` (DiLoCo, lr 0.7, μ 0.9).
        lr: outer learning rate.
        momentum: Nesterov momentum; FedAvg accepts only ``None`` or 0.

    Raises:
        ValueError: unknown name or invalid hyperparameters.
    """
    key = name.strip().lower()
    if key == FedAvg.name:
        if momentum not in (None, 0, 0.0):
            raise ValueError(f"fedavg has no momentum, got momentum={momentum}; use nesterov")
        return FedAvg() if lr is None else FedAvg(lr=lr)
    if key == Nesterov.name:
        return Nesterov(lr=0.7 if lr is None else lr, momentum=0.9 if momentum is None else momentum)
    raise ValueError(f"unknown outer optimizer {name!r}; known: {', '.join(OUTER_OPTIMIZERS)}")
