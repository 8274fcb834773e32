"""SLTrain kernels: ``y = (x @ A.T) @ B.T * scale + x @ S.T (+ bias)`` and its backward, ``S`` on a fixed support.

``S`` (out x in) is never densified. Its support comes in one of two layouts, both built once by the layer
(:class:`~fxsparse.layers.sltrain.SLTrainLinear`) as int32 buffers:

- ``random``: CSR by output row (``crow`` (out + 1,), ``col`` (nnz,), ``values`` in CSR order) plus the
  transposed CSR for ``dx`` (:func:`transpose_csr`: ``t_crow`` (in + 1,), ``t_row`` (nnz,) and ``t_perm``,
  the position in ``values`` of each entry of the transposed order: ``S.T`` is read through ``t_perm``,
  never copied);
- ``block``: ``block_size`` x ``block_size`` tiles at (``tile_row``, ``tile_col``) sorted by block-row,
  ``values`` holding the tiles one after another row-major, a row pointer ``tile_ptr`` over the
  ``ceil(out / block_size)`` block-rows and, for ``dx``, ``t_tile_ptr`` over the block-columns with
  ``t_tile_perm`` listing the tiles column by column (:func:`tile_pointers`).

Ops (``torch.library``, each with a fake and, for the forward, an autograd formula written with the
backward op, so ``torch.compile(fullgraph=True)`` traces a whole SLTrain model with no graph break):

- ``fxsparse::sltrain_random_fwd`` / ``fxsparse::sltrain_block_fwd`` -> ``(y, hs)`` with the rank-r
  activation ``hs = x @ A.T * scale`` (scaled once, T x r, rather than on every T x out product), which
  backward reuses: ``x`` and ``hs`` are all it saves of activation size;
- ``fxsparse::sltrain_random_bwd`` / ``fxsparse::sltrain_block_bwd`` -> ``(dx, dA, dB, dvalues, dbias)``;
  the gradients nobody needs come back as empty tensors and are not computed (no ``dx`` when ``x``
  needs no gradient).

Each op reads ``FXSPARSE_KERNELS`` at every call (:func:`~fxsparse.codegen.autotune.use_triton`):

- Triton (CUDA, or the CPU interpreter): ``hs`` and the low-rank gradient GEMMs (``dh``, ``dA``, ``dB``)
  run on cuBLAS through torch; one kernel per output tile accumulates the low-rank product ``L @ R`` and
  the sparse product into the same registers and stores the tile once (forward: ``L = hs``, ``R = B.T``,
  bias added there too; ``dx``: ``L = dh``, ``R = A``, sparse part through the transposed layout). Random
  support: the program walks its output columns' non-zeros in step (an ELL-style loop up to the longest
  row of the tile), gathering columns of a column-major copy of the input (coalesced along tokens).
  Block support: one ``tl.dot`` per tile of the block-row (tensor cores; tiles under 16 wide use a
  broadcast product). ``dvalues`` is a sampled dense-dense product (SDDMM) on the support only: per group
  of CSR rows, or one program per tile (a ``tl.dot`` over the tokens).
- torch (CPU): the same composition on BLAS GEMMs plus MKL's CSR kernels over token chunks (random) or
  one GEMM per tile on strided views (block); the tuning constants give the measurements.

>>> import torch
>>> crow, col = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32)
>>> t_crow, t_row, t_perm = transpose_csr(crow, col, 3)
>>> x, A, B, v = torch.ones(2, 3), torch.ones(1, 3), torch.ones(2, 1), torch.tensor([2.0, 3.0])
>>> sltrain_random(x, A, B, v, None, crow, col, t_crow, t_row, t_perm, 0.5).tolist()
[[3.5, 4.5], [3.5, 4.5]]
"""

import contextlib
import warnings
from collections import Counter
from typing import Optional

import torch

from fxsparse.codegen.autotune import Config, interpreting, pick_config, use_triton
from fxsparse.codegen.launch import device_guard as _device_guard
from fxsparse.codegen.launch import kernel_dtypes as _kernel_dtypes
from fxsparse.codegen.launch import next_pow2 as _next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the library runs on CPU without triton
    triton = tl = None

__all__ = [
    "sltrain_random",
    "sltrain_block",
    "transpose_csr",
    "tile_pointers",
    "sltrain_reference",
    "launch_counts",
]


# ---------------------------------------------------------------- tuning constants
#
# No GPU was lent to the session that wrote these kernels: the candidate tiles below are reasoned, not
# measured (pick_config times every candidate on the device the first time a shape is seen, so a poor
# guess costs tuning time, not speed). Replace these comments with figures once a GPU run has made them.

# At or below this many tokens a launch is decode-like: small token tiles waste less of each tile.
_SMALL_M = 64
# The CSR loops run to the longest row of an output tile; at density 0.03 a 1024-wide row holds about
# 31 +- 5.5 entries, so a 32- or 64-row tile wastes ~30% of its gather steps on padding, 128 rows more.
_CSR_BLOCK_N = (32, 64)
# The interpreter takes the first candidate: few, small programs keep the CPU tests fast.
_INTERPRETER_M = 32

# CPU (torch) path. Measured on the 2-core development machine (AMD EPYC, Zen 4), 1 thread, CPU time, one
# layer's forward + backward at 1024 tokens, rank 256, density 0.03 (minimum of 11; low-rank GEMMs alone
# take 35 / 64 / 63 ms at 1024x1024 / 1024->2736 / 2736->1024):
# - random support: MKL's CSR kernels over 128-token chunks of x.T / dy.T (each chunk's transposed copy and
#   (features x 128) product stay in cache) against whole-tensor transposes: 52 vs 56, 102 vs 111 and
#   108 vs 112 ms (64 and 256 tokens per chunk: within 3%). MKL's CSR @ dense runs faster on a row-major
#   dense operand than on a column-major view (10.9 vs 12.2 ms for S @ x.T at 1024->2736).
_CPU_TOKEN_CHUNK = 128
# - block support: one addmm_ per tile on strided views of x / y / dx / dy (no copy at all) against
#   gathering the tiles' rows of x.T, one batched GEMM and a scatter-add (plus the transposes): 32-wide
#   tiles 40 vs 49, 75 vs 105 and 79 vs 88 ms; 16-wide 45 vs 61, 82 vs 115 and 88 vs 97 ms; 8-wide the
#   per-call cost wins at 1024x1024 (491 tiles: 83 vs 56 ms), so tiles narrower than this are batched.
_CPU_TILE_LOOP_MIN_BLOCK = 16
# With 2 threads (whole 350M-shaped block step against dense, both ways alternating in one process, quiet
# machine) the token chunks are about neutral for random (0.75x vs 0.78x dense) and the tile loop wins for
# blocks (0.59x vs 0.68x at 32 wide, 0.67x vs 0.71x at 16). Small per-chunk / per-tile ops are more
# sensitive to other processes on the cores than whole-tensor ones: benchmark on a quiet machine.

_LAUNCHES: Counter = Counter()


def launch_counts() -> dict[str, int]:
    """How many times each Triton kernel of this family was launched in this process (tests check it)."""
    return dict(_LAUNCHES)


# ---------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _lowrank_tile(l_ptr, r_ptr, offs_m, offs_n, mask_m, mask_n, RANK, stride_lm, stride_lr, stride_rr,
                      stride_rn, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """L[offs_m, :] @ R[:, offs_n] over the whole rank, in ACC."""
        lane = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for r0 in range(0, RANK, BLOCK_R):
            r = r0 + lane
            mask_r = r < RANK
            a = tl.load(l_ptr + offs_m[:, None] * stride_lm + r[None, :] * stride_lr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(r_ptr + r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if DOT_F32:  # the interpreter's half-precision dot is wrong (errors ~1e10), its fp32 dot exact
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        return acc

    @triton.jit
    def _lowrank_csr_kernel(
        # pointers
        l_ptr, r_ptr, x_ptr, ptr_ptr, idx_ptr, perm_ptr, val_ptr, bias_ptr, out_ptr,
        # sizes: out is (M, N); L is (M, RANK), R is (RANK, N); X's columns are gathered by idx
        M, N, RANK,
        # strides
        stride_lm, stride_lr, stride_rr, stride_rn, stride_xm, stride_xk, stride_om, stride_on,
        # meta-parameters
        HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """out = L @ R + X @ S.T (+ bias), S in CSR by output column n of out.

        Forward: L = h * scale, R = B.T, X = x, (ptr, idx) = (crow, col). dx: L = dh, R = A, X = dy,
        (ptr, idx, perm) = the transposed CSR. The sparse part walks the tile's columns' entries in step:
        step j adds X[:, idx[ptr[n] + j]] * value to column n for every n whose row is that long.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = _lowrank_tile(l_ptr, r_ptr, offs_m, offs_n, mask_m, mask_n, RANK, stride_lm, stride_lr, stride_rr,
                            stride_rn, DOT_F32, PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_R)
        start = tl.load(ptr_ptr + offs_n, mask=mask_n, other=0)
        length = tl.load(ptr_ptr + offs_n + 1, mask=mask_n, other=0) - start
        for j in range(0, tl.max(length, axis=0)):
            live = j < length
            entry = start + j
            k = tl.load(idx_ptr + entry, mask=live, other=0).to(tl.int64)
            if HAS_PERM:
                entry = tl.load(perm_ptr + entry, mask=live, other=0)
            v = tl.load(val_ptr + entry, mask=live, other=0.0).to(ACC)
            xg = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                         mask=mask_m[:, None] & live[None, :], other=0.0)
            acc += xg.to(ACC) * v[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _csr_sddmm_kernel(
        # pointers
        dy_ptr, x_ptr, ptr_ptr, idx_ptr, out_ptr,
        # sizes: dy is (M, N), x is (M, K); out[e] for the nnz entries e of the CSR (N rows)
        M, N,
        # strides
        stride_dm, stride_dn, stride_xm, stride_xk,
        # meta-parameters
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """out[e] = dy[:, n(e)] . x[:, idx[e]] over the tokens: dvalues, on the support only (SDDMM).

        Each program owns BLOCK_N rows of S and walks their entries in step, reducing over the tokens in
        BLOCK_M chunks; dy's columns of the tile stay in cache across the steps.
        """
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        start = tl.load(ptr_ptr + offs_n, mask=mask_n, other=0)
        length = tl.load(ptr_ptr + offs_n + 1, mask=mask_n, other=0) - start
        lane = tl.arange(0, BLOCK_M)
        for j in range(0, tl.max(length, axis=0)):
            live = j < length
            entry = start + j
            k = tl.load(idx_ptr + entry, mask=live, other=0).to(tl.int64)
            acc = tl.zeros((BLOCK_N,), dtype=ACC)
            for m0 in range(0, M, BLOCK_M):
                m = (m0 + lane).to(tl.int64)
                mask = (m < M)[:, None] & live[None, :]
                d = tl.load(dy_ptr + m[:, None] * stride_dm + offs_n[None, :] * stride_dn, mask=mask, other=0.0)
                xg = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk, mask=mask, other=0.0)
                acc += tl.sum(d.to(ACC) * xg.to(ACC), axis=0)
            tl.store(out_ptr + entry, acc.to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _lowrank_tiles_kernel(
        # pointers
        l_ptr, r_ptr, x_ptr, ptr_ptr, other_ptr, perm_ptr, val_ptr, bias_ptr, out_ptr,
        # sizes: out is (M, N), NB = ceil(N / BS) block-columns; L is (M, RANK), R is (RANK, N)
        M, N, NB, RANK,
        # strides; tile t's entry (g, c) (g: gathered X column, c: out column) is at t * BS * BS + g*vg + c*vc
        stride_lm, stride_lr, stride_rr, stride_rn, stride_xm, stride_xk, stride_om, stride_on,
        stride_vg, stride_vc,
        # meta-parameters: a program covers G block-columns, BLOCK_N >= G * BS (>= 16 for tl.dot)
        BS: tl.constexpr, G: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
        TILE_DOT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """out = L @ R + sum over the tiles of each block-column b of out of X[:, tile block] @ tile (+ bias).

        One program per (token tile, G consecutive BS-wide block-columns of out). Forward: block-columns of
        out are block-rows of S, the tiles come in stored order (ptr = tile_ptr, other = tile_col) and are
        read transposed. dx: block-columns of dx are block-columns of S (ptr = t_tile_ptr, perm =
        t_tile_perm, other = tile_row), tiles read as stored. G > 1 only for tiles under 16 wide, whose
        products then run as broadcast sums placed into the program's 16 columns (tl.dot needs 16).
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        offs_n = pid_n * (G * BS) + cols
        mask_m = offs_m < M
        mask_n = (cols < G * BS) & (offs_n < N)
        sub = cols // BS  # which of the program's block-columns an output column belongs to
        within = cols - sub * BS  # its position inside that block-column's tiles
        acc = _lowrank_tile(l_ptr, r_ptr, offs_m, offs_n, mask_m, mask_n, RANK, stride_lm, stride_lr, stride_rr,
                            stride_rn, DOT_F32, PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_R)
        lane = tl.arange(0, BLOCK_S)
        in_tile = lane < BS
        for g in tl.static_range(G):
            b = pid_n * G + g
            if b < NB:
                lo = tl.load(ptr_ptr + b)
                hi = tl.load(ptr_ptr + b + 1)
                mine = mask_n & (sub == g)
                for e in range(lo, hi):
                    t = e
                    if HAS_PERM:
                        t = tl.load(perm_ptr + e)
                    gathered = tl.load(other_ptr + t).to(tl.int64) * BS + lane
                    xb = tl.load(x_ptr + offs_m[:, None] * stride_xm + gathered[None, :] * stride_xk,
                                 mask=mask_m[:, None] & in_tile[None, :], other=0.0)
                    w = tl.load(val_ptr + t.to(tl.int64) * (BS * BS) + lane[:, None] * stride_vg
                                + within[None, :] * stride_vc, mask=in_tile[:, None] & mine[None, :], other=0.0)
                    if TILE_DOT:
                        if DOT_F32:
                            xb = xb.to(tl.float32)
                            w = w.to(tl.float32)
                        acc = tl.dot(xb, w, acc, input_precision=PRECISION, out_dtype=ACC)
                    else:
                        acc += tl.sum(xb.to(ACC)[:, :, None] * w.to(ACC)[None, :, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _tiles_sddmm_kernel(
        # pointers
        dy_ptr, x_ptr, row_ptr, col_ptr, out_ptr,
        # sizes: dy is (M, out), x is (M, in)
        M,
        # strides
        stride_dm, stride_dn, stride_xm, stride_xk,
        # meta-parameters
        BS: tl.constexpr, TILE_DOT: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """dvalues of tile t = dy[:, its rows].T @ x[:, its columns] over the tokens (one program per tile)."""
        t = tl.program_id(0)
        lane = tl.arange(0, BLOCK_S)
        in_tile = lane < BS
        rows = tl.load(row_ptr + t).to(tl.int64) * BS + lane
        cols = tl.load(col_ptr + t).to(tl.int64) * BS + lane
        tokens = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_S, BLOCK_S), dtype=ACC)
        for m0 in range(0, M, BLOCK_M):
            m = (m0 + tokens).to(tl.int64)
            mask_m = m < M
            d = tl.load(dy_ptr + m[None, :] * stride_dm + rows[:, None] * stride_dn,
                        mask=in_tile[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_S, BLOCK_M): dy.T
            xb = tl.load(x_ptr + m[:, None] * stride_xm + cols[None, :] * stride_xk,
                         mask=mask_m[:, None] & in_tile[None, :], other=0.0)
            if TILE_DOT:
                if DOT_F32:
                    d = d.to(tl.float32)
                    xb = xb.to(tl.float32)
                acc = tl.dot(d, xb, acc, input_precision=PRECISION, out_dtype=ACC)
            else:
                acc += tl.sum(d.to(ACC)[:, :, None] * xb.to(ACC)[None, :, :], axis=1)
        tl.store(out_ptr + t.to(tl.int64) * (BS * BS) + lane[:, None] * BS + lane[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=in_tile[:, None] & in_tile[None, :])


# ---------------------------------------------------------------- candidate configs


def _rank_block(rank: int) -> int:
    return min(64, max(16, _next_pow2(rank)))


def _csr_configs(m: int, rank: int) -> list[Config]:
    """Fused low-rank + CSR candidates: BLOCK_M tokens x BLOCK_N output columns, BLOCK_R of the rank a step."""
    br = _rank_block(rank)
    if interpreting():
        return [Config({"BLOCK_M": _INTERPRETER_M, "BLOCK_N": 32, "BLOCK_R": br})]
    token_tiles = (16, 32, 64) if m <= _SMALL_M else (64, 128)
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br}, num_warps=4 if bm * bn <= 4096 else 8,
                   num_stages=s)
            for bm in token_tiles for bn in _CSR_BLOCK_N for s in (2, 3)]


def _csr_sddmm_configs(m: int) -> list[Config]:
    if interpreting():
        return [Config({"BLOCK_M": _INTERPRETER_M, "BLOCK_N": 32})]
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
            for bm, bn, w in [(64, 32, 4), (128, 32, 4), (64, 64, 4), (128, 64, 8), (256, 32, 8)]]


def _tiles_configs(m: int, rank: int, block_size: int) -> list[Config]:
    """Fused low-rank + tiles candidates: BLOCK_M tokens per program (its columns: one tile, or 16 narrow ones)."""
    br = _rank_block(rank)
    if interpreting():
        return [Config({"BLOCK_M": _INTERPRETER_M, "BLOCK_R": br})]
    token_tiles = (16, 32, 64) if m <= _SMALL_M else (64, 128, 256)
    return [Config({"BLOCK_M": bm, "BLOCK_R": br}, num_warps=w, num_stages=s)
            for bm in token_tiles for w, s in ((4, 2), (4, 3), (8, 3)) if w == 4 or bm * max(16, block_size) >= 4096]


def _tiles_sddmm_configs(m: int, block_size: int) -> list[Config]:
    if interpreting():
        return [Config({"BLOCK_M": _INTERPRETER_M})]
    return [Config({"BLOCK_M": bm}, num_warps=w, num_stages=s) for bm, w, s in
            [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2), (32, 4, 4)]]


# ---------------------------------------------------------------- plain-torch reference


def sltrain_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor,
                      bias: Optional[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """The layer through its dense weight ``B @ A * scale + S`` (``S[rows[i], cols[i]] = values[i]``):
    differentiable in everything, for tests in float64; never used in training.

    >>> x, A, B = torch.ones(1, 2), torch.ones(1, 2), torch.ones(2, 1)
    >>> sltrain_reference(x, A, B, torch.tensor([1.0]), None, torch.tensor([0]), torch.tensor([1]), 0.5).tolist()
    [[2.0, 1.0]]
    """
    sparse = torch.zeros(B.shape[0], A.shape[1], dtype=values.dtype, device=values.device)
    sparse = sparse.index_put((rows.long(), cols.long()), values, accumulate=True)
    return torch.nn.functional.linear(x, (B @ A) * scale + sparse, bias)


def transpose_csr(crow: torch.Tensor, col: torch.Tensor, n_cols: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSR of ``S.T`` for a CSR ``(crow, col)`` of ``S`` with ``n_cols`` columns, as int32
    ``(t_crow (n_cols + 1,), t_row (nnz,), t_perm (nnz,))``: entry ``i`` of the transposed order sits in
    row ``t_row[i]`` of ``S`` and is ``values[t_perm[i]]``.

    >>> [t.tolist() for t in transpose_csr(torch.tensor([0, 2, 3]), torch.tensor([1, 0, 1]), 2)]
    [[0, 1, 3], [0, 0, 1], [1, 0, 2]]
    """
    n_rows = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_rows, device=crow.device), crow.long().diff())
    perm = torch.argsort(col.long() * max(n_rows, 1) + rows)
    t_crow = torch.zeros(n_cols + 1, dtype=torch.long, device=crow.device)
    t_crow[1:] = torch.bincount(col.long(), minlength=n_cols).cumsum(0)
    return t_crow.to(torch.int32), rows[perm].to(torch.int32), perm.to(torch.int32)


def tile_pointers(tile_row: torch.Tensor, tile_col: torch.Tensor, out_features: int, in_features: int,
                  block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 ``(tile_ptr, t_tile_ptr, t_tile_perm)`` for tiles sorted by block-row: the row pointer over the
    ``ceil(out / block_size)`` block-rows, and the column pointer over the ``ceil(in / block_size)``
    block-columns with the tiles listed column by column (``t_tile_perm``). Unsorted tiles: ValueError.

    >>> [t.tolist() for t in tile_pointers(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 4, 5, 2)]
    [[0, 2, 3], [0, 1, 3, 3], [0, 1, 2]]
    """
    rows, cols = tile_row.long(), tile_col.long()
    if rows.numel() > 1 and bool((rows.diff() < 0).any()):
        raise ValueError("block support: tiles must be sorted by block-row (tile_row non-decreasing)")
    n_rows, n_cols = -(-out_features // block_size), -(-in_features // block_size)
    ptr = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    ptr[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    t_ptr = torch.zeros(n_cols + 1, dtype=torch.long, device=rows.device)
    t_ptr[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
    perm = torch.argsort(cols * max(n_rows, 1) + rows)
    return ptr.to(torch.int32), t_ptr.to(torch.int32), perm.to(torch.int32)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix for MKL; MKL has no bf16/fp16 kernels, so those run in float32."""
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    # torch warns that CSR is "beta"; the CSR ops used here (SpMM, sampled_addmm) are stable. The filter is
    # local: a library installs no global warning filters.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _scaled_h(x: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """``x @ A.T * scale``: the saved rank-r activation, scaled once (T x r) instead of on every T x out GEMM."""
    return (x @ A.t()).mul_(scale)


def _lowrank_out(hs: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.addmm(bias, hs, B.t()) if bias is not None else hs @ B.t()


def _lowrank_grads(dy, x, hs, A, B, scale, needs):
    """dh (dx and dA need it), dA and dB as plain GEMMs (BLAS / cuBLAS through torch; no transposed copies)."""
    dh = (dy @ B).mul_(scale)
    dA = dh.t() @ x if needs[1] else None
    dB = dy.t() @ hs if needs[2] else None
    return dh, dA, dB


def _token_chunks(tokens: int):
    for start in range(0, tokens, _CPU_TOKEN_CHUNK):
        yield slice(start, min(tokens, start + _CPU_TOKEN_CHUNK))


def _random_forward_torch(x, A, B, values, bias, crow, col, scale):
    """Low-rank GEMMs on BLAS; ``x @ S.T`` on MKL's CSR kernel, one token chunk at a time (see the tuning
    constants): the chunk's transposed copy and its (out x chunk) product stay in cache."""
    hs = _scaled_h(x, A, scale)
    y = _lowrank_out(hs, B, bias)
    if values.numel():
        S = _csr(crow, col, values, (B.shape[0], A.shape[1]))
        for chunk in _token_chunks(x.shape[0]):
            y[chunk] += (S @ x[chunk].t().to(S.dtype).contiguous()).t()
    return y, hs


def _random_backward_torch(dy, x, hs, A, B, values, crow, col, t_crow, t_row, t_perm, scale, needs):
    out_features, in_features = B.shape[0], A.shape[1]
    dh, dA, dB = _lowrank_grads(dy, x, hs, A, B, scale, needs)
    dx = dh @ A if needs[0] else None
    dvalues = None
    if values.numel() and (needs[0] or needs[3]):
        S = _csr(crow, col, values, (out_features, in_features))
        S_t = _csr(t_crow, t_row, values[t_perm.long()], (in_features, out_features)) if needs[0] else None
        dvalues = torch.zeros_like(values, dtype=S.dtype) if needs[3] else None
        for chunk in _token_chunks(x.shape[0]):
            dy_t = dy[chunk].t().to(S.dtype).contiguous()  # one transposed chunk serves dx and dvalues
            if needs[0]:
                dx[chunk] += (S_t @ dy_t).t()
            if needs[3]:
                dvalues += torch.sparse.sampled_addmm(S, dy_t, x[chunk].to(S.dtype), beta=0.0).values()
    if needs[3]:
        dvalues = dvalues.to(values.dtype) if dvalues is not None else torch.zeros_like(values)
    return dx, dA, dB, dvalues, dy.sum(0) if needs[4] else None


def _tile_index(tile: torch.Tensor, block_size: int) -> torch.Tensor:
    """Row (or column) of the weight of every tile entry along one axis: (tiles * block_size,) int64."""
    return (tile.long()[:, None] * block_size + torch.arange(block_size, device=tile.device)).reshape(-1)


def _block_forward_torch(x, A, B, values, bias, tile_row, tile_col, block_size, scale):
    """Low-rank GEMMs on BLAS plus one small GEMM per tile (see the tuning constants for the two ways)."""
    hs = _scaled_h(x, A, scale)
    y = _lowrank_out(hs, B, bias)
    tiles, bs = tile_row.numel(), block_size
    if not tiles:
        return y, hs
    V = values.view(tiles, bs, bs)
    if bs >= _CPU_TILE_LOOP_MIN_BLOCK:
        # each tile reads and writes strided views of x and y directly: no gather, scatter or transpose
        for t, (r, c) in enumerate(zip(tile_row.tolist(), tile_col.tolist())):
            y[:, r * bs:(r + 1) * bs].addmm_(x[:, c * bs:(c + 1) * bs], V[t].t())
    else:
        # many tiny tiles: gather the tiles' input rows of x.T and run one batched GEMM over them
        x_tiles = x.t().contiguous().index_select(0, _tile_index(tile_col, bs)).view(tiles, bs, -1)
        y_t = y.new_zeros(y.shape[1], y.shape[0])
        y_t.index_add_(0, _tile_index(tile_row, bs), torch.bmm(V, x_tiles).view(tiles * bs, -1))
        y += y_t.t()
    return y, hs


def _block_backward_torch(dy, x, hs, A, B, values, tile_row, tile_col, block_size, scale, needs):
    dh, dA, dB = _lowrank_grads(dy, x, hs, A, B, scale, needs)
    dx = dh @ A if needs[0] else None
    tiles, bs = tile_row.numel(), block_size
    V = values.view(tiles, bs, bs)
    dV = torch.empty_like(V) if needs[3] else None
    if tiles and (needs[0] or needs[3]):
        if bs >= _CPU_TILE_LOOP_MIN_BLOCK:
            for t, (r, c) in enumerate(zip(tile_row.tolist(), tile_col.tolist())):
                dy_r, cols = dy[:, r * bs:(r + 1) * bs], slice(c * bs, (c + 1) * bs)
                if needs[3]:
                    torch.mm(dy_r.t(), x[:, cols], out=dV[t])
                if needs[0]:
                    dx[:, cols].addmm_(dy_r, V[t])
        else:
            col_index = _tile_index(tile_col, bs)
            dy_tiles = dy.t().contiguous().index_select(0, _tile_index(tile_row, bs)).view(tiles, bs, -1)
            if needs[3]:
                x_tiles = x.t().contiguous().index_select(0, col_index).view(tiles, bs, -1)
                torch.bmm(dy_tiles, x_tiles.transpose(1, 2), out=dV)
            if needs[0]:
                dx_t = dx.new_zeros(dx.shape[1], dx.shape[0])
                dx_t.index_add_(0, col_index, torch.bmm(V.transpose(1, 2), dy_tiles).view(tiles * bs, -1))
                dx += dx_t.t()
    return dx, dA, dB, dV.view(-1) if dV is not None else None, dy.sum(0) if needs[4] else None


# ---------------------------------------------------------------- host launchers


def _launch_lowrank_csr(low: torch.Tensor, right: tuple, gathered: torch.Tensor, ptr: torch.Tensor,
                        idx: torch.Tensor, perm: Optional[torch.Tensor], values: torch.Tensor,
                        bias: Optional[torch.Tensor], out: torch.Tensor, layout: str) -> None:
    """out = low @ R + gathered @ S.T (+ bias); ``right = (R, stride over rank, stride over N)``."""
    m, n = out.shape
    r_tensor, stride_rr, stride_rn = right
    rank = low.shape[1]
    meta = _kernel_dtypes(out.dtype)
    dummy = out  # pointer arguments the kernel does not read (no bias / no perm / no entries)
    has_entries = values.numel() > 0

    def launch(cfg: Config) -> None:
        kw = cfg.launch_kwargs()
        grid = (triton.cdiv(m, kw["BLOCK_M"]), triton.cdiv(n, kw["BLOCK_N"]))
        _lowrank_csr_kernel[grid](
            low, r_tensor, gathered, ptr, idx if has_entries else ptr, perm if perm is not None else ptr,
            values if has_entries else dummy, bias if bias is not None else dummy, out,
            m, n, rank,
            low.stride(0), low.stride(1), stride_rr, stride_rn, gathered.stride(0), gathered.stride(1),
            out.stride(0), out.stride(1),
            HAS_PERM=perm is not None, HAS_BIAS=bias is not None, **meta, **kw,
        )
        _LAUNCHES["sltrain_lowrank_csr"] += 1

    key = {"m": _next_pow2(m), "n": n, "k": gathered.shape[1], "rank": rank, "nnz": values.numel(),
           "dtype": out.dtype, "layout": layout, "bias": bias is not None}
    config = pick_config("sltrain_lowrank_csr", _lowrank_csr_kernel, key, _csr_configs(m, rank), launch)
    with _device_guard(out):
        launch(config)


def _launch_csr_sddmm(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                      out: torch.Tensor) -> None:
    m, n = dy.shape
    meta = _kernel_dtypes(dy.dtype)

    def launch(cfg: Config) -> None:
        kw = cfg.launch_kwargs()
        _csr_sddmm_kernel[(triton.cdiv(n, kw["BLOCK_N"]),)](
            dy, x, crow, col, out, m, n, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            ACC=meta["ACC"], **kw,
        )
        _LAUNCHES["sltrain_csr_sddmm"] += 1

    key = {"m": _next_pow2(m), "n": n, "k": x.shape[1], "nnz": out.numel(), "dtype": dy.dtype, "layout": "csr"}
    config = pick_config("sltrain_csr_sddmm", _csr_sddmm_kernel, key, _csr_sddmm_configs(m), launch)
    with _device_guard(out):
        launch(config)


def _launch_lowrank_tiles(low: torch.Tensor, right: tuple, gathered: torch.Tensor, ptr: torch.Tensor,
                          other: torch.Tensor, perm: Optional[torch.Tensor], values: torch.Tensor,
                          tile_strides: tuple[int, int], block_size: int, bias: Optional[torch.Tensor],
                          out: torch.Tensor, layout: str) -> None:
    """out = low @ R + the tile products of each BS-wide block-column of out (+ bias)."""
    m, n = out.shape
    r_tensor, stride_rr, stride_rn = right
    rank = low.shape[1]
    meta = _kernel_dtypes(out.dtype)
    block_s = max(_next_pow2(block_size), 2)
    block_n = max(16, block_s)  # tl.dot needs 16 columns: narrow tiles share a program, G of them
    group = block_n // block_s if block_size < 16 else 1
    n_blocks = triton.cdiv(n, block_size)
    has_tiles = values.numel() > 0

    def launch(cfg: Config) -> None:
        kw = cfg.launch_kwargs()
        grid = (triton.cdiv(m, kw["BLOCK_M"]), triton.cdiv(n_blocks, group))
        _lowrank_tiles_kernel[grid](
            low, r_tensor, gathered, ptr, other if has_tiles else ptr, perm if perm is not None else ptr,
            values if has_tiles else out, bias if bias is not None else out, out,
            m, n, n_blocks, rank,
            low.stride(0), low.stride(1), stride_rr, stride_rn, gathered.stride(0), gathered.stride(1),
            out.stride(0), out.stride(1), tile_strides[0], tile_strides[1],
            BS=block_size, G=group, HAS_PERM=perm is not None, HAS_BIAS=bias is not None, TILE_DOT=block_s >= 16,
            BLOCK_N=block_n, BLOCK_S=block_s, **meta, **kw,
        )
        _LAUNCHES["sltrain_lowrank_tiles"] += 1

    key = {"m": _next_pow2(m), "n": n, "k": gathered.shape[1], "rank": rank, "tiles": values.numel(),
           "block_size": block_size, "dtype": out.dtype, "layout": layout, "bias": bias is not None}
    config = pick_config("sltrain_lowrank_tiles", _lowrank_tiles_kernel, key,
                         _tiles_configs(m, rank, block_size), launch)
    with _device_guard(out):
        launch(config)


def _launch_tiles_sddmm(dy: torch.Tensor, x: torch.Tensor, tile_row: torch.Tensor, tile_col: torch.Tensor,
                        block_size: int, out: torch.Tensor) -> None:
    m = dy.shape[0]
    meta = _kernel_dtypes(dy.dtype)
    block_s = max(_next_pow2(block_size), 2)

    def launch(cfg: Config) -> None:
        kw = cfg.launch_kwargs()
        _tiles_sddmm_kernel[(tile_row.numel(),)](
            dy, x, tile_row, tile_col, out, m, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            BS=block_size, TILE_DOT=block_s >= 16, BLOCK_S=block_s, **meta, **kw,
        )
        _LAUNCHES["sltrain_tiles_sddmm"] += 1

    key = {"m": _next_pow2(m), "n": dy.shape[1], "k": x.shape[1], "tiles": tile_row.numel(),
           "block_size": block_size, "dtype": dy.dtype}
    config = pick_config("sltrain_tiles_sddmm", _tiles_sddmm_kernel, key, _tiles_sddmm_configs(m, block_size),
                         launch)
    with _device_guard(out):
        launch(config)


def _random_forward_triton(x, A, B, values, bias, crow, col, scale):
    hs = _scaled_h(x, A, scale)
    y = torch.empty((x.shape[0], B.shape[0]), device=x.device, dtype=x.dtype)
    if x.shape[0]:
        # x column-major: a gathered column is contiguous along the tokens (coalesced loads)
        x_cm = x.t().contiguous().t()
        _launch_lowrank_csr(hs, (B, B.stride(1), B.stride(0)), x_cm, crow, col, None, values, bias, y, "csr")
    return y, hs


def _random_backward_triton(dy, x, hs, A, B, values, crow, col, t_crow, t_row, t_perm, scale, needs):
    dh, dA, dB = _lowrank_grads(dy, x, hs, A, B, scale, needs)
    dx = dvalues = None
    dy_cm = dy.t().contiguous().t()
    if needs[0]:
        dx = torch.empty_like(x)
        if x.shape[0]:
            _launch_lowrank_csr(dh, (A, A.stride(0), A.stride(1)), dy_cm, t_crow, t_row, t_perm, values, None, dx,
                                "csr_t")
    if needs[3]:
        dvalues = torch.zeros_like(values)
        if values.numel() and x.shape[0]:
            _launch_csr_sddmm(dy_cm, x.t().contiguous().t(), crow, col, dvalues)
    return dx, dA, dB, dvalues, dy.sum(0) if needs[4] else None


def _block_forward_triton(x, A, B, values, bias, tile_col, tile_ptr, block_size, scale):
    hs = _scaled_h(x, A, scale)
    y = torch.empty((x.shape[0], B.shape[0]), device=x.device, dtype=x.dtype)
    if x.shape[0]:
        # forward reads tile entry (c, g) = S[row block + c, col block + g] as W[g, c]: transposed
        _launch_lowrank_tiles(hs, (B, B.stride(1), B.stride(0)), x, tile_ptr, tile_col, None, values,
                              (1, block_size), block_size, bias, y, "tiles")
    return y, hs


def _block_backward_triton(dy, x, hs, A, B, values, tile_row, tile_col, t_tile_ptr, t_tile_perm, block_size, scale,
                           needs):
    dh, dA, dB = _lowrank_grads(dy, x, hs, A, B, scale, needs)
    dx = dvalues = None
    if needs[0]:
        dx = torch.empty_like(x)
        if x.shape[0]:
            _launch_lowrank_tiles(dh, (A, A.stride(0), A.stride(1)), dy, t_tile_ptr, tile_row, t_tile_perm,
                                  values, (block_size, 1), block_size, None, dx, "tiles_t")
    if needs[3]:
        dvalues = torch.zeros_like(values)
        if values.numel() and x.shape[0]:
            _launch_tiles_sddmm(dy, x, tile_row, tile_col, block_size, dvalues)
    return dx, dA, dB, dvalues, dy.sum(0) if needs[4] else None


# ---------------------------------------------------------------- torch.library registration


def _autocast_off(t: torch.Tensor):
    """Op bodies run with autocast off: callers cast first, and inner matmuls must not re-cast."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def _grads_out(grads: tuple, dy, x, A, B, values) -> tuple:
    """The backward op's outputs: every gradient not asked for (None) becomes an empty tensor."""
    likes = (x, A, B, values, dy)
    return tuple(g if g is not None else like.new_empty(0) for g, like in zip(grads, likes))


def _bwd_fake(dy, x, A, B, values, needs) -> tuple:
    shapes = (x.shape, A.shape, B.shape, values.shape, (dy.shape[1],))
    return tuple(like.new_empty(shape if need else (0,))
                 for like, shape, need in zip((x, A, B, values, dy), shapes, needs))


@torch.library.custom_op("fxsparse::sltrain_random_fwd", mutates_args=())
def _random_fwd_op(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor,
                   bias: Optional[torch.Tensor], crow: torch.Tensor, col: torch.Tensor, t_crow: torch.Tensor,
                   t_row: torch.Tensor, t_perm: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) for 2-D x (T, in): y = h @ B.T * scale + x @ S.T (+ bias), h = x @ A.T; S random CSR."""
    with _autocast_off(x):
        if use_triton(x, A, B, values):
            return _random_forward_triton(x, A, B, values, bias, crow, col, scale)
        return _random_forward_torch(x, A, B, values, bias, crow, col, scale)


@_random_fwd_op.register_fake
def _(x, A, B, values, bias, crow, col, t_crow, t_row, t_perm, scale):
    return x.new_empty((x.shape[0], B.shape[0])), x.new_empty((x.shape[0], A.shape[0]))


@torch.library.custom_op("fxsparse::sltrain_random_bwd", mutates_args=())
def _random_bwd_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, t_crow: torch.Tensor,
                   t_row: torch.Tensor, t_perm: torch.Tensor, scale: float, needs_x: bool, needs_A: bool,
                   needs_B: bool, needs_values: bool, has_bias: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dvalues, dbias) of the random-support forward; unneeded ones are empty tensors."""
    needs = (needs_x, needs_A, needs_B, needs_values, has_bias)
    with _autocast_off(dy):
        if use_triton(dy, x, A, B, values):
            grads = _random_backward_triton(dy, x, h, A, B, values, crow, col, t_crow, t_row, t_perm, scale, needs)
        else:
            grads = _random_backward_torch(dy, x, h, A, B, values, crow, col, t_crow, t_row, t_perm, scale, needs)
    return _grads_out(grads, dy, x, A, B, values)


@_random_bwd_op.register_fake
def _(dy, x, h, A, B, values, crow, col, t_crow, t_row, t_perm, scale, needs_x, needs_A, needs_B, needs_values,
      has_bias):
    return _bwd_fake(dy, x, A, B, values, (needs_x, needs_A, needs_B, needs_values, has_bias))


@torch.library.custom_op("fxsparse::sltrain_block_fwd", mutates_args=())
def _block_fwd_op(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor,
                  bias: Optional[torch.Tensor], tile_row: torch.Tensor, tile_col: torch.Tensor,
                  tile_ptr: torch.Tensor, t_tile_ptr: torch.Tensor, t_tile_perm: torch.Tensor, block_size: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) for 2-D x (T, in): y = h @ B.T * scale + x @ S.T (+ bias), h = x @ A.T; S made of tiles."""
    with _autocast_off(x):
        if use_triton(x, A, B, values):
            return _block_forward_triton(x, A, B, values, bias, tile_col, tile_ptr, block_size, scale)
        return _block_forward_torch(x, A, B, values, bias, tile_row, tile_col, block_size, scale)


@_block_fwd_op.register_fake
def _(x, A, B, values, bias, tile_row, tile_col, tile_ptr, t_tile_ptr, t_tile_perm, block_size, scale):
    return x.new_empty((x.shape[0], B.shape[0])), x.new_empty((x.shape[0], A.shape[0]))


@torch.library.custom_op("fxsparse::sltrain_block_bwd", mutates_args=())
def _block_bwd_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  values: torch.Tensor, tile_row: torch.Tensor, tile_col: torch.Tensor, tile_ptr: torch.Tensor,
                  t_tile_ptr: torch.Tensor, t_tile_perm: torch.Tensor, block_size: int, scale: float,
                  needs_x: bool, needs_A: bool, needs_B: bool, needs_values: bool, has_bias: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dvalues, dbias) of the block-support forward; unneeded ones are empty tensors."""
    needs = (needs_x, needs_A, needs_B, needs_values, has_bias)
    with _autocast_off(dy):
        if use_triton(dy, x, A, B, values):
            grads = _block_backward_triton(dy, x, h, A, B, values, tile_row, tile_col, t_tile_ptr, t_tile_perm,
                                           block_size, scale, needs)
        else:
            grads = _block_backward_torch(dy, x, h, A, B, values, tile_row, tile_col, block_size, scale, needs)
    return _grads_out(grads, dy, x, A, B, values)


@_block_bwd_op.register_fake
def _(dy, x, h, A, B, values, tile_row, tile_col, tile_ptr, t_tile_ptr, t_tile_perm, block_size, scale, needs_x,
      needs_A, needs_B, needs_values, has_bias):
    return _bwd_fake(dy, x, A, B, values, (needs_x, needs_A, needs_B, needs_values, has_bias))


def _setup_context(ctx, inputs, output):
    x, A, B, values, bias, *support = inputs[:-1]
    if isinstance(support[-1], int):  # block: (tile_row, tile_col, tile_ptr, t_tile_ptr, t_tile_perm, bs)
        ctx.block_size = support.pop()
    _, h = output
    ctx.mark_non_differentiable(h)  # an internal output: backward reuses it, nobody differentiates it
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, h, A, B, values, *support)
    ctx.scale = inputs[-1]
    ctx.has_bias = bias is not None


def _backward_args(ctx) -> tuple:
    needs = ctx.needs_input_grad
    return (ctx.scale, needs[0], needs[1], needs[2], needs[3], ctx.has_bias)


def _random_backward(ctx, dy, _dh):
    x, h, A, B, values, crow, col, t_crow, t_row, t_perm = ctx.saved_tensors
    if dy is None:
        return (None,) * 11
    dx, dA, dB, dvalues, dbias = torch.ops.fxsparse.sltrain_random_bwd(
        dy, x, h, A, B, values, crow, col, t_crow, t_row, t_perm, *_backward_args(ctx))
    return _grads_in(ctx, dx, dA, dB, dvalues, dbias) + (None,) * 6


def _block_backward(ctx, dy, _dh):
    x, h, A, B, values, tile_row, tile_col, tile_ptr, t_tile_ptr, t_tile_perm = ctx.saved_tensors
    if dy is None:
        return (None,) * 12
    dx, dA, dB, dvalues, dbias = torch.ops.fxsparse.sltrain_block_bwd(
        dy, x, h, A, B, values, tile_row, tile_col, tile_ptr, t_tile_ptr, t_tile_perm, ctx.block_size,
        *_backward_args(ctx))
    return _grads_in(ctx, dx, dA, dB, dvalues, dbias) + (None,) * 7


def _grads_in(ctx, dx, dA, dB, dvalues, dbias) -> tuple:
    needs = ctx.needs_input_grad
    return tuple(g if need else None for g, need in zip((dx, dA, dB, dvalues, dbias), needs[:5]))


_random_fwd_op.register_autograd(_random_backward, setup_context=_setup_context)
_block_fwd_op.register_autograd(_block_backward, setup_context=_setup_context)


def sltrain_random(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor,
                   bias: Optional[torch.Tensor], crow: torch.Tensor, col: torch.Tensor, t_crow: torch.Tensor,
                   t_row: torch.Tensor, t_perm: torch.Tensor, scale: float) -> torch.Tensor:
    """``(x @ A.T) @ B.T * scale + x @ S.T (+ bias)`` with ``S`` in CSR (``crow``, ``col``, ``values``) and
    its transpose from :func:`transpose_csr`; ``x`` is (..., in). Differentiable in x, A, B, values, bias."""
    x2 = x.reshape(-1, x.shape[-1])
    y, _ = _random_fwd_op(x2, A, B, values, bias, crow, col, t_crow, t_row, t_perm, float(scale))
    return y.reshape(*x.shape[:-1], B.shape[0])


def sltrain_block(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, values: torch.Tensor,
                  bias: Optional[torch.Tensor], tile_row: torch.Tensor, tile_col: torch.Tensor,
                  tile_ptr: torch.Tensor, t_tile_ptr: torch.Tensor, t_tile_perm: torch.Tensor, block_size: int,
                  scale: float) -> torch.Tensor:
    """``(x @ A.T) @ B.T * scale + x @ S.T (+ bias)`` with ``S`` made of ``block_size`` tiles at
    (``tile_row``, ``tile_col``), sorted by block-row, pointers from :func:`tile_pointers`.

    >>> tr, tc = torch.tensor([0], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    >>> ptrs = tile_pointers(tr, tc, 2, 4, 2)
    >>> x, A, B = torch.ones(1, 4), torch.zeros(1, 4), torch.zeros(2, 1)
    >>> sltrain_block(x, A, B, torch.arange(4.0), None, tr, tc, *ptrs, 2, 1.0).tolist()
    [[1.0, 5.0]]
    """
    x2 = x.reshape(-1, x.shape[-1])
    y, _ = _block_fwd_op(x2, A, B, values, bias, tile_row, tile_col, tile_ptr, t_tile_ptr, t_tile_perm,
                         int(block_size), float(scale))
    return y.reshape(*x.shape[:-1], B.shape[0])
