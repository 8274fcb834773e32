"""S²FT linear layer: a frozen dense weight plus one trainable block of rows or columns.

:class:`S2FTLinear` replaces an ``nn.Linear`` (or a transformers GPT-2 ``Conv1D``) in which only some
output rows (``dim=0``: units of q/k/v/gate/up) or some input columns (``dim=1``: units of o/down) train.
The trainable rows/columns live in ``block``, a real ``nn.Parameter``, so any torch optimizer, gradient
accumulation and distributed wrapper see an ordinary parameter. ``weight`` keeps the full (out, in)
shape with the trainable rows/columns set to zero, so ``x @ weight.T + (block path)`` is exactly the
original layer.

Backward goes through :class:`_S2FTFunction`, which saves only what the block's gradient needs: the
selected input columns ``x[..., idx]`` for ``dim=1``, the full ``x`` for ``dim=0``, nothing when the
block is frozen; it never forms a full-size weight gradient.

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

import operator
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fxsparse.layers import dense_module

__all__ = ["S2FTLinear", "s2ft_linear"]


def _is_conv1d(module: nn.Module) -> bool:
    # Matched by name so transformers is not imported just to check a type.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _contiguous_span(index: Sequence[int]) -> tuple[int, int] | None:
    """``(start, stop)`` when the sorted ``index`` is one contiguous range, else None."""
    if index[-1] - index[0] + 1 == len(index):
        return index[0], index[-1] + 1
    return None


def _take(t: torch.Tensor, span: tuple[int, int] | None, index: torch.Tensor) -> torch.Tensor:
    """``t[..., index]`` along the last dim: a slice view for a contiguous span, a gather otherwise."""
    if span is not None:
        return t[..., span[0]:span[1]]
    return t.index_select(-1, index)


def _add_into(out: torch.Tensor, part: torch.Tensor, span: tuple[int, int] | None, index: torch.Tensor) -> None:
    """``out[..., index] += part`` in place (``out`` is a fresh tensor owned by the caller)."""
    if span is not None:
        out[..., span[0]:span[1]] += part
    else:
        out.index_add_(-1, index, part)


class _S2FTFunction(torch.autograd.Function):
    """``y = x @ weight.T + bias`` plus the trainable block's rows (dim=0) or columns (dim=1)."""

    @staticmethod
    def forward(ctx, x, weight, bias, block, index, dim: int, span):
        y = F.linear(x, weight, bias)
        if dim == 1:
            # A slice of the last dim is a strided view of x: one contiguous copy feeds the GEMM and is
            # what backward keeps, so x itself can be freed.
            # Under autocast y comes out in the autocast dtype: the block path follows it (and the saved
            # slice is then stored in that, smaller, dtype).
            x_sel = _take(x, span, index).to(y.dtype).contiguous()
            y.view(-1, y.shape[-1]).addmm_(x_sel.view(-1, x_sel.shape[-1]), block.t().to(y.dtype))
        else:
            x_sel = None
            _add_into(y, F.linear(x, block).to(y.dtype), span, index)
        ctx.dim, ctx.span = dim, span
        ctx.x_shape = x.shape
        block_grad = ctx.needs_input_grad[3]
        if block_grad and dim == 1:
            saved_x = x_sel
        elif block_grad:
            saved_x = x.to(y.dtype)  # x itself, except under autocast (then its cast copy, as nn.Linear saves)
        else:
            saved_x = None
        ctx.save_for_backward(saved_x, weight, block, index)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved_x, weight, block, index = ctx.saved_tensors
        dim, span = ctx.dim, ctx.span
        grad_x = grad_block = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight.to(grad_y.dtype)
            if dim == 1:
                _add_into(grad_x, grad_y @ block.to(grad_y.dtype), span, index)
            else:
                grad_x = grad_x + _take(grad_y, span, index) @ block.to(grad_y.dtype)
        if ctx.needs_input_grad[3]:
            in_features = ctx.x_shape[-1]
            if dim == 1:
                grad_out_2d = grad_y.reshape(-1, grad_y.shape[-1])
                grad_block = grad_out_2d.t() @ saved_x.reshape(-1, saved_x.shape[-1]).to(grad_y.dtype)
            else:
                grad_sel = _take(grad_y, span, index)
                grad_block = grad_sel.reshape(-1, grad_sel.shape[-1]).t() @ saved_x.reshape(-1, in_features)
            grad_block = grad_block.to(block.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias, grad_block, None, None, None


def s2ft_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block: torch.Tensor,
    index: torch.Tensor,
    dim: int,
    span: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Functional form of :class:`S2FTLinear` (``weight`` is frozen: it gets no gradient).

    ``index`` is the sorted int64 tensor of trainable rows (``dim=0``) or columns (``dim=1``);
    ``span=(start, stop)`` says it is that contiguous range, so slices replace gathers.

    >>> x, w, blk = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 2)
    >>> s2ft_linear(x, w, None, blk, torch.tensor([1, 2]), dim=1, span=(1, 3)).shape
    torch.Size([3, 5])
    """
    return _S2FTFunction.apply(x, weight, bias, block, index, dim, span)


class S2FTLinear(nn.Module):
    """A linear layer whose trainable part is one block of rows (``dim=0``) or columns (``dim=1``).

    Attributes: ``weight`` (frozen, (out, in), trainable rows/columns zeroed), ``bias`` (frozen or None),
    ``block`` (the trainable parameter: (k, in) rows or (out, k) columns), ``index`` (persistent buffer,
    sorted int64), ``dim``.

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
    ):
        super().__init__()
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (rows) or 1 (columns), got {dim!r}")
        size = out_features if dim == 0 else in_features
        sorted_index = _check_index(index, size, dim)
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
        self._span = _contiguous_span(sorted_index)

    @classmethod
    def from_linear(cls, linear: nn.Module, dim: int, index: Sequence[int]) -> S2FTLinear:
        """Build from an ``nn.Linear`` or ``Conv1D``; ``block`` starts from the original values.

        The original module is left untouched.
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
                    device=dense.device, dtype=dense.dtype)
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
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise ValueError(
                "S2FTLinear.weight is frozen (only `block` trains); got weight.requires_grad=True. "
                "Merge with to_linear() to train the dense weight."
            )
        return _S2FTFunction.apply(x, self.weight, self.bias, self.block, self.index, self.dim, self._span)

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The span is derived from the index buffer; a loaded index must refresh it.
        index = self.index.tolist()
        if index:
            self._span = _contiguous_span(index)

    def extra_repr(self) -> str:
        kind = "rows" if self.dim == 0 else "columns"
        layout = f"slice {self._span[0]}:{self._span[1]}" if self._span is not None else "gathered"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"trainable {kind}={self.index.numel()} ({layout}), bias={self.bias is not None}")


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
