"""GPU kernel benchmark in one command: check every fxsparse kernel against a float64 reference, then time it
against dense cuBLAS, the plain-torch composition and torch's own block-sparse Triton matmul at LLaMA-7B shapes.

For every case (one problem at one shape, one provider) the script

1. builds the provider on random data (never zeros: B of the low-rank factors, LoRA's B and every input are
   random), runs it once and compares each output (y, dx and every parameter gradient) with a float64
   reference by ``||out - ref|| / ||ref||`` against a tolerance per dtype (bf16 1e-2, fp16 5e-3, fp32 1e-3);
2. times it (CUDA events around each repeat, warm-up first, an L2 flush before every repeat, the median
   reported with the inter-quartile spread);
3. counts the FLOPs and the fewest bytes the problem must move (each phase reads its inputs once and writes
   its outputs once) and reports TFLOP/s, GB/s and the ratio to the roofline floor
   ``max(flops / peak_flops, bytes / peak_bandwidth)``. Peaks come from a small table of datasheet values by
   GPU name (H200, H100 SXM / PCIe / NVL, A100 40/80 GB); ``--peak NAME`` or ``--peak-tflops/--peak-gbs``
   override it and ``--peaks measured`` uses the ceilings this run measures (a device-to-device copy and an
   8192^3 bf16 GEMM, always measured and recorded). The output says which peaks were used.

Cases (bf16; LLaMA-7B projections 4096x4096 and 4096x11008 / 11008x4096, tokens 4096-16384):

- ``sltrain-layer``: forward + backward of :class:`~fxsparse.layers.sltrain.SLTrainLinear` (rank 256/512,
  sparsity 0.03, random CSR and 32x32 block supports) with its Triton kernels (``fxsparse-*``), the same layer
  on its plain-torch composition (``torch-*``, ``FXSPARSE_KERNELS=torch``), the same block layer with torch's
  BSR Triton ops for the sparse part (``bsr-triton``: ``bsr_dense_mm`` forward and dx, ``sampled_addmm`` for
  dS; their tuned parameters exist only for A100) and the dense bf16 linear with weight gradient (``dense``);
- ``s2ft-layer``: forward + backward of :class:`~fxsparse.layers.s2ft.S2FTLinear` (ratios 2-5 %, columns of
  o / down, rows of up, contiguous and gathered) against full fine-tuning (dense linear with weight gradient)
  and PEFT LoRA r=16 (a hand-written LoRA linear when peft is missing);
- ``*-kernel``: each kernel alone (the ops ``codegen/sltrain.py`` and ``codegen/s2ft.py`` expose), against
  the torch composition of the same op and the dense cuBLAS product of the same shape.

Targets (pass/fail, measured value beside the target, from the rows of the run): SLTrain block layer at
4096x11008, rank 512 >= 1.3x faster than the dense linear; S2FT layer step >= 1.5x full fine-tuning and
>= 1.15x LoRA (with the FLOP-count limit beside: about 6N vs 4N FLOPs caps the first near 1.5x); each fxsparse
kernel within 1.5x of its roofline floor.

Appends one row per case to ``benchmarks/results/gpu_kernels.csv`` (device, date, git revision, peaks) and
regenerates ``gpu_kernels.md`` from the whole CSV::

    python benchmarks/gpu_kernels.py                       # on a GPU: about 6 minutes on an H200
    python benchmarks/gpu_kernels.py --toy --out /tmp/gk   # tiny shapes, everything runs (CPU: interpreter)
    bash benchmarks/gpu_run.sh                             # on the lent GPU machine: install, tests, this

``--toy`` runs every case at tiny shapes; without CUDA the kernels run in the Triton interpreter
(``TRITON_INTERPRET=1``, ``FXSPARSE_KERNELS=triton`` for the fxsparse providers) and are timed with
``time.perf_counter``: those rows are marked ``interpreter`` and their times mean nothing. The toy mode writes
files only where ``--out`` says. ``--budget-s`` skips (and records as skipped) the cases that would start
after that many seconds, so a run on a lent machine always ends with its files written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _env import device_name, git_rev, require_clean_tree
from torch import nn

__all__ = ["main", "write_markdown", "PEAKS", "match_peaks"]

RESULTS = Path(__file__).resolve().parent / "results"
CSV_NAME = "gpu_kernels.csv"
MD_NAME = "gpu_kernels.md"

# Relative-error tolerance per dtype (||out - ref|| / ||ref|| against float64): bf16 operands land between 1e-3
# and 1e-2 (one rounding of each bf16 intermediate), fp32 under 1e-3 even with tf32 dots.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-3, torch.float64: 1e-9}

# Dense bf16 tensor-core rate (no structured sparsity), TFLOP/s, and HBM bandwidth, GB/s: vendor datasheets.
# Measured here (device README, 2026-11): an H200's bf16 GEMM reaches about 790 TFLOP/s on random data and a
# device-to-device copy about 4300 GB/s, so "x floor" against these is at least 1.25 (compute) / 1.1 (memory).
PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 4800.0),
    "H100 SXM": (989.0, 3350.0),
    "H100 NVL": (835.0, 3900.0),
    "H100 PCIe": (756.0, 2000.0),
    "A100 SXM 80GB": (312.0, 2039.0),
    "A100 PCIe 80GB": (312.0, 1935.0),
    "A100 40GB": (312.0, 1555.0),
}
# The toy mode's nominal CPU peaks: they only keep the arithmetic of the report running.
TOY_PEAKS = (1.0, 50.0)

TARGETS = {"sltrain_vs_dense": 1.3, "s2ft_vs_full": 1.5, "s2ft_vs_lora": 1.15, "kernel_x_floor": 1.5}

FIELDS = [
    "date", "device", "git_rev", "torch", "triton", "mode", "timing", "peaks", "peak_tflops", "peak_gbs",
    "measured_tflops", "measured_gbs", "group", "problem", "shape", "provider", "role", "impl", "dtype",
    "tokens", "in_features", "out_features", "rank", "sparsity", "block_size", "k", "check", "rel_err", "tol",
    "worst_output", "median_ms", "min_ms", "spread_pct", "repeats", "gflop", "mbytes", "tflops_per_s",
    "gb_per_s", "floor_ms", "x_floor", "bound", "x_floor_measured", "kernel_calls", "note",
]


# ---------------------------------------------------------------- peaks


@dataclass(frozen=True)
class Peaks:
    """The compute and bandwidth ceilings the roofline floor is taken against, and where they came from."""

    tflops: float
    gbs: float
    source: str


def match_peaks(name: str) -> str | None:
    """The :data:`PEAKS` entry for a GPU name as ``torch.cuda.get_device_name`` gives it, or None.

    >>> match_peaks("NVIDIA H200"), match_peaks("NVIDIA H100 80GB HBM3"), match_peaks("NVIDIA A100-SXM4-40GB")
    ('H200', 'H100 SXM', 'A100 40GB')
    """
    upper = name.upper()
    if "H200" in upper:
        return "H200"
    if "H100" in upper:
        if "NVL" in upper:
            return "H100 NVL"
        return "H100 PCIe" if "PCIE" in upper else "H100 SXM"
    if "A100" in upper:
        if "40GB" in upper.replace(" ", ""):
            return "A100 40GB"
        return "A100 PCIe 80GB" if "PCIE" in upper else "A100 SXM 80GB"
    return None


def choose_peaks(args, device: str, measured: tuple[float, float] | None, toy_cpu: bool) -> Peaks:
    if args.peak_tflops and args.peak_gbs:
        return Peaks(args.peak_tflops, args.peak_gbs, "override (--peak-tflops/--peak-gbs)")
    if args.peaks == "measured" and measured is not None:
        return Peaks(measured[0], measured[1], "measured on this run (bf16 GEMM 8192^3, device copy)")
    if toy_cpu:
        return Peaks(*TOY_PEAKS, "toy CPU nominal (not meaningful)")
    key = args.peak or match_peaks(device)
    if key is not None:
        if key not in PEAKS:
            raise SystemExit(f"--peak {key!r} is not one of {sorted(PEAKS)}")
        tflops, gbs = PEAKS[key]
        return Peaks(args.peak_tflops or tflops, args.peak_gbs or gbs, f"{key} datasheet")
    if measured is not None:
        return Peaks(measured[0], measured[1], f"measured on this run ({device!r} is not in the table)")
    return Peaks(*TOY_PEAKS, "nominal (unknown device)")


def measure_ceilings(device: torch.device) -> tuple[float, float]:
    """(bf16 GEMM TFLOP/s on random 8192^3 operands, device-copy GB/s counting read + write) on this GPU."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm_ms = _cuda_median_ms(lambda: a @ b, repeats=10, flush=None)
    src = torch.randn(1 << 28, device=device, dtype=torch.bfloat16)  # 512 MiB, several times the L2
    dst = torch.empty_like(src)
    copy_ms = _cuda_median_ms(lambda: dst.copy_(src), repeats=10, flush=None)
    moved = 2 * src.numel() * src.element_size()
    return 2 * n**3 / gemm_ms / 1e9, moved / copy_ms / 1e6


# ---------------------------------------------------------------- timing


def _cuda_median_ms(fn: Callable[[], object], repeats: int, flush: torch.Tensor | None) -> float:
    times = _cuda_times_ms(fn, repeats, flush, warmup=3)
    return statistics.median(times)


def _cuda_times_ms(fn: Callable[[], object], repeats: int, flush: torch.Tensor | None, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    stops = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, stop in zip(starts, stops):
        if flush is not None:
            flush.zero_()  # evict the operands from L2 so each repeat reads them from HBM
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(stop) for start, stop in zip(starts, stops)]


@dataclass
class Timer:
    """CUDA events (warm-up for ``warmup_ms``, repeats to fill ``target_ms``) or perf_counter (toy / CPU)."""

    cuda: bool
    warmup_ms: float = 50.0
    target_ms: float = 250.0
    min_repeats: int = 5
    max_repeats: int = 40
    flush: torch.Tensor | None = None

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        if not self.cuda:  # the checked run before this one was the warm-up
            times = []
            for _ in range(self.min_repeats):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return times
        torch.cuda.synchronize()
        estimate = statistics.median(_cuda_times_ms(fn, 3, self.flush, warmup=1))
        warmup = max(1, math.ceil(self.warmup_ms / max(estimate, 1e-3)))
        repeats = int(min(self.max_repeats, max(self.min_repeats, self.target_ms / max(estimate, 1e-3))))
        return _cuda_times_ms(fn, repeats, self.flush, warmup=min(warmup, 50))


# ---------------------------------------------------------------- cases


@dataclass
class Entry:
    """One provider of one case, built on the device: what to time, what to check, what it costs."""

    provider: str
    role: str  # subject (fxsparse), torch (its plain-torch composition), dense (cuBLAS baseline), peer
    impl: str
    step: Callable[[], object]
    outputs: Callable[[], dict[str, torch.Tensor]]  # after one step
    reference: Callable[[], dict[str, torch.Tensor]]  # float64
    flops: float
    nbytes: float
    kernels: str | None = None  # FXSPARSE_KERNELS while it runs; None: not an fxsparse op
    note: str = ""


@dataclass
class Case:
    """One problem at one shape; ``build`` returns its providers (lazily: one case lives on the GPU at a time)."""

    group: str
    problem: str
    dims: dict
    build: Callable[[Context], list[Entry]]
    providers: list[str] = field(default_factory=list)  # names, to record skipped rows without building

    @property
    def shape(self) -> str:
        d = self.dims
        parts = [f"T{d['tokens']}", f"K{d['in_features']}", f"N{d['out_features']}"]
        if d.get("rank"):
            parts.append(f"r{d['rank']}")
        if d.get("sparsity"):
            parts.append(f"d{d['sparsity']}")
        if d.get("block_size"):
            parts.append(f"bs{d['block_size']}")
        if d.get("k"):
            parts.append(f"k{d['k']} dim{d['dim']}" if "dim" in d else f"k{d['k']}")
        if d.get("gathered"):
            parts.append("gathered")
        if d.get("adapters"):
            parts.append(f"{d['adapters']} adapters")
        return " ".join(parts)


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    toy: bool
    seed: int = 0

    def generator(self, salt: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed * 1000 + salt)

    def randn(self, *shape: int, salt: int, scale: float = 1.0) -> torch.Tensor:
        """Seeded normal values drawn on the CPU (same numbers on every device), moved to the device."""
        t = torch.randn(*shape, generator=self.generator(salt)) * scale
        return t.to(device=self.device, dtype=self.dtype)


def _e(ctx: Context) -> int:
    return torch.tensor([], dtype=ctx.dtype).element_size()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return float("inf")
    denom = ref.norm().item()
    err = (out - ref).norm().item()
    return err / denom if denom > 0 else err


def _grad_step(module_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor,
               params: list[torch.Tensor], out: dict) -> Callable[[], None]:
    """A forward + backward of ``module_fn`` at ``x`` with output gradient ``dy``; keeps y for the check."""

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        y = module_fn(x)
        y.backward(dy)
        out["y"] = y

    return step


@contextlib.contextmanager
def _kernels_mode(mode: str | None) -> Iterator[None]:
    """``FXSPARSE_KERNELS=mode`` for the duration (it is read at every op call)."""
    if mode is None:
        yield
        return
    old = os.environ.get("FXSPARSE_KERNELS")
    os.environ["FXSPARSE_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["FXSPARSE_KERNELS"]
        else:
            os.environ["FXSPARSE_KERNELS"] = old


# ---- dense linear (full fine-tuning; the cuBLAS baseline)


def _dense_linear_entry(ctx: Context, x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor,
                        provider: str) -> Entry:
    tokens, in_f = x.shape
    out_f = weight.shape[0]
    w = weight.detach().clone().requires_grad_(True)
    held: dict = {}
    step = _grad_step(lambda t: t @ w.t(), x, dy, [w], held)

    def outputs():
        return {"y": held["y"], "dx": x.grad, "dW": w.grad}

    def reference():
        x64 = x.detach().double().requires_grad_(True)
        w64 = w.detach().double().requires_grad_(True)
        y64 = x64 @ w64.t()
        y64.backward(dy.double())
        return {"y": y64, "dx": x64.grad, "dW": w64.grad}

    e = _e(ctx)
    tk, nk, tn = tokens * in_f, out_f * in_f, tokens * out_f
    nbytes = e * ((tk + nk + tn) + (tn + nk + tk) + (tn + tk + nk))  # y = x W^T; dx = dy W; dW = dy^T x
    return Entry(provider, "dense", "cuBLAS (torch matmul)", step, outputs, reference,
                 6.0 * tokens * in_f * out_f, nbytes)


# ---- SLTrain layer


def _sltrain_layer(ctx: Context, d: dict, support: str):
    from fxsparse.layers.sltrain import SLTrainLinear

    in_f, out_f, rank = d["in_features"], d["out_features"], d["rank"]
    layer = SLTrainLinear(in_f, out_f, rank, sparsity=d["sparsity"], alpha=32.0, support=support,
                          block_size=d.get("block_size") or 32, bias=False, seed=ctx.seed)
    layer = layer.to(device=ctx.device, dtype=ctx.dtype)
    # Random B (SLTrain initialises it to zero) and values scaled so that the low-rank and the sparse parts each
    # give outputs of unit size: an error in either part moves the checked output.
    with torch.no_grad():
        layer.A.copy_(ctx.randn(rank, in_f, salt=11, scale=in_f**-0.5))
        layer.B.copy_(ctx.randn(out_f, rank, salt=12, scale=rank**-0.5 / layer.scale))
        per_row = max(layer.nnz / out_f, 1.0)
        layer.values.copy_(ctx.randn(layer.nnz, salt=13, scale=per_row**-0.5))
    return layer


def _sltrain_reference(layer, x: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Autograd of the dense float64 weight ``B @ A * scale + S`` (S scattered from the support)."""
    A = layer.A.detach().double().requires_grad_(True)
    B = layer.B.detach().double().requires_grad_(True)
    values = layer.values.detach().double().requires_grad_(True)
    rows, cols = layer.support_indices()
    flat = rows.to(x.device).long() * layer.in_features + cols.to(x.device).long()
    weight = ((B @ A) * layer.scale).reshape(-1).index_add(0, flat, values)
    x64 = x.detach().double().requires_grad_(True)
    y = x64 @ weight.view(layer.out_features, layer.in_features).t()
    y.backward(dy.double())
    return {"y": y, "dx": x64.grad, "dA": A.grad, "dB": B.grad, "dvalues": values.grad}


def _sltrain_cost(ctx: Context, d: dict, nnz: int, support: str) -> tuple[float, float]:
    """FLOPs and fewest bytes of SLTrain forward + backward (support indices int32)."""
    t, k, n, r = d["tokens"], d["in_features"], d["out_features"], d["rank"]
    e = _e(ctx)
    flops = 6.0 * t * (r * (k + n) + nnz)
    if support == "block":
        bs = d["block_size"]
        index_bytes = 8 * nnz / (bs * bs)
    else:
        index_bytes = 4 * nnz + 4 * (n + 1)
    # forward reads x, A, B, values, support; writes y and h = x A^T (saved for backward)
    fwd = e * (t * k + r * k + n * r + nnz + t * n + t * r) + index_bytes
    # backward reads dy, x, h, A, B, values, support (and its transpose); writes dx, dA, dB, dvalues
    bwd = e * (t * n + t * k + t * r + r * k + n * r + nnz + t * k + r * k + n * r + nnz) + 2 * index_bytes
    return flops, fwd + bwd


def _bsr_ops(toy_cpu: bool):
    """(bsr @ dense, sampled (a @ b) on a BSR pattern) from torch's BSR Triton ops; a dense CPU stand-in in
    the toy mode without CUDA (torch's ops check for a CUDA device, and its list grids trip the interpreter)."""
    if not toy_cpu:
        from torch.sparse import _triton_ops

        if _triton_ops.bsr_dense_mm is None:
            raise RuntimeError("torch.sparse._triton_ops has no Triton kernels here (torch saw no Triton GPU)")
        return _triton_ops.bsr_dense_mm, (lambda pattern, a, b: _triton_ops.sampled_addmm(pattern, a, b,
                                                                                            beta=0.0))

    def mm(bsr, dense):
        return bsr.to_dense() @ dense

    def sddmm(pattern, a, b):
        bs = pattern.values().shape[-1]
        crow, col = pattern.crow_indices(), pattern.col_indices()
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())
        blocks = (a @ b).unflatten(0, (-1, bs)).unflatten(2, (-1, bs))[rows, :, col]
        return torch.sparse_bsr_tensor(crow, col, blocks, pattern.shape)

    return mm, sddmm


def _bsr_forward(x, A, B, values, idx, block_size, scale, ops):
    """(y, hs): ``hs = x A^T scale`` (what the fxsparse op saves) and ``y = hs B^T + x S^T`` with ``S @ x^T``
    through torch's BSR matmul."""
    crow, col = idx[0], idx[1]
    S = torch.sparse_bsr_tensor(crow, col, values.view(-1, block_size, block_size), (B.shape[0], A.shape[1]))
    hs = (x @ A.t()).mul_(scale)
    return torch.addmm(ops[0](S, x.t()).t(), hs, B.t()), hs


def _bsr_dx(dy, A, B, values, idx, block_size, scale, ops):
    """``dx = (dy B scale) A + dy S`` with ``S^T @ dy^T`` through torch's BSR matmul."""
    t_crow, t_col, t_perm = idx[2], idx[3], idx[4]
    # S^T as BSR: tiles reordered by (column, row) and each transposed; rebuilt every step (the values train)
    tiles = values.view(-1, block_size, block_size)[t_perm].transpose(1, 2)
    S_t = torch.sparse_bsr_tensor(t_crow, t_col, tiles, (A.shape[1], B.shape[0]))
    dh = (dy @ B).mul_(scale)
    return torch.addmm(ops[0](S_t, dy.t()).t(), dh, A), dh


def _bsr_dvalues(dy, x, values, idx, block_size, ops):
    """``dS`` on the support: torch's BSR sampled_addmm of ``dy^T @ x``."""
    crow, col = idx[0], idx[1]
    pattern = torch.sparse_bsr_tensor(crow, col, values.view(-1, block_size, block_size),
                                      (dy.shape[1], x.shape[1]))
    return ops[1](pattern, dy.t(), x).values().reshape(-1)


class _BsrSLTrainFn(torch.autograd.Function):
    """SLTrain block layer with torch's BSR Triton ops for the sparse part; low-rank part through cuBLAS."""

    @staticmethod
    def forward(ctx, x, A, B, values, crow, col, t_crow, t_col, t_perm, block_size, scale, ops):
        idx = (crow, col, t_crow, t_col, t_perm)
        y, h = _bsr_forward(x, A, B, values, idx, block_size, scale, ops)
        ctx.save_for_backward(x, h, A, B, values, *idx)
        ctx.block_size, ctx.scale, ctx.ops = block_size, scale, ops
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, A, B, values, *idx = ctx.saved_tensors
        dx, dh = _bsr_dx(dy, A, B, values, idx, ctx.block_size, ctx.scale, ctx.ops)
        dB = dy.t() @ h  # h is already scaled
        dA = dh.t() @ x
        dvalues = _bsr_dvalues(dy, x, values, idx, ctx.block_size, ctx.ops)
        return dx, dA, dB, dvalues, None, None, None, None, None, None, None, None


def _bsr_support(layer) -> tuple[torch.Tensor, ...]:
    """(crow, col, t_crow, t_col, t_perm) of the layer's tile list as BSR and transposed BSR (int64 for torch)."""
    bs = layer.block_size
    tile_row = layer.tile_row.long()
    tile_col = layer.tile_col.long()
    n_row, n_col = layer.out_features // bs, layer.in_features // bs
    order = torch.argsort(tile_row * n_col + tile_col)
    if not torch.equal(order, torch.arange(order.numel(), device=order.device)):
        raise RuntimeError("the layer's tiles are not in row-major order; the BSR peer assumes they are")
    crow = torch.zeros(n_row + 1, dtype=torch.long, device=tile_row.device)
    crow[1:] = torch.bincount(tile_row, minlength=n_row).cumsum(0)
    t_perm = torch.argsort(tile_col * n_row + tile_row)
    t_crow = torch.zeros(n_col + 1, dtype=torch.long, device=tile_row.device)
    t_crow[1:] = torch.bincount(tile_col, minlength=n_col).cumsum(0)
    return crow, tile_col, t_crow, tile_row[t_perm], t_perm


def build_sltrain_layer(ctx: Context, d: dict) -> list[Entry]:
    """Providers of one SLTrain forward + backward shape: fxsparse and torch per support, BSR peer, dense."""
    t, in_f, out_f = d["tokens"], d["in_features"], d["out_features"]
    x = ctx.randn(t, in_f, salt=1).requires_grad_(True)
    dy = ctx.randn(t, out_f, salt=2)
    entries = [_dense_linear_entry(ctx, x, dy, ctx.randn(out_f, in_f, salt=3, scale=in_f**-0.5), "dense")]
    for support in ("block", "random"):
        layer = _sltrain_layer(ctx, d, support)
        params = [layer.A, layer.B, layer.values]
        flops, nbytes = _sltrain_cost(ctx, d, layer.nnz, support)

        def outputs(layer=layer, held=None):
            return {"y": held["y"], "dx": x.grad, "dA": layer.A.grad, "dB": layer.B.grad,
                    "dvalues": layer.values.grad}

        def reference(layer=layer):
            return _sltrain_reference(layer, x, dy)

        for kernels, provider, role in (("triton", f"fxsparse-{support}", "subject"),
                                        ("torch", f"torch-{support}", "torch")):
            held: dict = {}
            impl = "fxsparse Triton kernels" if kernels == "triton" else "plain torch (" + (
                "cuSPARSE CSR" if support == "random" else "gathered batched GEMMs") + ")"
            entries.append(Entry(provider, role, impl, _grad_step(layer, x, dy, params, held),
                                 lambda o=outputs, h=held: o(held=h), reference, flops, nbytes, kernels))
        if support == "block":
            ops = _bsr_ops(toy_cpu=ctx.toy and ctx.device.type == "cpu")
            crow, col, t_crow, t_col, t_perm = _bsr_support(layer)
            bs = layer.block_size

            def bsr_forward(inp, layer=layer, ops=ops, idx=(crow, col, t_crow, t_col, t_perm), bs=bs):
                return _BsrSLTrainFn.apply(inp, layer.A, layer.B, layer.values, *idx, bs, layer.scale, ops)

            held = {}
            impl = ("torch.sparse BSR Triton ops (bsr_dense_mm, sampled_addmm)" if ctx.device.type == "cuda"
                    else "dense stand-in for torch's BSR Triton ops (they need CUDA)")
            entries.append(Entry("bsr-triton", "peer", impl, _grad_step(bsr_forward, x, dy, params, held),
                                 lambda o=outputs, h=held: o(held=h), reference, flops, nbytes))
    return entries


# ---- S2FT layer


class _HandLoRA(nn.Module):
    """LoRA linear (frozen base + B A * alpha / r) for when peft is not installed."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def _lora_module(base: nn.Linear, rank: int, alpha: float) -> tuple[nn.Module, nn.Linear, nn.Linear, float, str]:
    """(module, lora_A, lora_B, scaling, impl): PEFT's LoRA on a frozen linear, else the hand-written one."""
    base.weight.requires_grad_(False)
    try:
        import peft
    except ImportError:
        module = _HandLoRA(base, rank, alpha)
        return module, module.lora_A, module.lora_B, module.scaling, "hand-written LoRA (peft missing)"

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"])
    module = peft.inject_adapter_in_model(config, Holder())
    lora = module.proj
    scaling = lora.scaling["default"]
    return module, lora.lora_A["default"], lora.lora_B["default"], scaling, f"PEFT {peft.__version__} LoRA"


def build_s2ft_layer(ctx: Context, d: dict) -> list[Entry]:
    """Providers of one S2FT forward + backward shape: fxsparse, torch, full fine-tuning, LoRA r=16."""
    from fxsparse.layers.s2ft import S2FTLinear

    t, in_f, out_f, k, dim = d["tokens"], d["in_features"], d["out_features"], d["k"], d["dim"]
    e = _e(ctx)
    x = ctx.randn(t, in_f, salt=1).requires_grad_(True)
    dy = ctx.randn(t, out_f, salt=2)
    weight = ctx.randn(out_f, in_f, salt=3, scale=in_f**-0.5)
    entries = [_dense_linear_entry(ctx, x, dy, weight, "full")]

    size = in_f if dim == 1 else out_f
    if d.get("gathered"):
        index = torch.randperm(size, generator=ctx.generator(4))[:k].sort().values.tolist()
    else:
        start = (size // 3) // k * k if k < size else 0  # a unit-aligned block away from the edges
        index = list(range(start, start + k))
    base = nn.Linear(in_f, out_f, bias=False, device=ctx.device, dtype=ctx.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
    layer = S2FTLinear.from_linear(base, dim, index)
    tk, nk, tn = t * in_f, out_f * in_f, t * out_f
    if dim == 1:  # columns: forward saves x[:, index]; backward reads it for dblock = dy^T x_sel
        flops = 4.0 * t * in_f * out_f + 2.0 * t * out_f * k
        nbytes = e * ((tk + nk + tn + t * k) + (tn + nk + tk) + (tn + t * k + out_f * k))
    else:  # rows: dblock = dy[:, index]^T x reads x whole
        flops = 4.0 * t * in_f * out_f + 2.0 * t * k * in_f
        nbytes = e * ((tk + nk + tn) + (tn + nk + tk) + (t * k + tk + k * in_f))

    def s2ft_reference():
        block = layer.block.detach().double().requires_grad_(True)
        full = layer.weight.detach().double().index_copy(dim, layer.index, block)
        x64 = x.detach().double().requires_grad_(True)
        y = x64 @ full.t()
        y.backward(dy.double())
        return {"y": y, "dx": x64.grad, "dblock": block.grad}

    for kernels, provider, role in (("triton", "fxsparse-s2ft", "subject"), ("torch", "torch-s2ft", "torch")):
        held: dict = {}
        impl = "fxsparse Triton kernels" if kernels == "triton" else "plain torch (dense GEMM + block GEMM)"
        entries.append(Entry(provider, role, impl, _grad_step(layer, x, dy, [layer.block], held),
                             lambda h=held: {"y": h["y"], "dx": x.grad, "dblock": layer.block.grad},
                             s2ft_reference, flops, nbytes, kernels))

    rank = 16
    lora_base = nn.Linear(in_f, out_f, bias=False, device=ctx.device, dtype=ctx.dtype)
    with torch.no_grad():
        lora_base.weight.copy_(weight)
    module, lora_A, lora_B, scaling, impl = _lora_module(lora_base, rank, 2.0 * rank)
    with torch.no_grad():
        lora_A.weight.copy_(ctx.randn(rank, in_f, salt=5, scale=in_f**-0.5))
        lora_B.weight.copy_(ctx.randn(out_f, rank, salt=6, scale=rank**-0.5))  # never zeros (peft's init)

    def lora_reference():
        a = lora_A.weight.detach().double().requires_grad_(True)
        b = lora_B.weight.detach().double().requires_grad_(True)
        x64 = x.detach().double().requires_grad_(True)
        y = x64 @ weight.double().t() + (x64 @ a.t()) @ b.t() * scaling
        y.backward(dy.double())
        return {"y": y, "dx": x64.grad, "dA": a.grad, "dB": b.grad}

    held = {}
    lora_flops = 4.0 * t * in_f * out_f + 6.0 * t * rank * (in_f + out_f)
    lora_bytes = e * ((tk + nk + rank * in_f + out_f * rank + tn + t * rank)
                      + (tn + nk + out_f * rank + t * rank + rank * in_f + tk + tk + rank * in_f + out_f * rank))
    entries.append(Entry("lora", "peer", impl, _grad_step(module, x, dy, [lora_A.weight, lora_B.weight], held),
                         lambda h=held: {"y": h["y"], "dx": x.grad, "dA": lora_A.weight.grad,
                                         "dB": lora_B.weight.grad},
                         lora_reference, lora_flops, lora_bytes))
    return entries


# ---- the case list


def case_list(toy: bool) -> list[Case]:
    """Every case in the order it runs: the ones the targets read first (a run cut by --budget-s keeps them)."""
    if toy:
        sl_shapes = [dict(tokens=32, in_features=64, out_features=96, rank=8, sparsity=0.1, block_size=16)]
        s2_shapes = [dict(tokens=32, in_features=64, out_features=48, k=8, dim=1),
                     dict(tokens=32, in_features=48, out_features=80, k=8, dim=0),
                     dict(tokens=32, in_features=96, out_features=48, k=6, dim=1, gathered=True)]
    else:
        sl_shapes = [dict(tokens=t, in_features=4096, out_features=11008, rank=512, sparsity=0.03, block_size=32)
                     for t in (8192, 16384, 4096)]
        sl_shapes.append(dict(tokens=8192, in_features=4096, out_features=4096, rank=256, sparsity=0.03,
                              block_size=32))
        # Counts are multiples of 16 where the ratio allows (Triton specialises integer arguments on divisibility
        # by 16, so each awkward count is one more compilation of every candidate); the last case keeps one.
        s2_shapes = [
            dict(tokens=8192, in_features=4096, out_features=4096, k=128, dim=1),  # o_proj, 1 of 32 heads (3 %)
            dict(tokens=8192, in_features=11008, out_features=4096, k=224, dim=1),  # down_proj, 2 % channels
            dict(tokens=8192, in_features=4096, out_features=11008, k=544, dim=0),  # up_proj, 5 % channels
            dict(tokens=8192, in_features=11008, out_features=4096, k=224, dim=1, gathered=True),
            dict(tokens=16384, in_features=4096, out_features=4096, k=205, dim=1),  # o_proj, 5 % columns
        ]
    sl_providers = ["dense", "fxsparse-block", "torch-block", "bsr-triton", "fxsparse-random", "torch-random"]
    s2_providers = ["full", "fxsparse-s2ft", "torch-s2ft", "lora"]
    sl = [Case("sltrain-layer", "fwd+bwd", d, build_sltrain_layer, sl_providers) for d in sl_shapes]
    s2 = [Case("s2ft-layer", "fwd+bwd", d, build_s2ft_layer, s2_providers) for d in s2_shapes]
    # the target shapes (SLTrain 4096x11008 r512 T8192; S2FT o/down/up at T8192), then every kernel, then the rest
    return sl[:1] + s2[:3] + kernel_cases(toy) + sl[1:] + s2[3:]


def kernel_cases(toy: bool) -> list[Case]:
    """Kernel-level cases: each op of ``codegen/s2ft.py`` / ``codegen/sltrain.py`` alone, beside the torch
    composition of the same op and the dense cuBLAS product of the same shape."""
    if toy:
        s2_dims = [dict(tokens=32, in_features=96, out_features=48, k=8, dim=1),
                   dict(tokens=32, in_features=48, out_features=80, k=8, dim=0)]
        serve = dict(tokens=32, in_features=96, out_features=48, k=8, dim=1, adapters=3)
    else:
        s2_dims = [dict(tokens=8192, in_features=11008, out_features=4096, k=224, dim=1),  # down_proj, 2 %
                   dict(tokens=8192, in_features=4096, out_features=11008, k=544, dim=0)]  # up_proj, 5 %
        serve = dict(tokens=4096, in_features=11008, out_features=4096, k=224, dim=1, adapters=4)
    if toy:
        sl_dims = dict(tokens=32, in_features=64, out_features=96, rank=8, sparsity=0.1, block_size=16)
    else:
        sl_dims = dict(tokens=8192, in_features=4096, out_features=11008, rank=512, sparsity=0.03, block_size=32)
    cases = []
    for op in ("fwd", "dx", "dvalues"):
        for support in ("block", "random"):
            d = dict(sl_dims, support=support)
            if support == "random":
                d.pop("block_size")
            providers = ["fxsparse", "torch", "cublas"] + (["bsr-triton"] if support == "block" else [])
            cases.append(Case("sltrain-kernel", f"sltrain_{support}_{op}", d,
                              lambda ctx, d, op=op: build_sltrain_kernel(ctx, d, op), providers))
    for op in ("s2ft_linear", "s2ft_backward_dx", "s2ft_backward_dblock"):
        for d in s2_dims:
            cases.append(Case("s2ft-kernel", op, d, lambda ctx, d, op=op: build_s2ft_kernel(ctx, d, op),
                              ["fxsparse", "torch", "cublas"]))
    cases.append(Case("s2ft-kernel", "s2ft_multi_adapter", serve, build_s2ft_serving, ["fxsparse", "torch", "cublas"]))
    return cases


# ---- kernel-level entries


def _op_entries(fn: Callable[[], object], outputs: Callable[[object], dict], reference: Callable[[], dict],
                flops: float, nbytes: float, impl_torch: str) -> list[Entry]:
    """The fxsparse (Triton) and plain-torch providers of one op call ``fn``, checked on ``outputs(result)``."""
    entries = []
    for kernels, provider, role, impl in (("triton", "fxsparse", "subject", "fxsparse Triton kernel"),
                                          ("torch", "torch", "torch", impl_torch)):
        held: dict = {}

        def step(held=held):
            held["out"] = fn()

        entries.append(Entry(provider, role, impl, step, lambda held=held: outputs(held["out"]), reference, flops,
                             nbytes, kernels))
    return entries


def _cublas_entry(fn: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor], flops: float,
                  nbytes: float, note: str) -> Entry:
    held: dict = {}

    def step():
        held["y"] = fn()

    return Entry("cublas", "dense", "cuBLAS (torch matmul)", step, lambda: {"y": held["y"]},
                 lambda: {"y": reference()}, flops, nbytes, note=note)


def build_sltrain_kernel(ctx: Context, d: dict, op: str) -> list[Entry]:
    """One SLTrain op at one shape: the fused forward (``fwd``), the backward op asked for ``dx`` only (dh on
    cuBLAS + the fused dx kernel) or for ``dvalues`` only (dh + the SDDMM); fxsparse, torch, cuBLAS, BSR."""
    from fxsparse.codegen.sltrain import tile_pointers, transpose_csr  # registers torch.ops.fxsparse.sltrain_*

    ops = torch.ops.fxsparse
    support = d["support"]
    t, in_f, out_f, r = d["tokens"], d["in_features"], d["out_features"], d["rank"]
    layer = _sltrain_layer(ctx, d, support)
    A, B, values, scale, nnz = layer.A.detach(), layer.B.detach(), layer.values.detach(), layer.scale, layer.nnz
    x = ctx.randn(t, in_f, salt=1)
    dy = ctx.randn(t, out_f, salt=2)
    h = (x @ A.t()).mul_(scale)  # the ops take hs = x A^T scale, as the forward op returns it
    e = _e(ctx)
    if support == "random":
        crow, col = layer.support_crow, layer.support_col
        t_crow, t_row, t_perm = transpose_csr(crow, col, in_f)
        support_args = (crow, col, t_crow, t_row, t_perm)
        index_bytes = 4 * (nnz + out_f + 1)
        t_index_bytes = 4 * (2 * nnz + in_f + 1)
    else:
        bs = layer.block_size
        tile_row, tile_col = layer.tile_row, layer.tile_col
        support_args = (tile_row, tile_col, *tile_pointers(tile_row, tile_col, out_f, in_f, bs), bs)
        index_bytes = t_index_bytes = 8 * nnz / (bs * bs) + 4 * (out_f // bs + in_f // bs + 2)

    rows, cols = layer.support_indices()
    dense64 = ((B.double() @ A.double()) * scale).reshape(-1).index_add(
        0, rows.long() * in_f + cols.long(), values.double()).view(out_f, in_f)
    dense = dense64.to(ctx.dtype)  # the dense layer's weight for the cuBLAS peer
    fwd_op, bwd_op = getattr(ops, f"sltrain_{support}_fwd"), getattr(ops, f"sltrain_{support}_bwd")
    bsr = None
    if support == "block":
        bsr_ops = _bsr_ops(toy_cpu=ctx.toy and ctx.device.type == "cpu")
        bsr = (_bsr_support(layer), layer.block_size, bsr_ops,
               "torch.sparse BSR Triton ops" if ctx.device.type == "cuda" else "dense stand-in for torch's BSR ops")
    dh_flops, dh_bytes = 2.0 * t * out_f * r, e * (t * out_f + out_f * r + t * r)
    if op == "fwd":
        flops = 2.0 * t * r * (in_f + out_f) + 2.0 * t * nnz
        nbytes = e * (t * in_f + r * in_f + out_f * r + nnz + t * out_f + t * r) + index_bytes
        entries = _op_entries(lambda: fwd_op(x, A, B, values, None, *support_args, scale),
                              lambda out: {"y": out[0], "h": out[1]},
                              lambda: {"y": x.double() @ dense64.t(), "h": x.double() @ A.double().t() * scale},
                              flops, nbytes, "plain torch (" + ("cuSPARSE CSR" if support == "random" else
                                                                 "gathered batched GEMMs") + " + cuBLAS)")
        entries.append(_cublas_entry(lambda: x @ dense.t(), lambda: x.double() @ dense64.t(),
                                     2.0 * t * in_f * out_f, e * (t * in_f + out_f * in_f + t * out_f),
                                     "the dense layer's forward x @ W.T"))
        if bsr is not None:
            idx, bs, bsr_ops, impl = bsr
            entries.append(_fn_entry("bsr-triton", impl, lambda: _bsr_forward(x, A, B, values, idx, bs, scale,
                                                                              bsr_ops),
                                     lambda out: {"y": out[0], "h": out[1]}, entries[0].reference, flops, nbytes))
    elif op == "dx":
        flops = dh_flops + 2.0 * t * r * in_f + 2.0 * t * nnz
        nbytes = dh_bytes + e * (t * r + r * in_f + nnz + t * in_f) + t_index_bytes
        needs = (True, False, False, False, False)
        entries = _op_entries(lambda: bwd_op(dy, x, h, A, B, values, *support_args, scale, *needs),
                              lambda out: {"dx": out[0]}, lambda: {"dx": dy.double() @ dense64}, flops, nbytes,
                              "plain torch (sparse S^T product + cuBLAS)")
        entries.append(_cublas_entry(lambda: dy @ dense, lambda: dy.double() @ dense64, 2.0 * t * in_f * out_f,
                                     e * (t * out_f + out_f * in_f + t * in_f), "the dense layer's dx = dy @ W"))
        if bsr is not None:
            idx, bs, bsr_ops, impl = bsr
            entries.append(_fn_entry("bsr-triton", impl, lambda: _bsr_dx(dy, A, B, values, idx, bs, scale, bsr_ops),
                                     lambda out: {"dx": out[0]}, entries[0].reference, flops, nbytes))
    else:
        flops = dh_flops + 2.0 * t * nnz
        nbytes = dh_bytes + e * (t * out_f + t * in_f + nnz) + index_bytes
        needs = (False, False, False, True, False)

        def reference():
            return {"dvalues": (dy.double().t() @ x.double())[rows.long(), cols.long()]}

        entries = _op_entries(lambda: bwd_op(dy, x, h, A, B, values, *support_args, scale, *needs),
                              lambda out: {"dvalues": out[3]}, reference, flops, nbytes,
                              "plain torch (" + ("sampled_addmm" if support == "random" else "batched tile GEMMs")
                              + " + cuBLAS)")
        entries.append(_cublas_entry(lambda: dy.t() @ x, lambda: dy.double().t() @ x.double(), 2.0 * t * in_f * out_f,
                                     e * (t * out_f + t * in_f + out_f * in_f),
                                     "the dense layer's dW = dy.T @ x (what the SDDMM avoids)"))
        if bsr is not None:
            idx, bs, bsr_ops, impl = bsr
            entries.append(_fn_entry("bsr-triton", impl, lambda: _bsr_dvalues(dy, x, values, idx, bs, bsr_ops),
                                     lambda out: {"dvalues": out}, reference, 2.0 * t * nnz,
                                     e * (t * out_f + t * in_f + nnz) + index_bytes,
                                     note="SDDMM alone (no dh GEMM)"))
    return entries


def _fn_entry(provider: str, impl: str, fn: Callable[[], object], outputs: Callable[[object], dict],
              reference: Callable[[], dict], flops: float, nbytes: float, note: str = "") -> Entry:
    held: dict = {}

    def step():
        held["out"] = fn()

    return Entry(provider, "peer", impl, step, lambda: outputs(held["out"]), reference, flops, nbytes, note=note)


def _s2ft_operands(ctx: Context, d: dict):
    """x, dy, frozen weight (selected rows/columns zeroed), block, index (int64), sel, rest, start, stop."""
    from fxsparse.codegen.s2ft import index_lists

    t, in_f, out_f, k, dim = d["tokens"], d["in_features"], d["out_features"], d["k"], d["dim"]
    size = in_f if dim == 1 else out_f
    start = (size // 3) // k * k
    index = torch.arange(start, start + k, device=ctx.device)
    weight = ctx.randn(out_f, in_f, salt=3, scale=in_f**-0.5).index_fill(dim, index, 0)
    block = ctx.randn(*((out_f, k) if dim == 1 else (k, in_f)), salt=4, scale=in_f**-0.5)
    sel, rest = index_lists(index, size)
    x = ctx.randn(t, in_f, salt=1)
    dy = ctx.randn(t, out_f, salt=2)
    return x, dy, weight, block, index, sel, rest, start, start + k


def build_s2ft_kernel(ctx: Context, d: dict, op: str) -> list[Entry]:
    """One S2FT op at one shape: the split-GEMM forward (``s2ft_linear``), the backward op asked for dx only
    or for the block gradient only; fxsparse, torch, cuBLAS."""
    import fxsparse.codegen.s2ft  # noqa: F401  (registers torch.ops.fxsparse.s2ft_*)

    ops = torch.ops.fxsparse
    t, in_f, out_f, k, dim = d["tokens"], d["in_features"], d["out_features"], d["k"], d["dim"]
    x, dy, weight, block, index, sel, rest, start, stop = _s2ft_operands(ctx, d)
    e = _e(ctx)
    effective = weight.index_copy(dim, index, block)  # the dense weight the split GEMMs stand for
    eff64 = effective.double()
    tk, nk, tn = t * in_f, out_f * in_f, t * out_f
    if op == "s2ft_linear":
        def reference():
            ref = {"y": x.double() @ eff64.t()}
            if dim == 1:
                ref["x_sel"] = x.double()[:, index]
            return ref

        entries = _op_entries(lambda: ops.s2ft_linear(x, weight, None, block, sel, rest, dim, start, stop, dim == 1),
                              lambda out: {"y": out[0], "x_sel": out[1]} if dim == 1 else {"y": out[0]},
                              reference, 2.0 * tk * out_f, e * (tk + nk + tn + (t * k if dim == 1 else 0)),
                              "plain torch (dense GEMM over the zero-filled weight + block GEMM)")
        entries.append(_cublas_entry(lambda: x @ effective.t(), lambda: x.double() @ eff64.t(), 2.0 * tk * out_f,
                                     e * (tk + nk + tn), "x @ W.T with the block written in"))
    elif op == "s2ft_backward_dx":
        entries = _op_entries(lambda: ops.s2ft_backward(dy, None, weight, block, sel, rest, dim, start, stop, True,
                                                        False),
                              lambda out: {"dx": out[0]}, lambda: {"dx": dy.double() @ eff64}, 2.0 * tk * out_f,
                              e * (tn + nk + tk), "plain torch (dense GEMM over the zero-filled weight + block GEMM)")
        entries.append(_cublas_entry(lambda: dy @ effective, lambda: dy.double() @ eff64, 2.0 * tk * out_f,
                                     e * (tn + nk + tk), "dy @ W with the block written in"))
    else:
        saved = x[:, start:stop].contiguous() if dim == 1 else x
        if dim == 1:
            flops, nbytes = 2.0 * tn * k, e * (tn + t * k + out_f * k)
            ref = lambda: {"dblock": dy.double().t() @ saved.double()}  # noqa: E731
        else:
            flops, nbytes = 2.0 * t * k * in_f, e * (t * k + tk + k * in_f)
            ref = lambda: {"dblock": dy.double()[:, index].t() @ x.double()}  # noqa: E731
        entries = _op_entries(lambda: ops.s2ft_backward(dy, saved, weight, block, sel, rest, dim, start, stop, False,
                                                        True),
                              lambda out: {"dblock": out[1]}, ref, flops, nbytes, "plain torch (cuBLAS on the slice)")
        entries.append(_cublas_entry(lambda: dy.t() @ x, lambda: dy.double().t() @ x.double(), 2.0 * tk * out_f,
                                     e * (tn + tk + nk), "full fine-tuning's dW = dy.T @ x (the GEMM S2FT avoids)"))
    return entries


def build_s2ft_serving(ctx: Context, d: dict) -> list[Entry]:
    """Multi-adapter serving: each token adds its adapter's column delta; cuBLAS peer = the base GEMM alone."""
    import fxsparse.codegen.s2ft  # noqa: F401

    ops = torch.ops.fxsparse
    t, in_f, out_f, k, n_adapters = d["tokens"], d["in_features"], d["out_features"], d["k"], d["adapters"]
    x = ctx.randn(t, in_f, salt=1)
    weight = ctx.randn(out_f, in_f, salt=3, scale=in_f**-0.5)
    gen = ctx.generator(7)
    counts = [k if a % 3 != 2 else max(1, k // 2) for a in range(n_adapters)]  # one adapter narrower: padded
    col_index = torch.zeros(n_adapters, k, dtype=torch.int32)
    col_delta = torch.zeros(n_adapters, out_f, k)
    for a, count in enumerate(counts):
        col_index[a, :count] = torch.randperm(in_f, generator=gen)[:count].sort().values.to(torch.int32)
        col_delta[a, :, :count] = torch.randn(out_f, count, generator=gen) * in_f**-0.5
    col_index, col_count = col_index.to(ctx.device), torch.tensor(counts, dtype=torch.int32, device=ctx.device)
    col_delta = col_delta.to(device=ctx.device, dtype=ctx.dtype)
    row_delta = torch.zeros(n_adapters, 0, in_f, device=ctx.device, dtype=ctx.dtype)
    row_index = torch.zeros(n_adapters, 0, dtype=torch.int32, device=ctx.device)
    row_count = torch.zeros(n_adapters, dtype=torch.int32, device=ctx.device)
    token_adapter = torch.randint(-1, n_adapters, (t,), generator=gen).to(ctx.device)  # -1: the base model

    def reference():
        y = x.double() @ weight.double().t()
        for a, count in enumerate(counts):
            rows = (token_adapter == a).nonzero().flatten()
            cols = col_index[a, :count].long()
            y[rows] += x.double()[rows][:, cols] @ col_delta[a, :, :count].double().t()
        return {"y": y}

    e = _e(ctx)
    served = sum(int((token_adapter == a).sum()) * c for a, c in enumerate(counts))
    flops = 2.0 * t * in_f * out_f + 2.0 * served * out_f
    nbytes = e * (t * in_f + out_f * in_f + t * out_f + col_delta.numel()) + 4 * (col_index.numel() + t)
    entries = _op_entries(lambda: ops.s2ft_multi_adapter(x, weight, None, token_adapter, col_delta, col_index,
                                                         col_count, row_delta, row_index, row_count),
                          lambda out: {"y": out}, reference, flops, nbytes,
                          "plain torch (base GEMM + per-adapter gathered GEMMs)")
    entries.append(_cublas_entry(lambda: x @ weight.t(), lambda: x.double() @ weight.double().t(),
                                 2.0 * t * in_f * out_f, e * (t * in_f + out_f * in_f + t * out_f),
                                 "the base GEMM alone (no adapter)"))
    return entries


# ---------------------------------------------------------------- running


@dataclass
class RunInfo:
    meta: dict
    timer: Timer
    ctx: Context
    budget_s: float | None
    started: float = field(default_factory=time.monotonic)


def _kernel_calls() -> int:
    try:
        from fxsparse.codegen import cache_stats
    except ImportError:
        return 0
    stats = cache_stats()
    return int(stats.get("hits", 0)) + int(stats.get("misses", 0))


def _sync(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def _poison_cached_memory(device: torch.device, most: int = 16 << 30) -> None:
    """Leave a NaN-filled block in the CUDA caching allocator: the next large allocations are carved from it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    block = torch.empty(min(int(free * 0.6), most) // 4, dtype=torch.float32, device=device)
    block.fill_(float("nan"))
    del block  # back to the allocator's cache, not to the driver


def _row(info: RunInfo, case: Case, provider: str, **values) -> dict:
    d = case.dims
    row = dict(info.meta, group=case.group, problem=case.problem, shape=case.shape, provider=provider,
               dtype=str(info.ctx.dtype).replace("torch.", ""), tokens=d.get("tokens", ""),
               in_features=d.get("in_features", ""), out_features=d.get("out_features", ""),
               rank=d.get("rank", ""), sparsity=d.get("sparsity", ""), block_size=d.get("block_size", ""),
               k=d.get("k", ""))
    row.update(values)
    return row


def run_entry(info: RunInfo, case: Case, entry: Entry, peaks: Peaks, measured: tuple[float, float] | None) -> dict:
    ctx = info.ctx
    tol = TOLERANCE[ctx.dtype]
    impl = entry.impl if ctx.device.type == "cuda" else entry.impl.replace("cuSPARSE", "MKL").replace("cuBLAS", "BLAS")
    row = _row(info, case, entry.provider, role=entry.role, impl=impl, tol=f"{tol:g}", note=entry.note)
    with _kernels_mode(entry.kernels):
        calls = _kernel_calls()
        entry.step()  # the first call compiles and tunes: candidates write the real outputs too
        _sync(ctx)
        row["kernel_calls"] = _kernel_calls() - calls
        if ctx.device.type == "cuda":
            # checked: a second call, its outputs carved from NaN-filled memory, so that an element no kernel
            # writes shows up as NaN instead of a value left there by an earlier call or a tuning candidate
            _poison_cached_memory(ctx.device)
            entry.step()
            _sync(ctx)
        got = entry.outputs()
    ref = entry.reference()
    errors = {name: _rel(got[name], ref[name]) if got.get(name) is not None else float("inf") for name in ref}
    del ref
    worst = max(errors, key=errors.get)
    rel = errors[worst]
    row.update(check="pass" if rel <= tol else "fail", rel_err=f"{rel:.2e}", worst_output=worst)
    with _kernels_mode(entry.kernels):
        times = info.timer(entry.step)
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
    floor_compute = entry.flops / (peaks.tflops * 1e12) * 1e3
    floor_memory = entry.nbytes / (peaks.gbs * 1e9) * 1e3
    floor = max(floor_compute, floor_memory)
    row.update(
        median_ms=f"{median:.5g}", min_ms=f"{min(times):.5g}", spread_pct=f"{100 * (q[2] - q[0]) / median:.1f}",
        repeats=len(times), gflop=f"{entry.flops / 1e9:.5g}", mbytes=f"{entry.nbytes / 1e6:.5g}",
        tflops_per_s=f"{entry.flops / median / 1e9:.4g}", gb_per_s=f"{entry.nbytes / median / 1e6:.4g}",
        floor_ms=f"{floor:.5g}", x_floor=f"{median / floor:.2f}",
        bound="compute" if floor_compute >= floor_memory else "memory",
    )
    if measured is not None:
        floor_m = max(entry.flops / (measured[0] * 1e12), entry.nbytes / (measured[1] * 1e9)) * 1e3
        row["x_floor_measured"] = f"{median / floor_m:.2f}"
    if entry.kernels == "triton" and row["kernel_calls"] == 0:
        row["note"] = (row["note"] + "; " if row["note"] else "") + "no fxsparse kernel went through pick_config"
    return row


def run_case(info: RunInfo, case: Case, peaks: Peaks, measured, index: int, total: int) -> list[dict]:
    elapsed = time.monotonic() - info.started
    prefix = f"[{index:>2}/{total} {elapsed:6.1f}s] {case.group} {case.shape}"
    if info.budget_s is not None and elapsed > info.budget_s:
        print(f"{prefix}: skipped (time budget {info.budget_s:.0f} s spent)", flush=True)
        return [_row(info, case, p, check="skipped", note=f"time budget {info.budget_s:.0f} s spent")
                for p in case.providers]
    rows: list[dict] = []
    try:
        entries = case.build(info.ctx, case.dims)
    except Exception as exc:  # a provider that cannot be built is a row that says why, not a dead run
        traceback.print_exc()
        print(f"{prefix}: build failed: {exc!r}", flush=True)
        return [_row(info, case, p, check="error", note=f"build failed: {type(exc).__name__}: {exc}"[:300])
                for p in case.providers]
    for entry in entries:
        try:
            row = run_entry(info, case, entry, peaks, measured)
        except Exception as exc:
            traceback.print_exc()
            row = _row(info, case, entry.provider, role=entry.role, impl=entry.impl, check="error",
                       note=f"{type(exc).__name__}: {exc}"[:300])
            with contextlib.suppress(Exception):
                _sync(info.ctx)
        rows.append(row)
        print(f"{prefix} {entry.provider:>16}: check {row['check']} ({row.get('rel_err', '-')} "
              f"{row.get('worst_output', '')})  {row.get('median_ms', '-')} ms  "
              f"{row.get('tflops_per_s', '-')} TFLOP/s  x{row.get('x_floor', '-')} floor"
              + (f"  [{row['note']}]" if row.get("note") else ""), flush=True)
    del entries
    if info.ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- results files


def append_csv(csv_path: Path, rows: list[dict]) -> None:
    """Append ``rows``; a CSV written with other columns is rewritten with the current ones (blank there)."""
    old = read_csv(csv_path) if csv_path.exists() else []
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(old + rows)
    os.replace(tmp, csv_path)


def read_csv(csv_path: Path) -> list[dict]:
    with csv_path.open(newline="") as fh:
        return [{k: v for k, v in row.items() if k in FIELDS} for row in csv.DictReader(fh)]


def _f(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _speedup(base: dict | None, row: dict) -> float | None:
    a, b = _f(base.get("median_ms")) if base else None, _f(row.get("median_ms"))
    return a / b if a and b else None


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, from one run's rows: measured value beside the target, limit where one applies."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_key.setdefault((row["group"], row["problem"], row["shape"]), {})[row["provider"]] = row
    out = []
    for (group, _, shape), providers in by_key.items():
        dense_dims = tuple(str(providers.get("dense", {}).get(k)) for k in ("in_features", "out_features", "rank"))
        if group == "sltrain-layer" and dense_dims == ("4096", "11008", "512"):
            for support in ("block", "random"):
                row = providers.get(f"fxsparse-{support}")
                if row is None:
                    continue
                dense = providers["dense"]
                limit = _ratio(dense.get("gflop"), row.get("gflop"))
                out.append(_target(f"SLTrain {support} support fwd+bwd >= {TARGETS['sltrain_vs_dense']}x "
                                   "faster than dense bf16 linear", shape, _speedup(dense, row),
                                   TARGETS["sltrain_vs_dense"], limit, row, dense))
        if group == "s2ft-layer":
            row = providers.get("fxsparse-s2ft")
            if row is None:
                continue
            for peer, key in (("full", "s2ft_vs_full"), ("lora", "s2ft_vs_lora")):
                base = providers.get(peer)
                if base is None:
                    continue
                limit = _ratio(base.get("gflop"), row.get("gflop"))
                label = "full fine-tuning" if peer == "full" else "LoRA r16"
                out.append(_target(f"S2FT layer step >= {TARGETS[key]}x faster than {label}", shape,
                                   _speedup(base, row), TARGETS[key], limit, row, base))
    kernel_rows = [r for r in rows if r["group"].endswith("-kernel") and r.get("role") == "subject"]
    label = "fxsparse kernel"
    if not kernel_rows:  # no kernel-level cases in this run: judge the fxsparse layers as a whole
        kernel_rows = [r for r in rows if r.get("role") == "subject"]
        label = "fxsparse layer (no kernel-level cases ran)"
    for row in kernel_rows:
        x_floor = _f(row.get("x_floor"))
        out.append(_target(f"{label} {row['problem']} {row['provider']} within {TARGETS['kernel_x_floor']}x "
                           "of its roofline floor", row["shape"], x_floor, TARGETS["kernel_x_floor"], None, row,
                           None, lower_is_better=True))
    return out


def _ratio(a, b) -> float | None:
    a, b = _f(a), _f(b)
    return a / b if a and b else None


def _target(name, shape, value, required, limit, row, base, lower_is_better=False) -> dict:
    checks = [r for r in (row, base) if r is not None]
    if any(r.get("check") != "pass" for r in checks):
        verdict = "no result (" + ", ".join(f"{r['provider']}: {r.get('check')}" for r in checks
                                            if r.get("check") != "pass") + ")"
    elif value is None:
        verdict = "no result"
    elif row.get("mode") == "toy":
        verdict = "n/a (toy)"
    else:
        ok = value <= required if lower_is_better else value >= required
        verdict = "pass" if ok else "fail"
    return {"target": name, "shape": shape, "measured": value, "required": required, "limit": limit,
            "verdict": verdict, "lower_is_better": lower_is_better}


def write_markdown(csv_path: Path, md_path: Path) -> None:
    """Regenerate the markdown report from the whole CSV: one section per run, newest first."""
    rows = read_csv(csv_path)
    runs: dict[tuple, list[dict]] = {}
    for row in rows:
        runs.setdefault((row["date"], row["device"], row["git_rev"], row["mode"]), []).append(row)
    lines = [
        "# fxsparse GPU kernels: correctness, time, roofline",
        "",
        f"Generated by `benchmarks/gpu_kernels.py` from `{csv_path.name}`; do not edit. Every case is checked "
        "against a float64 reference (`rel err` = worst ||out - ref|| / ||ref|| over y, dx and each parameter "
        "gradient) before it is timed. Times: median over repeats, CUDA events, L2 flushed before each repeat. "
        "`x floor` = median / max(FLOPs / peak FLOP/s, bytes / peak bandwidth) (bytes: each phase reads its "
        "inputs once and writes its outputs once). `x dense` / `x torch`: the dense (cuBLAS) provider's / the "
        "plain-torch composition's time over this one (above 1 = faster). Layer cases time one layer's forward + "
        "backward (dx and every trainable gradient; no optimizer step). FLOP-count limit: the peer's FLOPs over "
        "ours, the speed-up an equal FLOP rate would give (S2FT vs full fine-tuning: about 6N / 4N).",
        "",
    ]
    for (date, device, rev, mode), group_rows in reversed(list(runs.items())):
        first = group_rows[0]
        lines += [f"## {date} UTC, {device}, git {rev}, torch {first['torch']}, triton {first['triton']}"
                  + (" (toy: tiny shapes, times not meaningful)" if mode == "toy" else ""), ""]
        lines.append(f"Peaks used: {first['peaks']} ({first['peak_tflops']} TFLOP/s, {first['peak_gbs']} GB/s)"
                     + (f"; measured this run: {first['measured_tflops']} TFLOP/s bf16 GEMM, "
                        f"{first['measured_gbs']} GB/s copy" if first.get("measured_tflops") else "")
                     + f". Timing: {first['timing']}.")
        lines.append("")
        targets = evaluate_targets(group_rows)
        if targets:
            lines += ["### Targets", "", "| target | shape | measured | required | FLOP-count limit | result |",
                      "|---|---|---|---|---|---|"]
            for t in targets:
                measured = "-" if t["measured"] is None else f"{t['measured']:.2f}x"
                limit = "-" if t["limit"] is None else f"{t['limit']:.2f}x"
                sign = "<=" if t["lower_is_better"] else ">="
                lines.append(f"| {t['target']} | {t['shape']} | {measured} | {sign} {t['required']}x | {limit} "
                             f"| {t['verdict']} |")
            lines.append("")
        by_case: dict[tuple, list[dict]] = {}
        for row in group_rows:
            by_case.setdefault((row["group"], row["problem"]), []).append(row)
        for (group, problem), case_rows in by_case.items():
            lines += [f"### {group}: {problem}", "",
                      "| shape | provider | impl | check (rel err) | median ms | spread % | TFLOP/s | GB/s "
                      "| floor ms | x floor | bound | x dense | x torch | note |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for row in case_rows:
                same = [r for r in case_rows if r["shape"] == row["shape"]]
                dense = next((r for r in same if r.get("role") == "dense"), None)
                torch_row = next((r for r in same if r["provider"] == row["provider"].replace("fxsparse", "torch")
                                  and r is not row), None)
                x_dense, x_torch = _speedup(dense, row), _speedup(torch_row, row)
                check = row["check"] + (f" ({row['rel_err']})" if row.get("rel_err") else "")
                lines.append(
                    f"| {row['shape']} | {row['provider']} | {row.get('impl') or '-'} | {check} | "
                    f"{row.get('median_ms') or '-'} | {row.get('spread_pct') or '-'} | "
                    f"{row.get('tflops_per_s') or '-'} | {row.get('gb_per_s') or '-'} | "
                    f"{row.get('floor_ms') or '-'} | {row.get('x_floor') or '-'} | {row.get('bound') or '-'} | "
                    f"{'-' if x_dense is None else f'{x_dense:.2f}'} | {'-' if x_torch is None else f'{x_torch:.2f}'} "
                    f"| {(row.get('note') or '').replace('|', '/')} |")
            lines.append("")
    md_path.write_text("\n".join(lines))


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true",
                        help="tiny shapes; without CUDA the kernels run in the Triton interpreter (times mean nothing)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu_kernels.csv / .md (default: benchmarks/results; in --toy mode "
                             "nothing is written unless --out is given)")
    parser.add_argument("--peak", choices=sorted(PEAKS), help="use this table entry's peaks, whatever the GPU")
    parser.add_argument("--peaks", choices=["table", "measured"], default="table",
                        help="roofline peaks: the datasheet table by GPU name (default) or this run's measurement")
    parser.add_argument("--peak-tflops", type=float, help="override the compute peak (TFLOP/s)")
    parser.add_argument("--peak-gbs", type=float, help="override the bandwidth peak (GB/s)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--only", default="", help="run only the cases whose group or shape contains this text")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip cases that would start after this many seconds (default: 330 on a GPU)")
    parser.add_argument("--target-ms", type=float, default=250.0, help="time spent timing each case (GPU)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="record results from a checkout with uncommitted changes (git_rev says -dirty)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def output_dir(args: argparse.Namespace) -> Path | None:
    """Where the CSV and markdown go: ``--out``, else benchmarks/results, except in --toy mode (nowhere)."""
    if args.out is not None:
        return args.out
    return None if args.toy else RESULTS


class _Interrupted(BaseException):  # not an Exception: the per-case handlers must not swallow it
    pass


def _on_sigterm(signum, frame):  # `timeout` sends SIGTERM: stop at the next case and still write the files
    raise _Interrupted(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.toy:
        raise SystemExit("no CUDA device: the full benchmark needs a GPU (use --toy for the CPU smoke run)")
    if not cuda:
        # Kernels run in the interpreter on CPU tensors; triton.jit reads this at decoration time, so it is set
        # before any fxsparse.codegen kernel module is imported (they are imported lazily, below).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out_dir = output_dir(args)
    if out_dir is not None and out_dir.resolve() == RESULTS.resolve() and not args.toy:
        require_clean_tree(args.allow_dirty)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # torch's notes that sparse tensors are "beta" and that invariant checks are off: once per run is noise
    warnings.filterwarnings("ignore", message="Sparse (BSR|CSR) tensor support is in beta state")
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    ctx = Context(device, dtype, args.toy, args.seed)
    name = device_name()
    measured = None
    if cuda:
        print(f"{name}: measuring the ceilings (bf16 GEMM 8192^3, 512 MiB device copy)...", flush=True)
        measured = measure_ceilings(device)
        print(f"  measured {measured[0]:.0f} TFLOP/s, {measured[1]:.0f} GB/s", flush=True)
    peaks = choose_peaks(args, name, measured, toy_cpu=not cuda)
    print(f"roofline peaks: {peaks.source}: {peaks.tflops:g} TFLOP/s, {peaks.gbs:g} GB/s", flush=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device) if cuda else None
    timer = Timer(cuda=cuda, target_ms=args.target_ms, flush=flush, min_repeats=5 if cuda else 2)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": name, "git_rev": os.environ.get("FXSPARSE_GIT_REV") or git_rev(), "torch": torch.__version__,
        "triton": triton_version, "mode": "toy" if args.toy else "full",
        "timing": ("CUDA events, median, L2 flushed before each repeat" if cuda
                   else "perf_counter, Triton interpreter: not meaningful"),
        "peaks": peaks.source, "peak_tflops": f"{peaks.tflops:g}", "peak_gbs": f"{peaks.gbs:g}",
        "measured_tflops": f"{measured[0]:.0f}" if measured else "", "measured_gbs": f"{measured[1]:.0f}"
        if measured else "",
    }
    budget = args.budget_s if args.budget_s is not None else (330.0 if cuda and not args.toy else None)
    info = RunInfo(meta, timer, ctx, budget)
    cases = [c for c in case_list(args.toy) if not args.only or args.only in f"{c.group} {c.shape}"]
    rows: list[dict] = []
    interrupted = None
    try:
        for i, case in enumerate(cases, 1):
            rows.extend(run_case(info, case, peaks, measured, i, len(cases)))
    except (_Interrupted, KeyboardInterrupt) as exc:
        interrupted = exc
        print(f"interrupted ({exc!r}): writing the {len(rows)} rows measured so far", flush=True)
    _print_summary(rows)
    if out_dir is not None and rows:
        csv_path = out_dir / CSV_NAME
        append_csv(csv_path, rows)
        write_markdown(csv_path, out_dir / MD_NAME)
        print(f"wrote {csv_path} and {out_dir / MD_NAME}", flush=True)
    failed = [r for r in rows if r.get("check") in ("fail", "error")]
    if interrupted is not None:
        return 2
    return 1 if failed else 0


def _print_summary(rows: list[dict]) -> None:
    print("\n" + "-" * 110)
    for t in evaluate_targets(rows):
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}x"
        limit = "" if t["limit"] is None else f" (FLOP limit {t['limit']:.2f}x)"
        print(f"{t['verdict']:>10}  {t['target']} @ {t['shape']}: {measured}{limit}")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.get("check", "?")] = counts.get(row.get("check", "?"), 0) + 1
        if row.get("check") in ("fail", "error"):
            print(f"{row['check']:>10}  {row['group']} {row['problem']} {row['shape']} {row['provider']}: "
                  f"{row.get('rel_err') or ''} {row.get('worst_output') or ''} {row.get('note') or ''}")
    print("checks: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    sys.exit(main())
