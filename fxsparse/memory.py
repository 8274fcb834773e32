"""Measure the activation memory autograd keeps for backward.

>>> import torch
>>> x = torch.randn(256, requires_grad=True)
>>> with SavedActivations() as saved:
...     y = (x * x.sin()).sum()
>>> saved.bytes                      # x (saved by sin and mul) and sin(x): two 1 KiB storages
2048
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["SavedActivations", "saved_activation_bytes"]


class SavedActivations:
    """Context manager counting the unique storages packed for backward while it is active.

    ``exclude``: tensors whose storages do not count (pass the model's parameters and buffers: they are
    saved by reference, not as activations). A storage saved by several ops counts once; a sparse tensor
    (COO, CSR, CSC, BSR, BSC) counts by its index and value storages.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        for part in _dense_parts(tensor):
            storage = part.untyped_storage()
            if storage.data_ptr() not in self._skip:
                self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


_COMPRESSED = {torch.sparse_csr: ("crow_indices", "col_indices"), torch.sparse_csc: ("ccol_indices", "row_indices"),
               torch.sparse_bsr: ("crow_indices", "col_indices"), torch.sparse_bsc: ("ccol_indices", "row_indices")}


def _dense_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The strided tensors holding ``tensor``'s data: itself, or a sparse tensor's indices and values (a sparse
    tensor has no storage of its own; PEFT's SHiRA saves its delta weight as a COO tensor)."""
    if tensor.layout == torch.strided:
        return (tensor,)
    if tensor.layout == torch.sparse_coo:
        return tensor._indices(), tensor._values()
    if tensor.layout in _COMPRESSED:
        compressed, plain = _COMPRESSED[tensor.layout]
        return getattr(tensor, compressed)(), getattr(tensor, plain)(), tensor.values()
    raise NotImplementedError(f"cannot count a saved tensor of layout {tensor.layout}")


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of unique storages saved for backward while ``fn()`` runs, ``exclude`` left out."""
    with SavedActivations(exclude) as saved:
        fn()
    return saved.bytes
