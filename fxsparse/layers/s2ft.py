"""S²FT linear layer: a frozen dense weight plus one trainable block of rows or columns.

:class:`S2FTLinear` replaces an ``nn.Linear`` (or a transformers GPT-2 ``Conv1D``) in which only some
output rows (``dim=0``: units of q/k/v/gate/up) or some input columns (``dim=1``: units of o/down) train.
The trainable rows/columns live in ``block``, a real ``nn.Parameter``, so any torch optimizer, gradient
accumulation and distributed wrapper see an ordinary parameter. ``weight`` keeps the full (out, in)
shape with the trainable rows/columns set to zero, so ``x @ weight.T + (block path)`` is exactly the
original layer.

Forward and backward run through the ``fxsparse::s2ft_*`` custom ops (:mod:`fxsparse.codegen.s2ft`:
Triton kernels on CUDA that never spend work on the zeroed rows/columns, plain torch on CPU), so
``torch.compile(fullgraph=True)`` traces the layer without a graph break. Backward saves only what the
block's gradient needs: the selected input columns ``x[..., idx]`` for ``dim=1``, the full ``x`` for
``dim=0``, nothing when the block is frozen; it never forms a full-size weight gradient.

>>> import torch
>>> from torch import nn
>>> linear = nn.Linear(8, 6)
>>> layer = S2FTLinear.from_linear(linear, dim=1, index=[2, 3, 4])
>>> layer.block.shape
torch.Size([6, 3])
>>> x = torch.randn(5, 8)
>>> torch.allclose(layer(x), linear(x), atol=1e-6)
True
>>> torch.equal(layer.to_linear().weight, linear.weight)
True
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fxsparse.codegen.s2ft import index_lists, s2ft_multi_adapter
from fxsparse.codegen.s2ft import s2ft_linear as _s2ft_op
from fxsparse.layers import dense_module
from fxsparse.layers import is_conv1d as _is_conv1d

__all__ = ["S2FTLinear", "s2ft_linear", "MultiAdapterLinear", "AdapterRouter", "values_fingerprint",
           "StateMismatchError"]


class StateMismatchError(ValueError):
    """A state dict was saved from an fxsparse layer built another way (another plan, alpha, seed...)."""


def values_fingerprint(values: torch.Tensor) -> str | None:
    """sha256 (hex) of ``values`` and their shape, rounded to bfloat16; None for meta tensors.

    What an adapter records of the base values under its block, to recognise the base it was trained on.
    Rounding to bfloat16 first makes a float32 base and its bfloat16/float16 copies agree (the usual
    "train in float32, serve in bfloat16"), while another fine-tune or another initialisation differs in
    some entry and so in the hash.

    >>> w = torch.randn(4, 3)
    >>> values_fingerprint(w) == values_fingerprint(w.to(torch.bfloat16)) != values_fingerprint(w + 1)
    True
    """
    if values.is_meta:
        return None
    data = values.detach().to(torch.bfloat16).to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}:".encode())
    digest.update(ctypes.string_at(data.data_ptr(), data.numel() * data.element_size()))  # no numpy needed
    return digest.hexdigest()


def _contiguous_span(index: Sequence[int]) -> tuple[int, int] | None:
    """``(start, stop)`` when the sorted ``index`` is one contiguous range, else None."""
    if index[-1] - index[0] + 1 == len(index):
        return index[0], index[-1] + 1
    return None


def s2ft_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block: torch.Tensor,
    index: torch.Tensor,
    dim: int,
    span: tuple[int, int] | None = None,
    lists: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Functional form of :class:`S2FTLinear` (``weight`` is frozen: it gets no gradient).

    ``index`` is the sorted int64 tensor of trainable rows (``dim=0``) or columns (``dim=1``);
    ``span=(start, stop)`` says it is that contiguous range, so slices replace gathers; ``lists`` the
    int32 (selected, complement) positions (:func:`fxsparse.codegen.s2ft.index_lists`), computed here
    when not given. Runs through the ``fxsparse::s2ft_linear`` op.

    >>> x, w, blk = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 2)
    >>> s2ft_linear(x, w, None, blk, torch.tensor([1, 2]), dim=1, span=(1, 3)).shape
    torch.Size([3, 5])
    """
    sel, rest = lists if lists is not None else index_lists(index, weight.shape[dim])
    start, stop = span if span is not None else (-1, -1)
    return _s2ft_op(x, weight, bias, block, sel, rest, dim, start, stop)


class S2FTLinear(nn.Module):
    """A linear layer whose trainable part is one block of rows (``dim=0``) or columns (``dim=1``).

    Attributes: ``weight`` (frozen, (out, in), trainable rows/columns zeroed), ``bias`` (frozen or None),
    ``block`` (the trainable parameter: (k, in) rows or (out, k) columns), ``index`` (persistent buffer,
    sorted int64), ``dim``. Two more persistent buffers identify the layer's plan and base: ``origin``
    (int64, the original row/column of each block row/column before S²FT's co-permutation) and
    ``base_sha256`` (``base_fingerprint``, what adapters record; zeros when unknown). Loading a state dict
    whose ``origin`` differs (another plan of the same shapes) raises :class:`StateMismatchError` naming the
    layer; one without these buffers (written before they existed) loads as before. ``to_empty()`` from the
    meta device rebuilds the index buffers from the layer's host copy (:meth:`materialize`).

    >>> layer = S2FTLinear.from_linear(nn.Linear(4, 6, bias=False), dim=0, index=[5, 1])
    >>> layer.index.tolist(), tuple(layer.block.shape), layer.weight.requires_grad
    ([1, 5], (2, 4), False)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dim: int,
        index: Sequence[int],
        bias: bool = True,
        conv1d: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        origin: Sequence[int] | None = None,
    ):
        super().__init__()
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (rows) or 1 (columns), got {dim!r}")
        size = out_features if dim == 0 else in_features
        if origin is not None:
            given = index.tolist() if isinstance(index, torch.Tensor) else list(index)
            origin = [int(o) for o in origin]
            if len(origin) != len(given):
                raise ValueError(f"origin has {len(origin)} entries for {len(given)} index entries")
            by_index = dict(zip(given, origin))
        sorted_index = _check_index(index, size, dim)
        # The original (unpermuted) row/column of each block row/column: what identifies the plan in the state
        # dict (the index alone does not: after the co-permutation two plans can use the same positions).
        # Host copies of the persistent index buffers: the buffers are rebuilt from them after to_empty().
        self._origin = [by_index[i] for i in sorted_index] if origin is not None else list(sorted_index)
        self._index_list = list(sorted_index)
        self._fingerprint: str | None = None  # see base_fingerprint
        self.in_features, self.out_features = in_features, out_features
        self.dim = dim
        self.conv1d = conv1d
        k = len(sorted_index)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        block_shape = (k, in_features) if dim == 0 else (out_features, k)
        self.block = nn.Parameter(torch.zeros(block_shape, **factory))
        self.register_buffer("index", torch.tensor(sorted_index, dtype=torch.int64, device=device))
        self.register_buffer("origin", torch.tensor(self._origin, dtype=torch.int64, device=device))
        self.register_buffer("base_sha256", torch.zeros(32, dtype=torch.uint8, device=device))
        self._span = _contiguous_span(sorted_index)
        # int32 selected/complement positions for the kernels: derived state, not saved with the model
        self.register_buffer("_sel", torch.empty(0, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("_rest", torch.empty(0, dtype=torch.int32, device=device), persistent=False)
        self._refresh_lists(sorted_index)

    def _refresh_lists(self, sorted_index: list[int]) -> None:
        chosen = set(sorted_index)
        size = self.out_features if self.dim == 0 else self.in_features
        device = self.index.device
        self._sel = torch.tensor(sorted_index, dtype=torch.int32, device=device)
        self._rest = torch.tensor([i for i in range(size) if i not in chosen], dtype=torch.int32, device=device)

    @classmethod
    def from_linear(cls, linear: nn.Module, dim: int, index: Sequence[int],
                    origin: Sequence[int] | None = None) -> S2FTLinear:
        """Build from an ``nn.Linear`` or ``Conv1D``; ``block`` starts from the original values.

        ``origin``: the original row/column of each ``index`` entry when ``linear``'s weight was permuted
        (default: ``index`` itself). The original module is left untouched. Records ``base_fingerprint``
        (:func:`values_fingerprint` of the block's base values in ascending original order).
        """
        conv1d = _is_conv1d(linear)
        if conv1d:
            dense = linear.weight.detach().t()
        elif isinstance(linear, nn.Linear):
            dense = linear.weight.detach()
        else:
            raise ValueError(f"expected nn.Linear or Conv1D, got {type(linear).__name__}")
        out_features, in_features = dense.shape
        bias = getattr(linear, "bias", None)
        layer = cls(in_features, out_features, dim, index, bias=bias is not None, conv1d=conv1d,
                    device=dense.device, dtype=dense.dtype, origin=origin)
        with torch.no_grad():
            layer.weight.copy_(dense)
            if bias is not None:
                layer.bias.copy_(bias.detach())
            idx = layer.index
            if dim == 0:
                layer.block.copy_(dense.index_select(0, idx))
                layer.weight.index_fill_(0, idx, 0)
            else:
                layer.block.copy_(dense.index_select(1, idx))
                layer.weight.index_fill_(1, idx, 0)
            layer.base_fingerprint = layer.block_fingerprint()
        return layer

    @property
    def base_fingerprint(self) -> str | None:
        """:func:`values_fingerprint` of the base values the block replaced (None if unknown, e.g. built on the
        meta device): what :func:`fxsparse.save_adapter` records to tie an adapter to its base. Kept in the
        state dict as the ``base_sha256`` buffer (zeros: unknown)."""
        return self._fingerprint

    @base_fingerprint.setter
    def base_fingerprint(self, value: str | None) -> None:
        self._fingerprint = value
        if not self.base_sha256.is_meta:
            raw = bytes.fromhex(value) if value is not None else bytes(32)
            self.base_sha256.copy_(torch.tensor(list(raw), dtype=torch.uint8))

    @torch.no_grad()
    def block_fingerprint(self) -> str | None:
        """:func:`values_fingerprint` of the block's current values in ascending original order."""
        order = sorted(range(len(self._origin)), key=self._origin.__getitem__)
        block = self.block.detach()
        return values_fingerprint(block.index_select(self.dim, torch.tensor(order, device=block.device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise ValueError(
                "S2FTLinear.weight is frozen (only `block` trains); got weight.requires_grad=True. "
                "Merge with to_linear() to train the dense weight."
            )
        start, stop = self._span if self._span is not None else (-1, -1)
        return _s2ft_op(x, self.weight, self.bias, self.block, self._sel, self._rest, self.dim, start, stop)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense (out, in) weight with the trained block written back (a new tensor)."""
        merged = self.weight.detach().clone()
        merged.index_copy_(self.dim, self.index, self.block.detach().to(merged.dtype))
        return merged

    @torch.no_grad()
    def to_linear(self) -> nn.Module:
        """A fresh module of the original type (``nn.Linear`` or ``Conv1D``) holding the merged values."""
        return dense_module(self.merged_weight(), self.bias, self.conv1d)

    # ------------------------------------------------------------------ state dict, to_empty, materialise
    def check_state(self, state_dict, prefix: str = "") -> None:
        """Raise :class:`StateMismatchError` (naming the layer) if ``state_dict`` (this layer's keys under
        ``prefix``) was saved with another plan or holds an invalid index; changes nothing."""
        name = prefix[:-1] or "S2FTLinear"
        size = self.out_features if self.dim == 0 else self.in_features
        origin = state_dict.get(prefix + "origin")
        if isinstance(origin, torch.Tensor) and not origin.is_meta and origin.tolist() != self._origin:
            raise StateMismatchError(
                f"{name}: the state dict was saved with another S2FT plan (its block holds original "
                f"{_KIND[self.dim]} {_short(origin.tolist())}, this layer's {_short(self._origin)}); transform the "
                "model with the plan it was trained with (fxsparse.transform(model, 's2ft', plan=...)) or load "
                "its adapter with fxsparse.load_adapter")
        index = state_dict.get(prefix + "index")
        if isinstance(index, torch.Tensor) and not index.is_meta and index.shape == self.index.shape:
            try:
                if _check_index(index.tolist(), size, self.dim) != index.tolist():
                    raise ValueError("not sorted")
            except ValueError as exc:
                raise StateMismatchError(f"{name}: the state dict's index is invalid ({exc}): the file is "
                                         "corrupt or not from an S2FT model") from None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.check_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in ("origin", "base_sha256"):  # state dicts written before these buffers existed
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
        # The span and the kernels' lists are derived from the index buffer; a loaded index must refresh them.
        if not self.index.is_meta:
            index = self.index.tolist()
            if index:
                self._index_list = index
                self._span = _contiguous_span(index)
                self._refresh_lists(index)
            if prefix + "base_sha256" in state_dict:  # the checkpoint's base is now this layer's base
                self._fingerprint = bytes(self.base_sha256.tolist()).hex() if self.base_sha256.any() else None

    def _apply(self, fn, recurse=True):
        was_meta = self.index.is_meta
        result = super()._apply(fn, recurse)
        if was_meta and not self.index.is_meta:
            # to_empty(): the index buffers are uninitialised memory; the host copy knows them
            self.materialize()
        return result

    @torch.no_grad()
    def materialize(self) -> None:
        """Rewrite the index buffers from the layer's own (host) copy of its selection.

        Called by ``to_empty()`` itself when the layer leaves the meta device, and by
        :func:`fxsparse.materialize`. Parameters (``weight``, ``bias``, ``block``) are not touched: after
        ``to_empty()`` load them from a state dict.
        """
        if self.index.is_meta:
            return
        self.index.copy_(torch.tensor(self._index_list, dtype=torch.int64))
        self.origin.copy_(torch.tensor(self._origin, dtype=torch.int64))
        self.base_fingerprint = self._fingerprint
        self._refresh_lists(self._index_list)
        self._span = _contiguous_span(self._index_list)

    def extra_repr(self) -> str:
        kind = "rows" if self.dim == 0 else "columns"
        layout = f"slice {self._span[0]}:{self._span[1]}" if self._span is not None else "gathered"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"trainable {kind}={self.index.numel()} ({layout}), bias={self.bias is not None}")


_KIND = {0: "rows", 1: "columns"}


def _short(values: list[int], limit: int = 8) -> str:
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ... ({len(values)})]"


def _check_index(index: Sequence[int], size: int, dim: int) -> list[int]:
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    values = list(index)
    if not values:
        kind = "row" if dim == 0 else "column"
        raise ValueError(f"index is empty: S2FTLinear needs at least one trainable {kind}")
    for pos, value in enumerate(values):
        try:
            values[pos] = operator.index(value)  # accepts numpy integers, rejects floats
        except TypeError:
            raise ValueError(f"index value {value!r} is not an integer") from None
        if isinstance(value, bool) or not 0 <= values[pos] < size:
            raise ValueError(f"index value {value!r} is outside [0, {size}) for dim={dim}")
    if len(set(values)) != len(values):
        dupes = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"index has duplicate entries {dupes}")
    return sorted(values)


class AdapterRouter:
    """Which adapter each batch row uses, shared by every :class:`MultiAdapterLinear` of one model.

    ``row_ids`` holds one adapter number per batch row (-1: the base model) or is None (base model for
    all rows). A batch whose row count is a multiple of ``len(row_ids)`` (``generate`` with beams or
    ``num_return_sequences`` repeats each row in place) reuses each id for its copies.
    """

    def __init__(self) -> None:
        self.row_ids: torch.Tensor | None = None
        self._cache: dict[tuple, torch.Tensor] = {}

    def set(self, row_ids: torch.Tensor | None) -> None:
        if row_ids is not None and bool((row_ids < 0).all()):
            row_ids = None  # every row on the base model: plain linear layers
        self.row_ids = row_ids
        self._cache = {}

    def token_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """One adapter number per token of ``x`` (..., in_features), or None when no row has an adapter."""
        if self.row_ids is None:
            return None
        lead = tuple(x.shape[:-1]) or (1,)
        key = (lead, x.device)
        ids = self._cache.get(key)
        if ids is None:
            rows, batch = self.row_ids, lead[0]
            if batch != rows.numel():
                if rows.numel() == 0 or batch % rows.numel():
                    raise ValueError(f"adapter_ids has {rows.numel()} entries for a batch of {batch} rows")
                rows = rows.repeat_interleave(batch // rows.numel())
            per_row = x.numel() // max(1, x.shape[-1] * batch) if x.numel() else 0
            ids = rows.to(x.device).repeat_interleave(per_row).to(torch.int32)
            self._cache[key] = ids
        return ids


class MultiAdapterLinear(nn.Module):
    """A frozen base linear (``nn.Linear`` or ``Conv1D``) that adds, per token, its adapter's S²FT delta.

    ``deltas[a]`` is ``(dim, index, delta)`` for adapter ``a`` (or None when that adapter leaves this
    module alone): ``index`` the adapter's rows (``dim=0``) or columns (``dim=1``) in the module's own
    numbering, ``delta`` the trained block minus the base values there. Deltas are padded to the largest
    count per kind and masked by count, so adapters with different numbers of rows/columns mix in one
    batch. ``weight``/``bias`` are the base module's own parameters (the state dict is unchanged); the
    computation runs through ``fxsparse::s2ft_multi_adapter``.

    >>> base = nn.Linear(4, 3)
    >>> layer = MultiAdapterLinear(base, [(1, torch.tensor([2]), torch.ones(3, 1))], AdapterRouter())
    >>> x = torch.randn(2, 4)
    >>> layer.router.set(torch.tensor([0, -1]))
    >>> y = layer(x)
    >>> torch.allclose(y[0], base(x[0]) + x[0, 2]), torch.allclose(y[1], base(x[1]))
    (True, True)
    """

    def __init__(self, base: nn.Module, deltas: Sequence[tuple[int, torch.Tensor, torch.Tensor] | None],
                 router: AdapterRouter):
        super().__init__()
        self.conv1d = _is_conv1d(base)
        if not self.conv1d and not isinstance(base, nn.Linear):
            raise ValueError(f"expected nn.Linear or Conv1D, got {type(base).__name__}")
        self.weight = base.weight
        self.bias = base.bias
        object.__setattr__(self, "original", base)  # what unwrapping puts back (not a submodule)
        object.__setattr__(self, "router", router)
        dense = self.weight.detach().t() if self.conv1d else self.weight.detach()
        self.out_features, self.in_features = dense.shape
        n_adapters = len(deltas)
        for dim, prefix in ((1, "col"), (0, "row")):
            mine = [d if d is not None and d[0] == dim else None for d in deltas]
            kmax = max((d[1].numel() for d in mine if d is not None), default=0)
            shape = (n_adapters, self.out_features, kmax) if dim == 1 else (n_adapters, kmax, self.in_features)
            delta = torch.zeros(shape, dtype=dense.dtype, device=dense.device)
            index = torch.zeros((n_adapters, kmax), dtype=torch.int32, device=dense.device)
            count = torch.zeros(n_adapters, dtype=torch.int32, device=dense.device)
            for a, entry in enumerate(mine):
                if entry is None:
                    continue
                _, idx, values = entry
                k = idx.numel()
                if dim == 1:
                    delta[a, :, :k] = values
                else:
                    delta[a, :k] = values
                index[a, :k] = idx.to(torch.int32)
                count[a] = k
            self.register_buffer(f"{prefix}_delta", delta, persistent=False)
            self.register_buffer(f"{prefix}_index", index, persistent=False)
            self.register_buffer(f"{prefix}_count", count, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.conv1d else self.weight
        ids = self.router.token_ids(x)
        if ids is None:
            return F.linear(x, weight, self.bias)
        return s2ft_multi_adapter(x, weight, self.bias, ids, self.col_delta, self.col_index, self.col_count,
                                  self.row_delta, self.row_index, self.row_count)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={self.col_count.numel()}, columns<={self.col_delta.shape[-1]}, "
                f"rows<={self.row_delta.shape[1]}")
