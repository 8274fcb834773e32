"""SLTrain layers: ``W = B @ A * (alpha / r) + S`` with ``S`` on a fixed sparse support, never densified.

The layer trains three parameters: the low-rank factors ``A`` (r x in) and ``B`` (out x r) and the
sparse values ``values`` (nnz,) of ``S``, whose support is fixed at construction (deterministic in the
seed) and stored as int32 buffers. Two support layouts:

- ``"random"``: ``nnz = round(sparsity * out * in)`` entries drawn uniformly without replacement, stored
  as int32 CSR (``support_crow`` (out + 1,), ``support_col`` (nnz,)): **4 bytes per non-zero** plus 4 bytes
  per output row (the reference stores 16 bytes per non-zero: two int64 indices).
- ``"block"``: ``round(sparsity * out * in / block_size**2)`` tiles of ``block_size x block_size`` drawn
  uniformly among the tiles that lie fully inside the weight (rows/columns past the last multiple of
  ``block_size`` carry no tiles), stored as int32 tile coordinates (``tile_row``, ``tile_col``):
  ``8 / block_size**2`` bytes per non-zero. ``values`` holds the tiles one after another, row-major.

Training never builds an ``out x in`` tensor: the forward is ``(x @ A.T) @ B.T * scale + x @ S.T``, the
backward takes dB and dA from the rank-r activation, dS only on the support (a sampled dense-dense
product), and dx through the factors and ``S.T``. Only ``x`` and ``x @ A.T`` are saved for backward.
On CPU the random layout runs on MKL sparse CSR kernels (SpMM and ``sampled_addmm``, about 14 GFLOP/s
per core at the 350M FFN shape); the block layout gathers the tiles' input rows and runs one batched GEMM
over the tiles (``block_size`` 32 is about 2x faster than 16 there: fewer, larger tile products). bf16 /
fp16 work; on CPU the random layout's sparse products then run in float32 (MKL has no bf16 CSR kernels).
Under autocast the layer runs in the autocast dtype.

Measured on the 2-core development CPU, one thread, CPU time, one layer forward + backward at 1024
tokens, rank 256, sparsity 0.03 (``benchmarks/bench_sltrain_block.py`` has the whole-block step):
1024 x 2736: dense 187 ms, random 111 ms, block-32 93 ms, low-rank alone 72 ms.

>>> import torch
>>> layer = SLTrainLinear(64, 48, rank=8, sparsity=0.05, alpha=16.0, seed=0)
>>> y = layer(torch.randn(2, 5, 64))
>>> y.shape, layer.values.numel() == round(0.05 * 48 * 64)
(torch.Size([2, 5, 48]), True)
"""

from __future__ import annotations

import hashlib
import math
import warnings

import torch
from torch import nn

from fxsparse.layers import dense_module

__all__ = [
    "SUPPORTS",
    "SLTrainLinear",
    "layer_seed",
    "random_support",
    "block_support",
    "sltrain_linear",
]

SUPPORTS = ("random", "block")

# torch warns once per process that CSR is "beta"; the CSR ops used here (SpMM, sampled_addmm) are stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Above this many weight entries a full randperm costs more memory (8 bytes per entry) than rejection
# sampling of the support does; below it randperm is the simplest exact uniform draw.
_RANDPERM_MAX_NUMEL = 1 << 24


def layer_seed(seed: int, path: str) -> int:
    """A 63-bit seed for the layer at module ``path``, stable across processes (unlike ``hash``).

    >>> layer_seed(0, "model.layers.0.mlp.up_proj") == layer_seed(0, "model.layers.0.mlp.up_proj")
    True
    """
    digest = hashlib.sha256(f"{int(seed)}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _uniform_subset(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct integers drawn uniformly from ``range(numel)``, sorted (int64)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    if numel <= _RANDPERM_MAX_NUMEL or count * 4 > numel:
        return torch.randperm(numel, generator=generator)[:count].sort().values
    chosen = torch.zeros(0, dtype=torch.long)
    while chosen.numel() < count:
        draw = torch.randint(numel, (int((count - chosen.numel()) * 1.1) + 16,), generator=generator)
        chosen = torch.cat([chosen, draw]).unique()
    # unique() sorts, so which surplus entries go must be random, not the largest ones
    keep = torch.randperm(chosen.numel(), generator=generator)[:count]
    return chosen[keep].sort().values


def random_support(out_features: int, in_features: int, nnz: int, generator: torch.Generator):
    """(crow int32 (out + 1,), col int32 (nnz,)) of ``nnz`` entries uniform over an out x in matrix."""
    flat = _uniform_subset(out_features * in_features, nnz, generator)
    rows = flat // in_features
    crow = torch.zeros(out_features + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    return crow.to(torch.int32), (flat % in_features).to(torch.int32)


def block_support(out_features: int, in_features: int, tiles: int, block_size: int, generator: torch.Generator):
    """(tile_row int32, tile_col int32): ``tiles`` tiles uniform over the full-tile grid, row-major order."""
    grid_cols = in_features // block_size
    flat = _uniform_subset((out_features // block_size) * grid_cols, tiles, generator)
    return (flat // grid_cols).to(torch.int32), (flat % grid_cols).to(torch.int32)


def _tile_gather_index(tile: torch.Tensor, block_size: int) -> torch.Tensor:
    """Row (or column) of the weight of every tile entry along one axis: (tiles * block_size,) int64."""
    offsets = torch.arange(block_size, device=tile.device)
    return (tile.long()[:, None] * block_size + offsets).reshape(-1)


def _csr(crow, col, values, size) -> torch.Tensor:
    """A CSR matrix for MKL/cuSPARSE; on CPU, MKL has no bf16/fp16 kernels, so those run in float32."""
    if values.device.type == "cpu" and values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _like(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``dense`` in the dtype of ``sparse``'s values (a no-op unless the float32 CPU fallback is active)."""
    return dense if dense.dtype == sparse.dtype else dense.to(sparse.dtype)


class _RandomSupportFn(torch.autograd.Function):
    """y = (x @ A.T) @ B.T * scale + x @ S.T (+ bias), S in CSR on a fixed random support."""

    @staticmethod
    def forward(ctx, x, A, B, values, bias, crow, col, t_crow, t_row, t_perm, scale):
        x2 = x.reshape(-1, x.shape[-1])
        out_features, in_features = B.shape[0], A.shape[1]
        h = x2 @ A.t()
        if values.numel() > 0:
            S = _csr(crow, col, values, (out_features, in_features))
            # (out, T) result: MKL's CSR @ dense is fastest with a row-major dense operand (x.T contiguous)
            y_t = (S @ _like(S, x2.t().contiguous())).to(x2.dtype)
        else:
            y_t = x2.new_zeros(out_features, x2.shape[0])
        if bias is not None:
            y_t.add_(bias[:, None])
        y = torch.addmm(y_t.t(), h, B.t(), alpha=scale)
        ctx.save_for_backward(x, h, A, B, values, crow, col, t_crow, t_row, t_perm)
        ctx.scale = scale
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x, h, A, B, values, crow, col, t_crow, t_row, t_perm = ctx.saved_tensors
        scale = ctx.scale
        out_features, in_features = B.shape[0], A.shape[1]
        x2 = x.reshape(-1, in_features)
        dy_t = dy.reshape(-1, out_features).t().contiguous()  # (out, T)
        dh = (dy_t.t() @ B).mul_(scale)
        dB = (dy_t @ h).mul_(scale)
        dA = dh.t() @ x2
        dx = None
        if values.numel() > 0:
            S = _csr(crow, col, values, (out_features, in_features))
            dvalues = torch.sparse.sampled_addmm(S, _like(S, dy_t), _like(S, x2), beta=0.0).values()
            dvalues = dvalues.to(values.dtype)
            if ctx.needs_input_grad[0]:
                S_t = _csr(t_crow, t_row, values[t_perm], (in_features, out_features))
                dx = torch.addmm((S_t @ _like(S, dy_t)).to(dh.dtype).t(), dh, A).reshape(x.shape)
        else:
            dvalues = torch.zeros_like(values)
            dx = (dh @ A).reshape(x.shape) if ctx.needs_input_grad[0] else None
        dbias = dy_t.sum(1) if ctx.has_bias else None
        return dx, dA, dB, dvalues, dbias, None, None, None, None, None, None


class _BlockSupportFn(torch.autograd.Function):
    """y = (x @ A.T) @ B.T * scale + x @ S.T (+ bias), S made of block_size x block_size tiles."""

    @staticmethod
    def forward(ctx, x, A, B, values, bias, row_index, col_index, block_size, scale):
        x2 = x.reshape(-1, x.shape[-1])
        out_features = B.shape[0]
        tiles = values.numel() // (block_size * block_size)
        tokens = x2.shape[0]
        h = x2 @ A.t()
        # Work in the transposed (features, tokens) domain: gathering and scattering whole rows of
        # length T are contiguous copies, and each tile product is one (bs x bs) @ (bs x T) GEMM.
        x_tiles = x2.t().contiguous().index_select(0, col_index).view(tiles, block_size, tokens)
        tile_out = torch.bmm(values.view(tiles, block_size, block_size), x_tiles)
        y_t = x2.new_zeros(out_features, tokens)
        y_t.index_add_(0, row_index, tile_out.view(-1, tokens))
        if bias is not None:
            y_t.add_(bias[:, None])
        y = torch.addmm(y_t.t(), h, B.t(), alpha=scale)
        ctx.save_for_backward(x, h, A, B, values, row_index, col_index)
        ctx.scale, ctx.block_size, ctx.has_bias = scale, block_size, bias is not None
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x, h, A, B, values, row_index, col_index = ctx.saved_tensors
        scale, block_size = ctx.scale, ctx.block_size
        out_features, in_features = B.shape[0], A.shape[1]
        tiles = values.numel() // (block_size * block_size)
        x2 = x.reshape(-1, in_features)
        tokens = x2.shape[0]
        dy_t = dy.reshape(-1, out_features).t().contiguous()  # (out, T)
        dh = (dy_t.t() @ B).mul_(scale)
        dB = (dy_t @ h).mul_(scale)
        dA = dh.t() @ x2
        x_tiles = x2.t().contiguous().index_select(0, col_index).view(tiles, block_size, tokens)
        dy_tiles = dy_t.index_select(0, row_index).view(tiles, block_size, tokens)
        dvalues = torch.bmm(dy_tiles, x_tiles.transpose(1, 2)).view(-1)
        dx = None
        if ctx.needs_input_grad[0]:
            dx_tiles = torch.bmm(values.view(tiles, block_size, block_size).transpose(1, 2), dy_tiles)
            dx_t = x2.new_zeros(in_features, tokens)
            dx_t.index_add_(0, col_index, dx_tiles.view(-1, tokens))
            dx = torch.addmm(dx_t.t(), dh, A).reshape(x.shape)
        dbias = dy_t.sum(1) if ctx.has_bias else None
        return dx, dA, dB, dvalues, dbias, None, None, None, None


def sltrain_linear(x: torch.Tensor, layer: SLTrainLinear) -> torch.Tensor:
    """``x @ (B @ A * scale + S).T + bias`` for ``layer``'s parameters, without forming the weight."""
    A, B, values, bias = layer.A, layer.B, layer.values, layer.bias
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # autocast would pick a dtype per op inside the Function; run it in the autocast dtype instead
        dtype = torch.get_autocast_dtype(device_type)
        x, A, B, values = (t.to(dtype) for t in (x, A, B, values))
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _apply(layer, x, A, B, values, bias)
    return _apply(layer, x, A, B, values, bias)


def _apply(layer: SLTrainLinear, x, A, B, values, bias) -> torch.Tensor:
    if layer.support == "block":
        return _BlockSupportFn.apply(
            x, A, B, values, bias, layer._row_index, layer._col_index, layer.block_size, layer.scale
        )
    return _RandomSupportFn.apply(
        x, A, B, values, bias, layer.support_crow, layer.support_col, layer._t_crow, layer._t_row,
        layer._t_perm, layer.scale,
    )


class SLTrainLinear(nn.Module):
    """A linear layer trained as ``W = B @ A * (alpha / rank) + S``; ``S`` has a fixed sparse support.

    Parameters: ``A`` (rank, in), ``B`` (out, rank), ``values`` (nnz,), ``bias`` (out,) or None.
    ``sparsity=0.0`` gives a pure low-rank layer (``values`` is empty). Initialisation as in SLTrain:
    ``A`` Kaiming-uniform (a=sqrt(5)), ``B`` zero, ``values`` uniform in ±1/sqrt(in), ``bias`` zero; the
    support and the initial values are deterministic in ``seed``.

    >>> layer = SLTrainLinear(32, 24, rank=4, sparsity=0.1, alpha=8.0, support="block", block_size=4)
    >>> sum(p.numel() for p in layer.parameters()) == 4 * (32 + 24) + layer.values.numel() + 24
    True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        sparsity: float = 0.03,
        alpha: float = 32.0,
        support: str = "random",
        block_size: int = 32,
        bias: bool = True,
        seed: int = 0,
        conv1d: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_args(in_features, out_features, rank, sparsity, alpha, support, block_size)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.rank, self.sparsity, self.alpha = int(rank), float(sparsity), float(alpha)
        self.support, self.block_size, self.seed = support, int(block_size), int(seed)
        self.conv1d = conv1d  # came from a GPT-2 Conv1D (weight stored as (in, out)); to_linear gives one back
        self.scale = self.alpha / self.rank
        factory = {"dtype": dtype if dtype is not None else torch.get_default_dtype()}

        generator = torch.Generator().manual_seed(self.seed)
        if support == "random":
            nnz = round(self.sparsity * out_features * in_features)
            crow, col = random_support(out_features, in_features, nnz, generator)
            self.register_buffer("support_crow", crow)
            self.register_buffer("support_col", col)
        else:
            tiles = round(self.sparsity * out_features * in_features / block_size**2)
            if self.sparsity > 0:
                tiles = max(tiles, 1)
            tile_row, tile_col = block_support(out_features, in_features, tiles, block_size, generator)
            self.register_buffer("tile_row", tile_row)
            self.register_buffer("tile_col", tile_col)
            nnz = tiles * block_size * block_size

        A = torch.empty(self.rank, in_features, **factory)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(in_features)
        values = torch.empty(nnz, **factory).uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(out_features, self.rank, **factory))
        self.values = nn.Parameter(values)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self._derive_support()
        self.register_load_state_dict_post_hook(lambda module, _: module._derive_support())
        if device is not None:
            self.to(device)

    def _derive_support(self) -> None:
        """Index tensors the kernels need, rebuilt from the persistent support (also after loading)."""
        if self.support == "random":
            crow, col = self.support_crow, self.support_col
            rows = torch.repeat_interleave(
                torch.arange(self.out_features, device=crow.device), crow.long().diff()
            )
            # the transposed CSR (S.T) for dx = dy @ S: same non-zeros, ordered by (col, row)
            perm = torch.argsort(col.long() * self.out_features + rows)
            t_crow = torch.zeros(self.in_features + 1, dtype=torch.long, device=crow.device)
            t_crow[1:] = torch.bincount(col.long(), minlength=self.in_features).cumsum(0)
            self.register_buffer("_t_perm", perm, persistent=False)
            self.register_buffer("_t_row", rows[perm].to(torch.int32), persistent=False)
            self.register_buffer("_t_crow", t_crow.to(torch.int32), persistent=False)
        else:
            bs = self.block_size
            self.register_buffer("_row_index", _tile_gather_index(self.tile_row, bs), persistent=False)
            self.register_buffer("_col_index", _tile_gather_index(self.tile_col, bs), persistent=False)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        rank: int,
        sparsity: float = 0.03,
        alpha: float = 32.0,
        support: str = "random",
        block_size: int = 32,
        seed: int = 0,
    ) -> SLTrainLinear:
        """A freshly initialised SLTrain layer with the shape, bias, dtype and device of ``linear``.

        ``linear`` is an ``nn.Linear`` or a transformers GPT-2 ``Conv1D`` (weight stored (in, out)).
        Its weights are not used: SLTrain trains from scratch.
        """
        conv1d = _is_conv1d(linear)
        if conv1d:
            in_features, out_features = linear.weight.shape
        elif isinstance(linear, nn.Linear):
            out_features, in_features = linear.weight.shape
        else:
            raise ValueError(f"cannot replace {type(linear).__name__}: only nn.Linear and Conv1D are supported")
        return cls(
            in_features, out_features, rank, sparsity=sparsity, alpha=alpha, support=support,
            block_size=block_size, bias=linear.bias is not None, seed=seed, conv1d=conv1d,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )

    def support_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) int64 of every entry of ``values``, in ``values`` order."""
        if self.support == "random":
            rows = torch.repeat_interleave(
                torch.arange(self.out_features, device=self.support_crow.device), self.support_crow.long().diff()
            )
            return rows, self.support_col.long()
        bs = self.block_size
        rows = self._row_index.view(-1, bs, 1).expand(-1, bs, bs)
        cols = self._col_index.view(-1, 1, bs).expand(-1, bs, bs)
        return rows.reshape(-1), cols.reshape(-1)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight ``B @ A * scale + S``; for merging and checks, never used in training."""
        weight = (self.B @ self.A).mul_(self.scale)
        rows, cols = self.support_indices()
        weight.view(-1).index_add_(0, rows * self.in_features + cols, self.values)
        return weight

    @torch.no_grad()
    def to_linear(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D`` if this layer replaced one) computing the same function."""
        return dense_module(self.dense_weight(), self.bias, self.conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects in_features={self.in_features}")
        return sltrain_linear(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"sparsity={self.sparsity}, alpha={self.alpha}, support={self.support!r}"
            + (f", block_size={self.block_size}" if self.support == "block" else "")
            + f", nnz={self.nnz}, bias={self.bias is not None}"
        )


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _check_args(in_features, out_features, rank, sparsity, alpha, support, block_size) -> None:
    if support not in SUPPORTS:
        raise ValueError(f"unknown support {support!r}; expected one of {list(SUPPORTS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0 or rank >= min(in_features, out_features):
        raise ValueError(
            f"rank={rank!r} must be an int in [1, min(in, out)) = [1, {min(in_features, out_features)}) "
            f"for a {out_features} x {in_features} weight"
        )
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be > 0")
    if support == "block" and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0
        or block_size > min(in_features, out_features)
    ):
        raise ValueError(
            f"block_size={block_size!r} must be an int in [1, {min(in_features, out_features)}] "
            f"for a {out_features} x {in_features} weight"
        )
