"""What a participant shares of a model: the ``SharedView`` protocol and ``ModuleView``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dept_comm.errors import ManifestMismatchError

__all__ = ["LocalFilter", "ModuleView", "SharedView", "local_predicate"]

LocalFilter = Callable[[str], bool] | Sequence[str] | str | None
"""Which tensors stay local: a predicate on the state_dict name, fnmatch patterns, or None."""


@runtime_checkable
class SharedView(Protocol):
    """The tensors a model shares with the parameter server, by name.

    ``shared()`` gives their current local values (any device, any float dtype; integer tensors
    such as ``emb.ids`` are index tensors, sent as they are); ``load`` writes the replica's values
    back into the model *in place* (parameters keep their identity: the inner optimizer holds
    them); ``device`` is where the replica and its update live.
    """

    @property
    def device(self) -> torch.device:
        """Where the replica and the update are kept (the model's device)."""
        ...

    def shared(self) -> dict[str, torch.Tensor]:
        """The shared tensors' current local values, by name (no copy needed)."""
        ...

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write ``tensors`` (the verified replica, float32) into the model in place."""
        ...


def local_predicate(local: LocalFilter) -> Callable[[str], bool]:
    """``local`` as a predicate: ``None`` keeps nothing local, a string or a sequence of strings
    are fnmatch patterns (``"emb.*"``), a callable is used as it is."""
    if local is None:
        return lambda name: False
    if callable(local):
        return local
    patterns = [local] if isinstance(local, str) else list(local)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"local patterns are strings, got {pattern!r}")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class ModuleView:
    """A ``SharedView`` of an ``nn.Module``: every parameter, by its state_dict name, except
    those ``local`` names (a predicate or fnmatch patterns). Buffers stay local. A parameter
    reachable under two names (tied weights) is shared once, under its first name.
    """

    def __init__(self, module: nn.Module, local: LocalFilter = None) -> None:
        self.module = module
        is_local = local_predicate(local)
        self.params: dict[str, nn.Parameter] = {
            name: p for name, p in module.named_parameters() if not is_local(name)
        }
        self.local_names = [name for name, _ in module.named_parameters() if is_local(name)]
        if not self.params:
            raise ValueError("the module shares no parameter (all of them are local)")

    @property
    def device(self) -> torch.device:
        """The device of the first shared parameter."""
        return next(iter(self.params.values())).device

    def shared(self) -> dict[str, torch.Tensor]:
        """The shared parameters' current values (detached, not copied)."""
        return {name: p.detach() for name, p in self.params.items()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the shared parameters in place.

        Raises:
            ManifestMismatchError: a shared parameter is missing from ``tensors`` or has another shape.
        """
        with torch.no_grad():
            for name, p in self.params.items():
                value = tensors.get(name)
                if value is None or tuple(value.shape) != tuple(p.shape):
                    got = None if value is None else tuple(value.shape)
                    raise ManifestMismatchError(f"{name}: the module has {tuple(p.shape)}, the replica {got}")
                p.copy_(value)
