"""S²FT kernels: split GEMMs over a frozen weight and a trainable block, the block's gradient, and serving.

An S²FT layer holds a frozen weight ``W`` (out, in) whose trainable rows (``dim=0``) or columns
(``dim=1``) are zeroed, and the trainable ``block`` that stands in for them, at sorted positions ``sel``
(``rest`` is the complement). Every GEMM here reads ``W`` only where it is not zeroed and the block only
where it belongs, so no work is spent on the zeroed rows/columns:

- :func:`s2ft_linear` (op ``fxsparse::s2ft_linear``): ``y = x @ W_eff.T + bias`` with ``W_eff`` the
  weight with the block written in. ``dim=1``: the K loop runs over the frozen column ranges of ``W``
  and then over the block; ``dim=0``: output columns in ``sel`` come from the block's rows, the rest
  from ``W``'s rows. It also returns the input slice ``x[..., sel]`` that the block gradient needs
  (``dim=1``), so backward keeps that slice and not ``x``;
- ``fxsparse::s2ft_backward``: ``dx = dy @ W_eff`` with the same two kernels, the roles of rows and
  columns swapped, and the block's weight gradient from the saved slice only (``dim=1``:
  ``dy.T @ x[:, sel]``; ``dim=0``: ``dy[:, sel].T @ x``), never a full-size weight gradient;
- :func:`s2ft_multi_adapter` (op ``fxsparse::s2ft_multi_adapter``): serving. One batch on one base
  weight, each token adding the delta (trained block minus base values) of its own adapter over that
  adapter's rows/columns; adapters with fewer rows/columns are padded and masked by their count.

A contiguous ``sel`` (the normal case after S²FT's co-permutation) is passed as ``start``/``stop``
and the kernels use ranges; a gathered ``sel`` goes through int32 lists of selected and complement
positions. CUDA tensors run the Triton kernels (``FXSPARSE_KERNELS`` may force ``torch`` or ``triton``),
CPU tensors the plain torch composition.

>>> import torch
>>> x, w, blk = torch.randn(3, 6), torch.randn(4, 6), torch.randn(4, 2)
>>> w[:, 2:4] = 0
>>> sel, rest = torch.tensor([2, 3], dtype=torch.int32), torch.tensor([0, 1, 4, 5], dtype=torch.int32)
>>> y = s2ft_linear(x, w, None, blk, sel, rest, dim=1, start=2, stop=4)
>>> torch.allclose(y, x @ w.index_copy(1, sel.long(), blk).T, atol=1e-6)
True
"""

import contextlib
from collections import Counter
from typing import Optional

import torch
from torch.nn import functional as F

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
    "s2ft_linear",
    "s2ft_multi_adapter",
    "s2ft_reference",
    "multi_adapter_reference",
    "index_lists",
    "launch_counts",
]

# ---------------------------------------------------------------- tuning constants
#
# No GPU was lent to the session that wrote these kernels, so nothing below is a measurement yet: the
# candidate tiles are those of Triton's matmul tutorial (measured there near cuBLAS on A100/H100 for
# large square GEMMs), and pick_config times every candidate on the device the first time a shape is
# seen, so a poor guess costs tuning time, not speed. Replace these comments with figures once a GPU
# run has produced them (benchmarks/bench_s2ft.py on CUDA).

# At or below this many tokens a GEMM is decode-like: small BLOCK_M tiles stop wasting most of each tile.
_SMALL_M = 64
# The block-gradient GEMM reduces over all tokens into a small (out x k) block: with 64 x 64 tiles a
# 576 x 64 block is 9 programs, too few for 132 SMs; splitting the token reduction fills the device.
# Split factors are bounded so each split still reduces over at least this many tokens.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLIT_M = 16
# CPU (torch path), measured with 1 thread on a 2-core AMD EPYC at SmolLM2 shapes, 256 tokens, fp32
# (process CPU time, median): splitting a GEMM's reduction around the block (skipping the zeroed columns)
# was never slower (576 -> 576 with 64 block columns: 1.98 -> 1.78 ms; 1536 -> 576 with 31: 4.94 -> 4.85 ms);
# writing output column slices with mm(out=...) won when the slices were 16-aligned (dx of 1536 x 576 with
# 80 block columns: 5.28 -> 5.00 ms) and lost otherwise (31 columns: 5.21 -> 5.54 ms).
_CPU_SPLIT_OUTPUT_ALIGN = 16
# The interpreter takes the first candidate: 32-wide tiles give tails on odd test shapes and few programs.
_INTERPRETER_CONFIG = Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=2)

_LAUNCHES: Counter = Counter()


def launch_counts() -> dict[str, int]:
    """How many times each Triton kernel of this family was launched in this process (tests check it)."""
    return dict(_LAUNCHES)


# ---------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _dot_acc(acc, a, b, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
        # DOT_F32: the interpreter's half-precision dot is wrong (measured errors ~1e10), its fp32 dot exact.
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _split_k_step(acc, a_ptr, s_ptr, offs_m, offs_n, a_cols, s_cols, mask_m, mask_n, mask_k,
                      stride_am, stride_ar, stride_sn, stride_sr,
                      DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
        """acc += a[offs_m, a_cols] @ s[offs_n, s_cols].T for one K tile."""
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + a_cols[None, :] * stride_ar,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        s = tl.load(s_ptr + s_cols[:, None] * stride_sr + offs_n[None, :] * stride_sn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        return _dot_acc(acc, a, s, DOT_F32, PRECISION)

    @triton.jit
    def _s2ft_split_k_kernel(
        # pointers
        a_ptr, w_ptr, blk_ptr, bias_ptr, out_ptr, sel_ptr, rest_ptr,
        # sizes: out is (M, N); the reduction runs over R positions, KB of them (sel) from the block
        M, N, R, KB, START, STOP,
        # strides: w[n, r], blk[n, j]
        stride_am, stride_ar, stride_wn, stride_wr, stride_bn, stride_bj, stride_om, stride_on,
        # meta-parameters
        CONTIG: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """out = a[:, rest] @ w[:, rest].T + a[:, sel] @ blk.T (+ bias): the reduction skips w's zeroed part.

        S²FT forward for dim=1 (a = x, w = W, blk = block) and dx for dim=0 (a = dy, w = W.T, blk = block.T).
        """
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = tl.swizzle2d(pid // num_n, pid % num_n, num_m, num_n, GROUP_M)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        lane = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        if CONTIG:
            # frozen positions are [0, START) and [STOP, R); the block is [START, STOP)
            for r0 in range(0, START, BLOCK_K):
                r = r0 + lane
                acc = _split_k_step(acc, a_ptr, w_ptr, offs_m, offs_n, r, r, mask_m, mask_n, r < START,
                                    stride_am, stride_ar, stride_wn, stride_wr, DOT_F32, PRECISION)
            for r0 in range(STOP, R, BLOCK_K):
                r = r0 + lane
                acc = _split_k_step(acc, a_ptr, w_ptr, offs_m, offs_n, r, r, mask_m, mask_n, r < R,
                                    stride_am, stride_ar, stride_wn, stride_wr, DOT_F32, PRECISION)
            for j0 in range(0, KB, BLOCK_K):
                j = j0 + lane
                acc = _split_k_step(acc, a_ptr, blk_ptr, offs_m, offs_n, START + j, j, mask_m, mask_n, j < KB,
                                    stride_am, stride_ar, stride_bn, stride_bj, DOT_F32, PRECISION)
        else:
            for t0 in range(0, R - KB, BLOCK_K):
                t = t0 + lane
                mask_t = t < R - KB
                r = tl.load(rest_ptr + t, mask=mask_t, other=0)
                acc = _split_k_step(acc, a_ptr, w_ptr, offs_m, offs_n, r, r, mask_m, mask_n, mask_t,
                                    stride_am, stride_ar, stride_wn, stride_wr, DOT_F32, PRECISION)
            for j0 in range(0, KB, BLOCK_K):
                j = j0 + lane
                mask_j = j < KB
                r = tl.load(sel_ptr + j, mask=mask_j, other=0)
                acc = _split_k_step(acc, a_ptr, blk_ptr, offs_m, offs_n, r, j, mask_m, mask_n, mask_j,
                                    stride_am, stride_ar, stride_bn, stride_bj, DOT_F32, PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _rows_gemm(acc, a_ptr, s_ptr, offs_m, rows, mask_m, mask_n, R,
                   stride_am, stride_ar, stride_sn, stride_sr,
                   BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
        """acc += a[offs_m, :] @ s[rows, :].T over the whole reduction R."""
        lane = tl.arange(0, BLOCK_K)
        for r0 in range(0, R, BLOCK_K):
            r = r0 + lane
            mask_r = r < R
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + r[None, :] * stride_ar,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            s = tl.load(s_ptr + r[:, None] * stride_sr + rows[None, :] * stride_sn,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = _dot_acc(acc, a, s, DOT_F32, PRECISION)
        return acc

    @triton.jit
    def _s2ft_split_n_kernel(
        # pointers
        a_ptr, w_ptr, blk_ptr, bias_ptr, out_ptr, sel_ptr, rest_ptr,
        # sizes: out is (M, N), KB of its columns (sel) come from the block; the reduction is R long
        M, N, R, KB, START, STOP,
        # strides: w[n, r] (output column n), blk[j, r] (block row j)
        stride_am, stride_ar, stride_wn, stride_wr, stride_bj, stride_br, stride_om, stride_on,
        # meta-parameters
        CONTIG: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """out[:, rest] = a @ w[rest].T and out[:, sel] = a @ blk.T (+ bias): no tile reads w's zeroed rows.

        S²FT forward for dim=0 (a = x, w = W, blk = block) and dx for dim=1 (a = dy, w = W.T, blk = block.T).
        Column tiles are numbered frozen ranges first, then the block.
        """
        if CONTIG:
            tiles_lo = tl.cdiv(START, BLOCK_N)
            tiles_frozen = tiles_lo + tl.cdiv(N - STOP, BLOCK_N)
        else:
            tiles_lo = tl.cdiv(N - KB, BLOCK_N)
            tiles_frozen = tiles_lo
        num_n = tiles_frozen + tl.cdiv(KB, BLOCK_N)
        num_m = tl.cdiv(M, BLOCK_M)
        pid = tl.program_id(0)
        pid_m, pid_n = tl.swizzle2d(pid // num_n, pid % num_n, num_m, num_n, GROUP_M)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < M
        lane = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        if pid_n < tiles_frozen:
            if CONTIG:
                if pid_n < tiles_lo:
                    cols = pid_n * BLOCK_N + lane
                    mask_n = cols < START
                else:
                    cols = STOP + (pid_n - tiles_lo) * BLOCK_N + lane
                    mask_n = cols < N
            else:
                t = pid_n * BLOCK_N + lane
                mask_n = t < N - KB
                cols = tl.load(rest_ptr + t, mask=mask_n, other=0)
            acc = _rows_gemm(acc, a_ptr, w_ptr, offs_m, cols, mask_m, mask_n, R,
                             stride_am, stride_ar, stride_wn, stride_wr, BLOCK_K, DOT_F32, PRECISION)
        else:
            j = (pid_n - tiles_frozen) * BLOCK_N + lane
            mask_n = j < KB
            if CONTIG:
                cols = START + j
            else:
                cols = tl.load(sel_ptr + j, mask=mask_n, other=0)
            acc = _rows_gemm(acc, a_ptr, blk_ptr, offs_m, j, mask_m, mask_n, R,
                             stride_am, stride_ar, stride_bj, stride_br, BLOCK_K, DOT_F32, PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(ACC)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _s2ft_grad_block_kernel(
        # pointers
        a_ptr, b_ptr, out_ptr, sel_ptr,
        # sizes: out[s] is (P, Q), split s reduces tokens [s * M_PER_SPLIT, (s + 1) * M_PER_SPLIT) of M
        M, P, Q, START, M_PER_SPLIT,
        # strides
        stride_am, stride_ap, stride_bm, stride_bq, stride_os, stride_op, stride_oq,
        # meta-parameters
        A_COLS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """out[s] = a[m, cols].T @ b[m, :] over split s of the tokens: the block's weight gradient.

        dim=1: a = dy, b = the saved slice x[:, sel] (A_COLS=0: all of dy's columns);
        dim=0: a = dy, b = x, cols = START + p (A_COLS=1) or sel[p] (A_COLS=2).
        """
        pid_p = tl.program_id(0)
        pid_q = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mask_p = offs_p < P
        mask_q = offs_q < Q
        if A_COLS == 0:
            cols = offs_p
        elif A_COLS == 1:
            cols = START + offs_p
        else:
            cols = tl.load(sel_ptr + offs_p, mask=mask_p, other=0)
        m_lo = pid_s * M_PER_SPLIT
        m_hi = tl.minimum(M, m_lo + M_PER_SPLIT)
        lane = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            m = (m0 + lane).to(tl.int64)
            mask_t = m < m_hi
            a = tl.load(a_ptr + m[None, :] * stride_am + cols[:, None] * stride_ap,
                        mask=mask_p[:, None] & mask_t[None, :], other=0.0)
            b = tl.load(b_ptr + m[:, None] * stride_bm + offs_q[None, :] * stride_bq,
                        mask=mask_t[:, None] & mask_q[None, :], other=0.0)
            acc = _dot_acc(acc, a, b, DOT_F32, PRECISION)
        tl.store(out_ptr + pid_s * stride_os + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])

    @triton.jit
    def _multi_adapter_cols_kernel(
        # pointers: y (M, N) is updated in place
        x_ptr, y_ptr, ids_ptr, d_ptr, idx_ptr, cnt_ptr,
        # sizes
        M, N, A,
        # strides: d[a, n, j], idx[a, j]
        stride_xm, stride_xk, stride_ym, stride_yn, stride_da, stride_dn, stride_dj, stride_ia, stride_ij,
        # meta-parameters
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y[m] += x[m, idx[a_m, :cnt]] @ d[a_m, :, :cnt].T with a_m = ids[m] (-1: base, nothing added).

        Only the adapters present in a token tile are visited; tokens of one sequence share an adapter,
        so a tile usually runs one small GEMM.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
        lane = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for a in range(0, A):
            mine = ids == a
            if tl.max(mine.to(tl.int32), axis=0) > 0:
                count = tl.load(cnt_ptr + a)
                for j0 in range(0, count, BLOCK_K):
                    j = j0 + lane
                    mask_j = j < count
                    cols = tl.load(idx_ptr + a * stride_ia + j * stride_ij, mask=mask_j, other=0)
                    xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk,
                                 mask=mine[:, None] & mask_j[None, :], other=0.0)
                    dt = tl.load(d_ptr + a * stride_da + j[:, None] * stride_dj + offs_n[None, :] * stride_dn,
                                 mask=mask_j[:, None] & mask_n[None, :], other=0.0)
                    acc = _dot_acc(acc, xt, dt, DOT_F32, PRECISION)
        if tl.max((ids >= 0).to(tl.int32), axis=0) > 0:
            y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
            mask = mask_m[:, None] & mask_n[None, :]
            y = tl.load(y_ptrs, mask=mask, other=0.0).to(ACC)
            tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _multi_adapter_rows_kernel(
        # pointers: y (M, N) is updated in place
        x_ptr, y_ptr, ids_ptr, d_ptr, idx_ptr, cnt_ptr,
        # sizes
        M, K, A,
        # strides: d[a, j, k], idx[a, j]
        stride_xm, stride_xk, stride_ym, stride_yn, stride_da, stride_dj, stride_dk, stride_ia, stride_ij,
        # meta-parameters
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y[m, idx[a_m, j]] += x[m] @ d[a_m, j].T for the j < cnt[a_m] of this program's tile of rows.

        Each (token, column) is written by one program: an adapter's indices are distinct and a token
        has one adapter.
        """
        pid_m = tl.program_id(0)
        pid_j = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
        lane = tl.arange(0, BLOCK_K)
        for a in range(0, A):
            mine = ids == a
            count = tl.load(cnt_ptr + a)
            if (tl.max(mine.to(tl.int32), axis=0) > 0) & (pid_j * BLOCK_N < count):
                mask_j = offs_j < count
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
                for k0 in range(0, K, BLOCK_K):
                    k = k0 + lane
                    mask_k = k < K
                    xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                                 mask=mine[:, None] & mask_k[None, :], other=0.0)
                    dt = tl.load(d_ptr + a * stride_da + k[:, None] * stride_dk + offs_j[None, :] * stride_dj,
                                 mask=mask_k[:, None] & mask_j[None, :], other=0.0)
                    acc = _dot_acc(acc, xt, dt, DOT_F32, PRECISION)
                cols = tl.load(idx_ptr + a * stride_ia + offs_j * stride_ij, mask=mask_j, other=0)
                y_ptrs = y_ptr + offs_m[:, None] * stride_ym + cols[None, :] * stride_yn
                mask = mine[:, None] & mask_j[None, :]
                y = tl.load(y_ptrs, mask=mask, other=0.0).to(ACC)
                tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- candidate configs


def _gemm_configs(m: int, n: int, k: int) -> list[Config]:
    """Split-GEMM candidates (BLOCK_M x BLOCK_N output tiles, BLOCK_K reduction) for m tokens."""
    if interpreting():
        return [_INTERPRETER_CONFIG]
    if m <= _SMALL_M:
        shapes = [(16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (32, 64, 64, 4, 4), (16, 64, 128, 4, 3),
                  (32, 128, 64, 4, 3)]
    else:
        shapes = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3),
                  (128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (64, 64, 32, 4, 4), (32, 64, 32, 4, 5)]
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _grad_block_configs(m: int, p: int, q: int) -> list[Config]:
    """Block-gradient candidates: (BLOCK_P, BLOCK_Q) output tiles, BLOCK_M tokens a step, SPLIT_M splits."""
    if interpreting():
        return [Config({"BLOCK_P": 32, "BLOCK_Q": 32, "BLOCK_M": 32, "SPLIT_M": 1})]
    max_split = max(1, min(_MAX_SPLIT_M, m // _MIN_TOKENS_PER_SPLIT))
    splits = sorted({1, min(4, max_split), max_split})
    configs = []
    for split in splits:
        for bp, bq, bm, w, s in [(64, 64, 64, 4, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
                                 (32, 64, 64, 4, 4)]:
            configs.append(Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_M": bm, "SPLIT_M": split}, w, s))
    return configs


def _multi_adapter_configs(m: int) -> list[Config]:
    if interpreting():
        return [Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32})]
    if m <= _SMALL_M:
        shapes = [(16, 64, 64, 4, 3), (16, 128, 32, 4, 3), (32, 64, 32, 4, 3)]
    else:
        shapes = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (32, 64, 64, 4, 3)]
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


# ---------------------------------------------------------------- plain-torch references


def s2ft_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], block: torch.Tensor,
                   index: torch.Tensor, dim: int) -> torch.Tensor:
    """The layer as one dense GEMM: the block written into the weight (differentiable in x and block).

    >>> w = torch.zeros(3, 4); blk = torch.ones(3, 1)
    >>> s2ft_reference(torch.ones(2, 4), w, None, blk, torch.tensor([2]), dim=1).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    dense = weight.index_copy(dim, index.long(), block)
    return F.linear(x, dense, bias)


def multi_adapter_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            token_adapter: torch.Tensor, deltas: list[list[tuple[int, torch.Tensor, torch.Tensor]]]
                            ) -> torch.Tensor:
    """Each token through its adapter's merged weight; ``deltas[a]`` lists adapter ``a``'s
    ``(dim, index, delta)`` (rows for dim=0, columns for dim=1) added onto the base weight.

    >>> w = torch.zeros(2, 3)
    >>> y = multi_adapter_reference(torch.ones(2, 3), w, None, torch.tensor([0, -1]),
    ...                             [[(1, torch.tensor([1]), torch.ones(2, 1))]])
    >>> y.tolist()
    [[1.0, 1.0], [0.0, 0.0]]
    """
    x2 = x.reshape(-1, x.shape[-1])
    rows = []
    for t in range(x2.shape[0]):
        a = int(token_adapter[t])
        merged = weight
        for dim, index, delta in deltas[a] if a >= 0 else []:
            merged = merged.index_add(dim, index.long(), delta.to(weight.dtype))
        rows.append(F.linear(x2[t], merged, bias))
    return torch.stack(rows).reshape(*x.shape[:-1], weight.shape[0])


def index_lists(index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 lists of selected and complement positions of a sorted ``index`` in ``range(size)``.

    >>> [t.tolist() for t in index_lists(torch.tensor([1, 3]), 5)]
    [[1, 3], [0, 2, 4]]
    """
    keep = torch.ones(size, dtype=torch.bool, device=index.device)
    keep[index.long()] = False
    return index.to(torch.int32), keep.nonzero().flatten().to(torch.int32)


# ---------------------------------------------------------------- host launchers


def _launch_split(kind: str, a: torch.Tensor, weight_view: tuple, block_view: tuple, bias: Optional[torch.Tensor],
                  out: torch.Tensor, sel: torch.Tensor, rest: torch.Tensor, r: int, kb: int, start: int, stop: int,
                  config: Optional[Config] = None) -> None:
    """Launch one split GEMM. ``kind`` is ``"k"`` (reduction split) or ``"n"`` (output-column split).

    ``weight_view``/``block_view`` are ``(tensor, stride over out columns, stride over the reduction)``
    for ``"k"``; for ``"n"`` the block view strides are ``(stride over block rows, over the reduction)``.
    """
    m, n = out.shape
    w, swn, swr = weight_view
    blk, sb0, sb1 = block_view
    contig = start >= 0
    kernel = _s2ft_split_k_kernel if kind == "k" else _s2ft_split_n_kernel
    meta = _kernel_dtypes(out.dtype)
    bias_arg = bias if bias is not None else out

    def launch(cfg: Config) -> None:
        kw = cfg.launch_kwargs()
        bm, bn = kw["BLOCK_M"], kw["BLOCK_N"]
        if kind == "k":
            tiles_n = triton.cdiv(n, bn)
        elif contig:
            tiles_n = triton.cdiv(start, bn) + triton.cdiv(n - stop, bn) + triton.cdiv(kb, bn)
        else:
            tiles_n = triton.cdiv(n - kb, bn) + triton.cdiv(kb, bn)
        grid = (triton.cdiv(m, bm) * tiles_n,)
        kernel[grid](
            a, w, blk, bias_arg, out, sel, rest,
            m, n, r, kb, max(start, 0), max(stop, 0),
            a.stride(0), a.stride(1), swn, swr, sb0, sb1, out.stride(0), out.stride(1),
            CONTIG=contig, HAS_BIAS=bias is not None, **meta, **kw,
        )
        _LAUNCHES[f"s2ft_split_{kind}"] += 1

    if config is None:
        key = {"m": _next_pow2(m), "n": n, "r": r, "kb": kb, "dtype": out.dtype, "layout": "span" if contig else
               "gathered", "bias": bias is not None, "a_major": a.stride(1) == 1, "w_major": swr == 1}
        config = pick_config(f"s2ft_split_{kind}", kernel, key, _gemm_configs(m, n, r), launch)
    with _device_guard(out):
        launch(config)


def _launch_grad_block(a: torch.Tensor, b: torch.Tensor, sel: torch.Tensor, p: int, a_cols: int, start: int,
                       out_dtype: torch.dtype, config: Optional[Config] = None) -> torch.Tensor:
    """(P, Q) = a[:, cols].T @ b reduced over the tokens (see ``_s2ft_grad_block_kernel``)."""
    m, q = b.shape
    meta = _kernel_dtypes(b.dtype)

    def launch(cfg: Config, keep: Optional[list] = None) -> None:
        kw = cfg.launch_kwargs()
        split = int(kw.pop("SPLIT_M"))
        per_split = triton.cdiv(triton.cdiv(m, split), kw["BLOCK_M"]) * kw["BLOCK_M"]
        split = max(1, triton.cdiv(m, per_split))
        # one split writes the block directly; several write float partial sums added afterwards
        partial_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
        buf = torch.empty((split, p, q), device=b.device, dtype=out_dtype if split == 1 else partial_dtype)
        grid = (triton.cdiv(p, kw["BLOCK_P"]), triton.cdiv(q, kw["BLOCK_Q"]), split)
        _s2ft_grad_block_kernel[grid](
            a, b, buf, sel, m, p, q, max(start, 0), per_split,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), buf.stride(0), buf.stride(1), buf.stride(2),
            A_COLS=a_cols, **meta, **kw,
        )
        _LAUNCHES["s2ft_grad_block"] += 1
        if keep is not None:
            keep.append(buf)

    if config is None:
        key = {"m": _next_pow2(m), "p": p, "q": q, "dtype": b.dtype, "a_cols": a_cols,
               "a_major": a.stride(1) == 1, "b_major": b.stride(1) == 1}
        config = pick_config("s2ft_grad_block", _s2ft_grad_block_kernel, key, _grad_block_configs(m, p, q), launch)
    kept: list = []
    with _device_guard(b):
        launch(config, kept)
    buf = kept[0]
    return buf[0] if buf.shape[0] == 1 else buf.sum(0).to(out_dtype)


def _launch_multi(kind: str, x2: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, delta: torch.Tensor,
                  index: torch.Tensor, count: torch.Tensor, kmax: int, config: Optional[Config] = None) -> None:
    """Add per-token adapter deltas into ``y`` in place: ``kind`` ``"cols"`` (dim=1) or ``"rows"`` (dim=0)."""
    m, k = x2.shape
    n = y.shape[1]
    kernel = _multi_adapter_cols_kernel if kind == "cols" else _multi_adapter_rows_kernel
    meta = _kernel_dtypes(x2.dtype)
    n_adapters = delta.shape[0]

    def launch(cfg: Config, target: torch.Tensor = y) -> None:
        kw = cfg.launch_kwargs()
        width = n if kind == "cols" else kmax
        grid = (triton.cdiv(m, kw["BLOCK_M"]), triton.cdiv(width, kw["BLOCK_N"]))
        kernel[grid](
            x2, target, ids, delta, index, count,
            m, n if kind == "cols" else k, n_adapters,
            x2.stride(0), x2.stride(1), target.stride(0), target.stride(1),
            delta.stride(0), delta.stride(1), delta.stride(2), index.stride(0), index.stride(1),
            **meta, **kw,
        )
        _LAUNCHES[f"s2ft_multi_adapter_{kind}"] += 1

    if config is None:
        scratch: list = []

        def tune_run(cfg: Config) -> None:  # y is updated in place: tuning launches go to a scratch copy
            if not scratch:
                scratch.append(y.clone())
            launch(cfg, scratch[0])

        key = {"m": _next_pow2(m), "n": n, "k": k, "kmax": kmax, "adapters": n_adapters, "dtype": x2.dtype}
        config = pick_config(f"s2ft_multi_adapter_{kind}", kernel, key, _multi_adapter_configs(m), tune_run)
    with _device_guard(y):
        launch(config)


# ---------------------------------------------------------------- torch.library registration


def _autocast_off(t: torch.Tensor):
    """Op bodies run with autocast off: callers cast first, and inner matmuls must not re-cast."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def _check_same_dtype(name: str, *tensors: Optional[torch.Tensor]) -> None:
    dtype = tensors[0].dtype
    if any(t is not None and t.dtype != dtype for t in tensors):
        dtypes = {t.dtype for t in tensors if t is not None}
        raise RuntimeError(f"{name}: expected one floating dtype for activations, weight, bias and block, got "
                           f"{sorted(str(d) for d in dtypes)}")


def _take_cols(t: torch.Tensor, sel: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return t[:, start:stop] if start >= 0 else t.index_select(1, sel)


def _copy_cols(t: torch.Tensor, sel: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """A fresh contiguous ``t[:, sel]`` (never a view of ``t``: an op output must not alias an input)."""
    if start >= 0:
        return t[:, start:stop].clone(memory_format=torch.contiguous_format)
    return t.index_select(1, sel)


def _add_cols(out: torch.Tensor, part: torch.Tensor, sel: torch.Tensor, start: int, stop: int) -> None:
    if start >= 0:
        out[:, start:stop] += part
    else:
        out.index_add_(1, sel, part)


def _split_reduction(start: int) -> bool:
    """CPU: split a GEMM's reduction around a contiguous block (BLAS reads column slices in place)."""
    return start >= 0


def _split_output(start: int, stop: int, size: int) -> bool:
    """CPU: write output column slices with ``mm(out=...)``: only when every slice width is a multiple of
    ``_CPU_SPLIT_OUTPUT_ALIGN`` (odd widths measured slower than one GEMM over the zero-filled weight)."""
    return start >= 0 and all(w % _CPU_SPLIT_OUTPUT_ALIGN == 0 for w in (start, stop - start, size - stop))


def _frozen_ranges(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    return [(lo, hi) for lo, hi in ((0, start), (stop, size)) if hi > lo]


def _torch_forward(x2, weight, bias, block, sel, dim, start, stop):
    """CPU forward: (y, x[:, sel] for dim=1 else None)."""
    if dim == 1:
        x_sel = _copy_cols(x2, sel, start, stop)
        if _split_reduction(start):
            y = torch.addmm(bias, x_sel, block.t()) if bias is not None else x_sel @ block.t()
            for lo, hi in _frozen_ranges(start, stop, weight.shape[1]):
                y.addmm_(x2[:, lo:hi], weight[:, lo:hi].t())  # a column slice is a BLAS operand with lda=K
        else:
            y = F.linear(x2, weight, bias)
            y.addmm_(x_sel, block.t())
        return y, x_sel
    if _split_output(start, stop, weight.shape[0]):
        y = torch.empty((x2.shape[0], weight.shape[0]), dtype=x2.dtype, device=x2.device)
        for lo, hi in _frozen_ranges(start, stop, weight.shape[0]):
            torch.mm(x2, weight[lo:hi].t(), out=y[:, lo:hi])
        torch.mm(x2, block.t(), out=y[:, start:stop])
        if bias is not None:
            y += bias
        return y, None
    y = F.linear(x2, weight, bias)
    _add_cols(y, x2 @ block.t(), sel, start, stop)
    return y, None


def _torch_grad_input(g2, weight, block, sel, dim, start, stop):
    """CPU dx = dy @ W_eff."""
    if dim == 1:
        if _split_output(start, stop, weight.shape[1]):
            dx = torch.empty((g2.shape[0], weight.shape[1]), dtype=g2.dtype, device=g2.device)
            for lo, hi in _frozen_ranges(start, stop, weight.shape[1]):
                torch.mm(g2, weight[:, lo:hi], out=dx[:, lo:hi])
            torch.mm(g2, block, out=dx[:, start:stop])
            return dx
        dx = g2 @ weight
        _add_cols(dx, g2 @ block, sel, start, stop)
        return dx
    if _split_reduction(start):
        dx = g2[:, start:stop] @ block
        for lo, hi in _frozen_ranges(start, stop, weight.shape[0]):
            dx.addmm_(g2[:, lo:hi], weight[lo:hi])
        return dx
    dx = g2 @ weight
    dx.addmm_(_take_cols(g2, sel, start, stop), block)
    return dx


@torch.library.custom_op("fxsparse::s2ft_linear", mutates_args=())
def _s2ft_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], block: torch.Tensor,
                    sel: torch.Tensor, rest: torch.Tensor, dim: int, start: int, stop: int,
                    save_slice: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_same_dtype("fxsparse::s2ft_linear", x, weight, bias, block)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out_features, in_features = weight.shape
    with _autocast_off(x):
        if use_triton(x, weight, block):
            y = torch.empty((x2.shape[0], out_features), device=x.device, dtype=x.dtype)
            if x2.shape[0]:
                # dim=1: the reduction splits into W's frozen columns and the block's; dim=0: y's columns in
                # sel come from the block's rows
                _launch_split("k" if dim == 1 else "n", x2, (weight, weight.stride(0), weight.stride(1)),
                              (block, block.stride(0), block.stride(1)), bias, y, sel, rest, in_features,
                              sel.numel(), start, stop)
            x_sel = _copy_cols(x2, sel, start, stop) if dim == 1 and save_slice else None
        else:
            y, x_sel = _torch_forward(x2, weight, bias, block, sel, dim, start, stop)
            x_sel = x_sel if save_slice else None
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], out_features)
        x_sel = x_sel.reshape(*x.shape[:-1], x_sel.shape[-1]) if x_sel is not None else None
    return y, (x_sel if x_sel is not None else x.new_empty(0))


@_s2ft_linear_op.register_fake
def _(x, weight, bias, block, sel, rest, dim, start, stop, save_slice):
    _check_same_dtype("fxsparse::s2ft_linear", x, weight, bias, block)
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    if dim == 1 and save_slice:
        return y, x.new_empty(*x.shape[:-1], sel.shape[0])
    return y, x.new_empty(0)


def _grad_input(g2: torch.Tensor, weight: torch.Tensor, block: torch.Tensor, sel: torch.Tensor, rest: torch.Tensor,
                dim: int, start: int, stop: int, triton_path: bool) -> torch.Tensor:
    """dx = dy @ W_eff: W's frozen part and the block, never the zeroed rows/columns (2-D dy)."""
    if not triton_path:
        return _torch_grad_input(g2, weight, block, sel, dim, start, stop)
    out_features, in_features = weight.shape
    # dx has the structure of a forward with the roles of rows and columns swapped, so the forward kernels
    # serve, block folded in, in one pass; cuBLAS over the zero-filled W would need a second GEMM for the
    # block and a read-modify-write of dx.
    dx = torch.empty((g2.shape[0], in_features), device=g2.device, dtype=g2.dtype)
    if g2.shape[0]:
        # dim=1: dx's columns in sel come from the block's columns; dim=0: the reduction over dy's columns
        # splits into W's frozen rows and the block's rows
        _launch_split("n" if dim == 1 else "k", g2, (weight, weight.stride(1), weight.stride(0)),
                      (block, block.stride(1), block.stride(0)), None, dx, sel, rest, out_features, sel.numel(),
                      start, stop)
    return dx


def _grad_block(g2: torch.Tensor, s2: torch.Tensor, sel: torch.Tensor, dim: int, start: int, stop: int,
                triton_path: bool) -> torch.Tensor:
    """The block's gradient from the saved tensor only: dim=1 ``dy.T @ x[:, sel]``, dim=0 ``dy[:, sel].T @ x``."""
    if triton_path:
        if g2.shape[0] == 0:
            return g2.new_zeros((g2.shape[1], s2.shape[1]) if dim == 1 else (sel.numel(), s2.shape[1]))
        if dim == 1:
            return _launch_grad_block(g2, s2, sel, g2.shape[1], 0, start, g2.dtype)
        return _launch_grad_block(g2, s2, sel, sel.numel(), 1 if start >= 0 else 2, start, g2.dtype)
    if dim == 1:
        return g2.t() @ s2
    return _take_cols(g2, sel, start, stop).t() @ s2


@torch.library.custom_op("fxsparse::s2ft_backward", mutates_args=())
def _s2ft_backward_op(grad_y: torch.Tensor, saved: Optional[torch.Tensor], weight: torch.Tensor,
                      block: torch.Tensor, sel: torch.Tensor, rest: torch.Tensor, dim: int, start: int, stop: int,
                      need_input: bool, need_block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dblock) of ``fxsparse::s2ft_linear``; an empty tensor for one not needed. ``saved`` is what
    forward kept for the block: ``x[..., sel]`` (dim=1) or ``x`` (dim=0)."""
    g2 = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, grad_y.shape[-1])
    empty = grad_y.new_empty(0)
    with _autocast_off(grad_y):
        triton_path = use_triton(grad_y, weight, block)
        dx = _grad_input(g2, weight, block, sel, rest, dim, start, stop, triton_path) if need_input else empty
        dblock = empty
        if need_block:
            s2 = saved if saved.dim() == 2 else saved.reshape(-1, saved.shape[-1])
            dblock = _grad_block(g2, s2, sel, dim, start, stop, triton_path)
    if need_input and grad_y.dim() != 2:
        dx = dx.reshape(*grad_y.shape[:-1], weight.shape[1])
    return dx, dblock


@_s2ft_backward_op.register_fake
def _(grad_y, saved, weight, block, sel, rest, dim, start, stop, need_input, need_block):
    dx = grad_y.new_empty(*grad_y.shape[:-1], weight.shape[1]) if need_input else grad_y.new_empty(0)
    dblock = grad_y.new_empty(block.shape) if need_block else grad_y.new_empty(0)
    return dx, dblock


def _s2ft_setup_context(ctx, inputs, output):
    x, weight, bias, block, sel, rest, dim, start, stop, save_slice = inputs
    _y, x_sel = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(x_sel)
    saved = None
    if ctx.needs_input_grad[3]:
        if dim == 1 and not save_slice:
            raise RuntimeError("fxsparse::s2ft_linear: the block needs a gradient but save_slice=False")
        saved = x_sel if dim == 1 else x
    ctx.save_for_backward(saved, weight, block, sel, rest)
    ctx.layout = (dim, start, stop)


def _s2ft_backward(ctx, grad_y, _grad_x_sel):
    saved, weight, block, sel, rest = ctx.saved_tensors
    dim, start, stop = ctx.layout
    grad_x = grad_bias = grad_block = None
    if grad_y is None:
        return None, None, None, None, None, None, None, None, None, None
    need_input, need_block = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if need_input or need_block:
        with _below_autograd():
            grad_x, grad_block = torch.ops.fxsparse.s2ft_backward.default(
                grad_y, saved, weight, block, sel, rest, dim, start, stop, need_input, need_block)
        grad_x = grad_x if need_input else None
        grad_block = grad_block if need_block else None
    if ctx.needs_input_grad[2]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, None, grad_bias, grad_block, None, None, None, None, None, None


torch.library.register_autograd("fxsparse::s2ft_linear", _s2ft_backward, setup_context=_s2ft_setup_context)


def _below_autograd():
    """Eager calls skip the ops' Python autograd wrapper (about 150 us per layer step, 4% of a 256-token
    o_proj step on CPU); torch.compile traces the registered formula. Both run the same ops and functions."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


class _S2FTEager(torch.autograd.Function):
    """Eager autograd for ``fxsparse::s2ft_linear``: the op below autograd, then its setup_context/backward."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = torch.ops.fxsparse.s2ft_linear.default(*inputs)
        _s2ft_setup_context(ctx, inputs, output)
        # The op's output may be a reshaped view of its 2-D result; autograd forbids in-place updates of a view
        # returned by a multi-output Function (``y += residual`` in Falcon's block). The result owns its storage,
        # so hand it out as a plain alias (detach: same storage, no copy, not a view for autograd).
        return tuple(t.detach() if t._is_view() else t for t in output)

    @staticmethod
    def backward(ctx, grad_y, grad_x_sel):
        return _s2ft_backward(ctx, grad_y, grad_x_sel)


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def s2ft_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], block: torch.Tensor,
                sel: torch.Tensor, rest: torch.Tensor, dim: int, start: int = -1, stop: int = -1) -> torch.Tensor:
    """``y = x @ W_eff.T + bias`` through ``fxsparse::s2ft_linear`` (``weight`` gets no gradient).

    ``sel``/``rest``: int32 sorted selected and complement positions along ``dim`` (see :func:`index_lists`);
    ``start``/``stop``: the span when ``sel`` is contiguous, else -1. Under autocast everything runs in the
    autocast dtype (the block's gradient comes back in the block's own dtype, as for ``nn.Linear``).
    """
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight, block = x.to(dtype), weight.to(dtype), block.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif block.dtype != weight.dtype:
        block = block.to(weight.dtype)
    save_slice = dim == 1 and block.requires_grad and torch.is_grad_enabled()
    args = (x, weight, bias, block, sel, rest, dim, start, stop, save_slice)
    if torch.compiler.is_compiling():
        return torch.ops.fxsparse.s2ft_linear(*args)[0]
    if not torch.is_grad_enabled():
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.fxsparse.s2ft_linear.default(*args)[0]
    return _S2FTEager.apply(*args)[0]


# ---------------------------------------------------------------- serving: many adapters, one base weight


@torch.library.custom_op("fxsparse::s2ft_multi_adapter", mutates_args=())
def _s2ft_multi_adapter_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           token_adapter: torch.Tensor, col_delta: torch.Tensor, col_index: torch.Tensor,
                           col_count: torch.Tensor, row_delta: torch.Tensor, row_index: torch.Tensor,
                           row_count: torch.Tensor) -> torch.Tensor:
    _check_same_dtype("fxsparse::s2ft_multi_adapter", x, weight, bias, col_delta, row_delta)
    x2 = x.reshape(-1, x.shape[-1])
    out_features = weight.shape[0]
    if token_adapter.numel() != x2.shape[0]:
        raise ValueError(f"fxsparse::s2ft_multi_adapter: {token_adapter.numel()} adapter ids for "
                         f"{x2.shape[0]} tokens")
    with _autocast_off(x):
        # The base GEMM is a plain dense GEMM, which cuBLAS already runs at peak: only the deltas need a kernel.
        y = F.linear(x2, weight, bias)
        kc, kr = col_delta.shape[-1], row_delta.shape[1]
        if x2.shape[0] == 0 or (kc == 0 and kr == 0):
            pass
        elif use_triton(x, weight):
            ids = token_adapter.to(torch.int32)
            if kc:
                _launch_multi("cols", x2, y, ids, col_delta, col_index, col_count, kc)
            if kr:
                _launch_multi("rows", x2, y, ids, row_delta, row_index, row_count, kr)
        else:
            _torch_multi_adapter(x2, y, token_adapter, col_delta, col_index, col_count, row_delta, row_index,
                                 row_count)
    return y.reshape(*x.shape[:-1], out_features)


def _torch_multi_adapter(x2, y, token_adapter, col_delta, col_index, col_count, row_delta, row_index, row_count):
    col_counts, row_counts = col_count.tolist(), row_count.tolist()
    for a, present in enumerate((torch.bincount(token_adapter[token_adapter >= 0].long(),
                                                minlength=len(col_counts)) > 0).tolist()):
        kc, kr = col_counts[a], row_counts[a]
        if not present or (kc == 0 and kr == 0):
            continue
        rows = (token_adapter == a).nonzero().flatten()
        xa = x2.index_select(0, rows)
        if kc:
            part = xa.index_select(1, col_index[a, :kc].long()) @ col_delta[a, :, :kc].t()
            y.index_add_(0, rows, part)
        if kr:
            part = xa @ row_delta[a, :kr].t()
            y.index_put_((rows[:, None], row_index[a, :kr].long()[None, :]), part, accumulate=True)


@_s2ft_multi_adapter_op.register_fake
def _(x, weight, bias, token_adapter, col_delta, col_index, col_count, row_delta, row_index, row_count):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _multi_adapter_setup_context(ctx, inputs, output):
    x, weight, bias, token_adapter, col_delta, col_index, col_count, row_delta, row_index, row_count = inputs
    if ctx.needs_input_grad[4] or ctx.needs_input_grad[7]:
        raise RuntimeError("fxsparse::s2ft_multi_adapter serves frozen adapters: the deltas must not require grad")
    ctx.has_bias = bias is not None
    saved_x = x if ctx.needs_input_grad[1] else None  # the base weight's gradient is dy.T @ x, deltas aside
    ctx.save_for_backward(saved_x, weight, token_adapter, col_delta, col_index, col_count, row_delta, row_index,
                          row_count)


def _multi_adapter_backward(ctx, grad_y):
    x, weight, token_adapter, col_delta, col_index, col_count, row_delta, row_index, row_count = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        # dx = dy @ W + the transposed deltas: column deltas become row deltas and back, so the op serves.
        grad_x = torch.ops.fxsparse.s2ft_multi_adapter(
            grad_y, weight.t(), None, token_adapter, row_delta.transpose(1, 2), row_index, row_count,
            col_delta.transpose(1, 2), col_index, col_count)
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    if ctx.needs_input_grad[1]:
        grad_weight = g2.t() @ x.reshape(-1, x.shape[-1])
    if ctx.needs_input_grad[2]:
        grad_bias = g2.sum(0)
    return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


torch.library.register_autograd("fxsparse::s2ft_multi_adapter", _multi_adapter_backward,
                                setup_context=_multi_adapter_setup_context)


def s2ft_multi_adapter(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       token_adapter: torch.Tensor, col_delta: torch.Tensor, col_index: torch.Tensor,
                       col_count: torch.Tensor, row_delta: torch.Tensor, row_index: torch.Tensor,
                       row_count: torch.Tensor) -> torch.Tensor:
    """``y = x @ weight.T + bias`` plus, for each token, its adapter's delta (``token_adapter`` -1: none).

    Per adapter ``a`` (padded to the largest count, masked by ``*_count[a]``): column deltas
    ``col_delta[a]`` (out, kc) over input columns ``col_index[a]`` (dim=1 adapters) and row deltas
    ``row_delta[a]`` (kr, in) over output rows ``row_index[a]`` (dim=0 adapters). A delta is the trained
    block minus the base values it replaces. Under autocast all floating inputs run in the autocast dtype.

    >>> w = torch.zeros(2, 3)
    >>> cd, ci, cc = torch.ones(1, 2, 1), torch.tensor([[2]], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    >>> rd, ri, rc = torch.zeros(1, 0, 3), torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    >>> x = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
    >>> s2ft_multi_adapter(x, w, None, torch.tensor([0, -1]), cd, ci, cc, rd, ri, rc).tolist()
    [[5.0, 5.0], [0.0, 0.0]]
    """
    dtype = _autocast_dtype(x)
    if dtype is not None:
        x, weight, col_delta, row_delta = x.to(dtype), weight.to(dtype), col_delta.to(dtype), row_delta.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return torch.ops.fxsparse.s2ft_multi_adapter(x, weight, bias, token_adapter, col_delta, col_index, col_count,
                                                 row_delta, row_index, row_count)
