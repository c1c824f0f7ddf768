"""Strict key accounting shared by the released-format converters.

A converter takes every released tensor it copies through a ``KeyLedger`` (which checks the key
exists and has the expected shape), names the ones it deliberately does not copy, and calls
``finish``: whatever is left is an unexpected key. ``check_against_module`` then compares the
converted state dict with the arpipe module it must load into (built on the meta device, so an
official-size model costs no memory).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from models.released import ReleasedFormatError


def _shape(shape: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(n) for n in shape)


class KeyLedger:
    """The released tensors not yet accounted for. ``what`` names the format in messages."""

    def __init__(self, released: Mapping[str, torch.Tensor], what: str):
        for key, value in released.items():
            if not isinstance(value, torch.Tensor):
                raise ReleasedFormatError(f"{what}: key {key!r} holds a {type(value).__name__}, not a tensor")
        self.what = what
        self._left = dict(released)
        self._all = tuple(released)

    def has(self, key: str) -> bool:
        return key in self._left

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without taking it (for inferring sizes)."""
        if key not in self._left:
            self.missing(key)
        return _shape(self._left[key].shape)

    def missing(self, key: str):
        sample = ", ".join(repr(k) for k in self._all[:3]) or "no keys"
        raise ReleasedFormatError(f"{self.what}: missing key {key!r} (the file holds {sample}, ...)")

    def take(self, key: str, shape: Iterable[int] | None = None) -> torch.Tensor:
        """Remove and return ``key``; with ``shape``, fail unless the tensor has exactly that shape."""
        if key not in self._left:
            self.missing(key)
        tensor = self._left.pop(key)
        if shape is not None and _shape(tensor.shape) != _shape(shape):
            raise ReleasedFormatError(
                f"{self.what}: key {key!r} has shape {_shape(tensor.shape)}, expected {_shape(shape)}"
            )
        return tensor

    def skip(self, key: str, shape: Iterable[int] | None = None) -> str:
        """Account for a key that is deliberately not copied (returned, for ``Converted.rebuilt``)."""
        self.take(key, shape)
        return key

    def finish(self) -> None:
        """Fail on any key no mapping took: no released tensor is dropped silently."""
        if self._left:
            keys = sorted(self._left)
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise ReleasedFormatError(f"{self.what}: unexpected key {keys[0]!r}{more}")


def check_against_module(state_dict: Mapping[str, torch.Tensor], module: nn.Module, what: str) -> None:
    """Fail unless ``state_dict`` has exactly ``module``'s keys and shapes (a converter bug or an
    inferred size that does not hold)."""
    expected = {key: _shape(value.shape) for key, value in module.state_dict().items()}
    for key in sorted(set(expected) - set(state_dict)):
        raise ReleasedFormatError(f"{what}: converted weights lack {key!r}")
    for key in sorted(set(state_dict) - set(expected)):
        raise ReleasedFormatError(f"{what}: converted key {key!r} is not a weight of the arpipe module")
    for key, shape in expected.items():
        if _shape(state_dict[key].shape) != shape:
            raise ReleasedFormatError(
                f"{what}: converted {key!r} has shape {_shape(state_dict[key].shape)}, the module expects {shape}"
            )
