"""SLTrain layers: ``W = B @ A * (alpha / r) + S`` with ``S`` on a fixed sparse support, never densified.

The layer trains three parameters: the low-rank factors ``A`` (r x in) and ``B`` (out x r) and the
sparse values ``values`` (nnz,) of ``S``, whose support is fixed at construction (deterministic in the
seed) and stored as int32 buffers. Two support layouts:

- ``"random"``: ``nnz = round(sparsity * out * in)`` entries drawn uniformly without replacement, stored
  as int32 CSR (``support_crow`` (out + 1,), ``support_col`` (nnz,)): **4 bytes per non-zero** in the state
  dict plus 4 bytes per output row (the reference stores 16 bytes per non-zero: two int64 indices). In
  memory the layer also holds the transposed CSR that ``dx`` reads (int32 ``_t_row`` and ``_t_perm`` per
  non-zero, ``_t_crow`` per input column), rebuilt from the persistent buffers: 12 bytes per non-zero
  held in all, against the reference's 16.
- ``"block"``: ``round(sparsity * out * in / block_size**2)`` tiles of ``block_size x block_size`` drawn
  uniformly among the tiles that lie fully inside the weight (rows/columns past the last multiple of
  ``block_size`` carry no tiles), stored as int32 tile coordinates (``tile_row``, ``tile_col``) sorted by
  block-row: ``8 / block_size**2`` bytes per non-zero in the state dict; in memory also a row and a column
  pointer and the column-major tile order (int32), ``12 / block_size**2`` bytes per non-zero in all.
  ``values`` holds the tiles one after another, row-major.

The state dict also holds ``settings`` (5 int64: seed, rank, alpha as float64 bits, support, block size).
Loading a state dict from a layer with another alpha, rank, support or block size raises
:class:`~fxsparse.layers.s2ft.StateMismatchError` naming the layer (the seed is adopted with the support it
drew); a support whose indices are out of bounds or out of order raises ``ValueError`` before anything is
copied, instead of crashing the sparse kernels. A layer built on the meta device draws its support again
from its seed when ``to_empty()`` gives it memory (:meth:`SLTrainLinear.reset_support`,
:func:`fxsparse.materialize`). Without autocast the layer computes in the input's dtype, so float32 master
parameters train on a bfloat16 model.

Training never builds an ``out x in`` tensor: the forward is ``(x @ A.T) @ B.T * scale + x @ S.T``, the
backward takes dB and dA from the rank-r activation, dS only on the support (a sampled dense-dense
product), and dx through the factors and ``S.T``. Only ``x`` and ``x @ A.T`` (times ``scale``) are saved
for backward. The forward and backward are the ``torch.library`` ops of :mod:`fxsparse.codegen.sltrain`
(Triton kernels on CUDA, a plain torch composition on CPU: MKL sparse CSR kernels for the random layout,
one small GEMM per tile for the block layout), so ``torch.compile(model, fullgraph=True)`` traces the
layer without a graph break. bf16 / fp16 work; on CPU the random layout's sparse products then run in
float32 (MKL has no bf16 CSR kernels). Under autocast the layer runs in the autocast dtype.

Measured with ``benchmarks/bench_sltrain_block.py`` (350M-shaped LLaMA block, 1024 tokens, rank 256,
density 0.03, one training step against the dense block in the same run) on the 2-core development CPU
(AMD EPYC, Zen 4), 2 threads, median of 3 quiet runs: random 0.76x dense, block-16 0.67x, block-32 0.59x
(the autograd Functions these ops replaced, run alternately with them: 0.78x, 0.72x, 0.68x).

>>> import torch
>>> layer = SLTrainLinear(64, 48, rank=8, sparsity=0.05, alpha=16.0, seed=0)
>>> y = layer(torch.randn(2, 5, 64))
>>> y.shape, layer.values.numel() == round(0.05 * 48 * 64)
(torch.Size([2, 5, 48]), True)
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from fxsparse.codegen.sltrain import sltrain_block, sltrain_random, tile_pointers, transpose_csr
from fxsparse.layers import dense_module
from fxsparse.layers import is_conv1d as _is_conv1d
from fxsparse.layers.s2ft import StateMismatchError

__all__ = [
    "SUPPORTS",
    "SLTrainLinear",
    "StateMismatchError",
    "layer_seed",
    "random_support",
    "block_support",
    "sltrain_linear",
]

SUPPORTS = ("random", "block")

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


def _tile_index(tile: torch.Tensor, block_size: int) -> torch.Tensor:
    """Row (or column) of the weight of every tile entry along one axis: (tiles * block_size,) int64."""
    offsets = torch.arange(block_size, device=tile.device)
    return (tile.long()[:, None] * block_size + offsets).reshape(-1)


def sltrain_linear(x: torch.Tensor, layer: SLTrainLinear) -> torch.Tensor:
    """``x @ (B @ A * scale + S).T + bias`` for ``layer``'s parameters, without forming the weight.

    Without autocast the layer computes in the input's dtype: float32 master parameters on a bfloat16 model
    (the usual mixed-precision recipe) are cast for the products, and their gradients come back in float32.
    """
    A, B, values, bias = layer.A, layer.B, layer.values, layer.bias
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type) and x.is_floating_point() and A.dtype != x.dtype:
        A, B, values = A.to(x.dtype), B.to(x.dtype), values.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    if torch.is_autocast_enabled(device_type):
        # autocast would pick a dtype per op inside the kernels; run the whole layer in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        x, A, B, values = (t.to(dtype) for t in (x, A, B, values))
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _apply(layer, x, A, B, values, bias)
    return _apply(layer, x, A, B, values, bias)


def _apply(layer: SLTrainLinear, x, A, B, values, bias) -> torch.Tensor:
    if layer.support == "block":
        return sltrain_block(x, A, B, values, bias, layer.tile_row, layer.tile_col, layer._tile_ptr,
                             layer._t_tile_ptr, layer._t_tile_perm, layer.block_size, layer.scale)
    return sltrain_random(x, A, B, values, bias, layer.support_crow, layer.support_col, layer._t_crow,
                          layer._t_row, layer._t_perm, layer.scale)


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
        first, second = self._draw_support(generator)
        if support == "random":
            self.register_buffer("support_crow", first)
            self.register_buffer("support_col", second)
            nnz = second.numel()
        else:
            self.register_buffer("tile_row", first)
            self.register_buffer("tile_col", second)
            nnz = first.numel() * block_size * block_size
        # Recorded in the state dict: seed (adopted on load, with the support it drew), and rank, alpha (float64
        # bits), support, block size (checked on load), as int64 so that model.to(dtype) leaves it alone.
        self.register_buffer("settings", self._settings())

        A = torch.empty(self.rank, in_features, **factory)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(in_features)
        values = torch.empty(nnz, **factory).uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(out_features, self.rank, **factory))
        self.values = nn.Parameter(values)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self._derive_support()
        # a function, not a lambda: the module must stay picklable (torch.save(model))
        self.register_load_state_dict_post_hook(SLTrainLinear._after_load)
        if device is not None:
            self.to(device)

    def _draw_support(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The support drawn from ``generator`` (its first draws): (crow, col) or (tile_row, tile_col), CPU int32."""
        out_features, in_features, bs = self.out_features, self.in_features, self.block_size
        if self.support == "random":
            return random_support(out_features, in_features, round(self.sparsity * out_features * in_features),
                                  generator)
        tiles = round(self.sparsity * out_features * in_features / bs**2)
        if self.sparsity > 0:
            tiles = max(tiles, 1)
        return block_support(out_features, in_features, tiles, bs, generator)

    def _settings(self) -> torch.Tensor:
        alpha_bits = torch.tensor([self.alpha], dtype=torch.float64).view(torch.int64).item()
        return torch.tensor([self.seed, self.rank, alpha_bits, SUPPORTS.index(self.support), self.block_size],
                            dtype=torch.int64)

    def _support_tensors(self) -> dict[str, torch.Tensor]:
        names = ("support_crow", "support_col") if self.support == "random" else ("tile_row", "tile_col")
        return {name: getattr(self, name) for name in names}

    def check_support(self, tensors: dict[str, torch.Tensor] | None = None, name: str = "SLTrainLinear") -> None:
        """``ValueError`` unless the support index tensors (the layer's, or ``tensors`` about to be loaded) are
        well formed: shapes, bounds and order. Uninitialised memory (``to_empty()``) or a corrupt file fails
        here instead of crashing the sparse kernels."""
        tensors = self._support_tensors() if tensors is None else tensors
        if any(t.is_meta for t in tensors.values()):
            return
        nnz = self.values.numel()
        problem = None
        if self.support == "random":
            crow, col = (tensors[k].long() for k in ("support_crow", "support_col"))
            if crow.shape != (self.out_features + 1,) or col.dim() != 1:
                problem = f"support_crow has shape {tuple(crow.shape)}, expected ({self.out_features + 1},)"
            elif int(crow[0]) != 0 or int(crow[-1]) != col.numel() or bool((crow.diff() < 0).any()):
                problem = "support_crow is not a row pointer (0 first, non-decreasing, ending at the non-zero count)"
            elif col.numel() and (int(col.min()) < 0 or int(col.max()) >= self.in_features):
                problem = f"support_col has entries outside [0, {self.in_features})"
            elif col.numel() != nnz and nnz:
                problem = f"the support has {col.numel()} entries for {nnz} values"
        else:
            rows, cols = (tensors[k].long() for k in ("tile_row", "tile_col"))
            grid = (self.out_features // self.block_size, self.in_features // self.block_size)
            if rows.shape != cols.shape or rows.dim() != 1:
                problem = f"tile_row {tuple(rows.shape)} and tile_col {tuple(cols.shape)} differ in shape"
            elif rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= grid[0] or int(cols.min()) < 0
                                   or int(cols.max()) >= grid[1]):
                problem = f"tiles outside the {grid[0]} x {grid[1]} tile grid"
            elif rows.numel() > 1 and bool((rows.diff() < 0).any()):
                problem = "tiles are not sorted by block-row"
        if problem is not None:
            raise ValueError(f"{name}: invalid sparse support ({problem}): uninitialised memory after to_empty() "
                             "(call fxsparse.materialize(model)) or a corrupt state dict")

    @torch.no_grad()
    def reset_support(self) -> None:
        """Draw the support again from the layer's seed (the same one the constructor drew) and rebuild the
        index tensors the kernels use. For a model transformed on the meta device after ``to_empty()``
        (``to_empty`` calls it itself; :func:`fxsparse.materialize` too). Parameters are not touched."""
        if self.values.is_meta:
            return
        drawn = self._draw_support(torch.Generator().manual_seed(self.seed))
        for tensor, (key, current) in zip(drawn, self._support_tensors().items(), strict=True):
            setattr(self, key, tensor.to(current.device))
        self.settings = self._settings().to(self.settings.device)
        self.check_support()
        self._derive_support()

    materialize = reset_support

    def _apply(self, fn, recurse=True):
        was_meta = self.values.is_meta
        result = super()._apply(fn, recurse)
        if was_meta and not self.values.is_meta:
            self.reset_support()  # to_empty(): every buffer is uninitialised memory
        return result

    def check_state(self, state_dict, prefix: str = "") -> int | None:
        """Raise :class:`StateMismatchError` (naming the layer) if ``state_dict`` (this layer's keys under
        ``prefix``) was saved with another rank, alpha, support or block size, or holds an invalid support;
        changes nothing. Returns the support seed the state dict records (None if it records none)."""
        name = prefix[:-1] or "SLTrainLinear"
        seed = None
        settings = state_dict.get(prefix + "settings")
        if isinstance(settings, torch.Tensor) and not settings.is_meta and settings.numel() == 5:
            seed, rank, alpha_bits, support, block_size = settings.tolist()
            alpha = torch.tensor([alpha_bits], dtype=torch.int64).view(torch.float64).item()
            # the seed is not compared: the support it drew comes with the state dict, and the layer adopts both
            theirs = {"rank": rank, "alpha": alpha,
                      "support": SUPPORTS[support] if 0 <= support < len(SUPPORTS) else support,
                      "block_size": block_size}
            ours = {"rank": self.rank, "alpha": self.alpha, "support": self.support, "block_size": self.block_size}
            if self.support == "random":
                del theirs["block_size"], ours["block_size"]
            diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
            if diff:
                shown = ", ".join(f"{k}={a!r} (this layer: {b!r})" for k, (a, b) in diff.items())
                raise StateMismatchError(
                    f"{name}: the state dict was saved from an SLTrain layer with {shown}; transform the model with "
                    "the options it was trained with (rank, alpha, support, block_size)")
        incoming = {key: state_dict[prefix + key] for key in self._support_tensors() if prefix + key in state_dict}
        if len(incoming) == 2 and all(isinstance(t, torch.Tensor) for t in incoming.values()):
            self.check_support(incoming, name)
        return None if seed is None else int(seed)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        seed = self.check_state(state_dict, prefix)
        if seed is not None:
            self.seed = seed
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "settings" in missing_keys:  # state dicts written before the settings were recorded
            missing_keys.remove(prefix + "settings")

    def _derive_support(self) -> None:
        """Index tensors the kernels need (int32), rebuilt from the persistent support (also after loading)."""
        if self.support == "random":
            t_crow, t_row, t_perm = transpose_csr(self.support_crow, self.support_col, self.in_features)
            self.register_buffer("_t_crow", t_crow, persistent=False)
            self.register_buffer("_t_row", t_row, persistent=False)
            self.register_buffer("_t_perm", t_perm, persistent=False)
        else:
            ptr, t_ptr, t_perm = tile_pointers(self.tile_row, self.tile_col, self.out_features, self.in_features,
                                               self.block_size)
            self.register_buffer("_tile_ptr", ptr, persistent=False)
            self.register_buffer("_t_tile_ptr", t_ptr, persistent=False)
            self.register_buffer("_t_tile_perm", t_perm, persistent=False)

    @staticmethod
    def _after_load(module: SLTrainLinear, incompatible_keys) -> None:
        module._derive_support()

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
        rows = _tile_index(self.tile_row, bs).view(-1, bs, 1).expand(-1, bs, bs)
        cols = _tile_index(self.tile_col, bs).view(-1, 1, bs).expand(-1, bs, bs)
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
