"""Shape, presence and finiteness checks for the tensors of one checkpoint file.

Shapes are written symbolically, e.g. ("d_sae", "d_in") for a stored encoder.weight. A symbol's size comes
from the format's config when it has one (`set_dim`), else from the first tensor that mentions it, so every
later tensor is checked against the same d_in / d_sae; the error names the file, the tensor, the expected and
the actual shape, and where each size came from (transposed tensors are the usual bug).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import SAELoadError

Dim = str | int
Shape = tuple[Dim, ...]


class TensorReader:
    """Fetches tensors of one file by their on-disk names, checking each as it goes."""

    def __init__(self, path: Path, tensors: Mapping[str, Any]) -> None:
        self.path = path
        self.tensors = tensors
        self.dims: dict[str, int] = {}
        """Known sizes of the symbolic dims (d_in, d_sae)."""
        self.dim_sources: dict[str, str] = {}
        """Where each known size came from, for error messages."""

    def set_dim(self, name: str, size: int, source: str) -> None:
        if size <= 0:
            raise SAELoadError(f"{self.path}: {name}={size} (from {source}) must be positive", self.path)
        self.dims[name] = size
        self.dim_sources[name] = source

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, *shapes: Shape, optional: bool = False) -> torch.Tensor | None:
        """Tensor `name`, checked to be a finite float tensor matching one of `shapes`."""
        if name not in self.tensors:
            if optional:
                return None
            present = ", ".join(sorted(map(str, self.tensors))) or "none"
            raise SAELoadError(
                f"{self.path}: missing tensor '{name}' (tensors present: {present})", self.path
            )
        tensor = self.tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise SAELoadError(
                f"{self.path}: '{name}' is a {type(tensor).__name__}, expected a tensor", self.path
            )
        if not tensor.is_floating_point():
            raise SAELoadError(
                f"{self.path}: tensor '{name}' has dtype {tensor.dtype}, expected floats", self.path
            )
        self._check_shape(name, tensor, shapes)
        if not tensor.is_meta and not bool(torch.isfinite(tensor).all()):  # meta: shapes_only(), no data
            bad = int((~torch.isfinite(tensor)).sum())
            raise SAELoadError(
                f"{self.path}: tensor '{name}' has {bad} non-finite value(s) (NaN/inf) of {tensor.numel()}",
                self.path,
            )
        return tensor

    def require(self, name: str, *shapes: Shape) -> torch.Tensor:
        tensor = self.get(name, *shapes)
        assert tensor is not None
        return tensor

    # --- shapes -------------------------------------------------------------------------------------------

    def _check_shape(self, name: str, tensor: torch.Tensor, shapes: Sequence[Shape]) -> None:
        actual = tuple(tensor.shape)
        for shape in shapes:
            if len(shape) == len(actual) and all(
                isinstance(d, int) and d == a or isinstance(d, str) and self.dims.get(d, a) == a
                for d, a in zip(shape, actual, strict=True)
            ):
                for d, a in zip(shape, actual, strict=True):  # adopt sizes of dims seen for the first time
                    if isinstance(d, str) and d not in self.dims:
                        self.set_dim(d, a, f"tensor '{name}'")
                return
        raise SAELoadError(self._shape_message(name, actual, shapes), self.path)

    def _shape_message(self, name: str, actual: tuple[int, ...], shapes: Sequence[Shape]) -> str:
        wanted = " or ".join(self._render(s) for s in shapes)
        used = sorted({d for s in shapes for d in s if isinstance(d, str) and d in self.dims})
        sources = ", ".join(f"{d}={self.dims[d]} from {self.dim_sources[d]}" for d in used)
        message = f"{self.path}: tensor '{name}' has shape {list(actual)}, expected {wanted}"
        if sources:
            message += f" ({sources})"
        if any(len(s) == 2 and self._concrete(s) == actual[::-1] for s in shapes) and actual[0] != actual[1]:
            message += "; it looks transposed"
        return message

    def _concrete(self, shape: Shape) -> tuple[int, ...] | None:
        sizes = [d if isinstance(d, int) else self.dims.get(d) for d in shape]
        return None if any(s is None for s in sizes) else tuple(sizes)  # type: ignore[arg-type]

    def _render(self, shape: Shape) -> str:
        if not shape:
            return "[] (a scalar)"
        concrete = self._concrete(shape)
        symbolic = "[" + ", ".join(str(d) for d in shape) + "]"
        return f"{list(concrete)} {symbolic}" if concrete is not None else symbolic


def transpose(tensor: torch.Tensor) -> torch.Tensor:
    """A stored [out, in] Linear weight as a contiguous [in, out] matrix."""
    return tensor.T.contiguous()
