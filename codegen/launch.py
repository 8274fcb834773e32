"""Host-side helpers every kernel family's launcher shares: token buckets, dot precision, device guard.

>>> next_pow2(42), next_pow2(64), next_pow2(1)
(64, 64, 1)
"""

from __future__ import annotations

import contextlib

import torch

from fxsparse.codegen.autotune import interpreting

try:
    import triton.language as tl
except ImportError:  # the library runs on CPU without triton
    tl = None

__all__ = ["next_pow2", "kernel_dtypes", "device_guard"]


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1): the token bucket of a specialisation key."""
    return 1 << max(0, int(n) - 1).bit_length()


def kernel_dtypes(dtype: torch.dtype) -> dict:
    """``DOT_F32`` / ``PRECISION`` / ``ACC`` meta-parameters for dot operands of ``dtype``.

    ``DOT_F32`` upcasts half-precision dot operands under the interpreter only (triton 3.9's interpreter
    returns garbage for bf16/fp16 ``tl.dot``); on a GPU they go to tensor cores as they are.
    """
    half = dtype in (torch.float16, torch.bfloat16)
    if dtype == torch.float64:
        precision, acc = "ieee", tl.float64
    else:
        # fp32 operands use TF32 tensor cores only when torch itself would (allow_tf32), as cuBLAS does
        precision = "tf32" if half or torch.backends.cuda.matmul.allow_tf32 else "ieee"
        acc = tl.float32
    return {"DOT_F32": interpreting() and half, "PRECISION": precision, "ACC": acc}


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (a no-op context for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
