"""Gated activation ``act(gate) * up`` as one op, ``fxsparse::gated_act_mul``, saving only ``gate`` and ``up``.

Plain autograd on ``act(gate) * up`` keeps ``gate`` (for the activation's derivative), ``act(gate)`` and
``up`` (for the product): three ``tokens x channels`` tensors per gated FFN. This op keeps ``gate`` and
``up`` and recomputes the activation in backward. It is what the compiler pass
``fxsparse.passes.fuse_gated_activation`` puts in place of the pattern in a ``torch.compile`` graph, so
models that were never transformed (full fine-tuning, PEFT LoRA) get the saving too; eager transformed
models get it from ``fxsparse.layers.fused_ffn``.

Activations (``activation`` argument): ``0`` SiLU, ``1`` exact GELU (erf), ``2`` GELU tanh approximation.
On CUDA one Triton kernel does the forward and one the backward (both gradients in one pass); on CPU the
op is the plain torch composition (the forward is the same ops as the unfused graph, so it is
bit-identical to it).

>>> import torch
>>> g, u = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
>>> torch.equal(gated_act_mul(g, u, "silu"), torch.nn.functional.silu(g) * u)
True
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from fxsparse.codegen.autotune import Config, pick_config, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the library runs on CPU without triton
    triton = None
    tl = None

__all__ = ["ACTIVATION_CODES", "gated_act_mul", "gated_act_mul_reference"]

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}

# ---------------------------------------------------------------- tuning constants

# Elements per program. Elementwise and memory bound: 1024-4096 elements with 4-8 warps reach the same
# bandwidth on an H100 within a few percent; the autotuner picks among them per size bucket, and the
# interpreter takes the first (smallest) for quick tests.
_BLOCKS = (1024, 2048, 4096)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_COEF = 0.044715

# ---------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _act_and_derivative_tl(x, ACT: tl.constexpr):
        if ACT == 0:
            sig = tl.sigmoid(x)
            value = x * sig
            derivative = sig * (1.0 + x * (1.0 - sig))
        elif ACT == 1:
            cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
            pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
            value = x * cdf
            derivative = cdf + x * pdf
        else:
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh, from sigmoid (no tanh in every Triton version)
            value = 0.5 * x * (1.0 + t)
            derivative = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (
                1.0 + 3.0 * 0.044715 * x * x)
        return value, derivative

    @triton.jit
    def _gated_act_mul_fwd_kernel(
        # pointers
        gate_ptr, up_ptr, out_ptr,
        # sizes
        n_elements,
        # meta-parameters
        ACT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        value, _ = _act_and_derivative_tl(gate, ACT)
        tl.store(out_ptr + offsets, (value * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_act_mul_bwd_kernel(
        # pointers
        grad_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr,
        # sizes
        n_elements,
        # meta-parameters
        ACT: tl.constexpr, NEED_GATE: tl.constexpr, NEED_UP: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        value, derivative = _act_and_derivative_tl(gate, ACT)
        if NEED_GATE:
            up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_gate_ptr + offsets, (grad * up * derivative).to(grad_gate_ptr.dtype.element_ty), mask=mask)
        if NEED_UP:
            # Eager multiplies by act(gate) rounded to the input dtype; so does this.
            rounded = value.to(gate_ptr.dtype.element_ty).to(tl.float32)
            tl.store(grad_up_ptr + offsets, (grad * rounded).to(grad_up_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- candidate configs


def _configs() -> list[Config]:
    return [Config({"BLOCK": block}, num_warps=4 if block <= 1024 else 8, num_stages=1) for block in _BLOCKS]


# ---------------------------------------------------------------- plain-torch reference


def _act(x: torch.Tensor, code: int) -> torch.Tensor:
    if code == 0:
        return F.silu(x)
    if code == 1:
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")


def _act_and_derivative(x: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    if code == 0:
        sig = torch.sigmoid(x)
        return x * sig, sig * (1 + x * (1 - sig))
    if code == 1:
        cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT_2))
        return x * cdf, cdf + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _TANH_COEF * x * x * x))
    value = 0.5 * x * (1 + t)
    return value, 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _TANH_COEF * x * x)


def gated_act_mul_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The unfused ``act(gate) * up`` (plain autograd; the function this op must equal)."""
    return _act(gate, _code(activation)) * up


def _backward_torch(grad, gate, up, code, need_gate, need_up):
    # Half-precision inputs: recompute in float32, as the matching autograd kernels do internally.
    compute = torch.float32 if gate.dtype in (torch.float16, torch.bfloat16) else gate.dtype
    value, derivative = _act_and_derivative(gate.to(compute), code)
    grad_c = grad.to(compute)
    grad_gate = (grad_c * up.to(compute) * derivative).to(gate.dtype) if need_gate else gate.new_empty(0)
    grad_up = (grad_c * value.to(gate.dtype).to(compute)).to(up.dtype) if need_up else up.new_empty(0)
    return grad_gate, grad_up


# ---------------------------------------------------------------- host launchers


def _launch(name, kernel, key, n, launch):
    config = pick_config(name, kernel, key, _configs(), launch)
    launch(config)


def _forward_triton(gate, up, code):
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()

    def launch(config: Config) -> None:
        grid = (triton.cdiv(n, config.kwargs["BLOCK"]),)
        _gated_act_mul_fwd_kernel[grid](gate, up, out, n, ACT=code, **config.launch_kwargs())

    key = {"n_bucket": triton.next_power_of_2(n), "dtype": str(gate.dtype), "act": code}
    _launch("gated_act_mul_fwd", _gated_act_mul_fwd_kernel, key, n, launch)
    return out


def _backward_triton(grad, gate, up, code, need_gate, need_up):
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    grad_gate = torch.empty_like(gate) if need_gate else gate.new_empty(0)
    grad_up = torch.empty_like(up) if need_up else up.new_empty(0)
    n = gate.numel()

    def launch(config: Config) -> None:
        grid = (triton.cdiv(n, config.kwargs["BLOCK"]),)
        _gated_act_mul_bwd_kernel[grid](grad, gate, up, grad_gate if need_gate else gate,
                                        grad_up if need_up else up, n, ACT=code, NEED_GATE=need_gate,
                                        NEED_UP=need_up, **config.launch_kwargs())

    key = {"n_bucket": triton.next_power_of_2(n), "dtype": str(gate.dtype), "act": code,
           "need": (need_gate, need_up)}
    if need_gate or need_up:
        _launch("gated_act_mul_bwd", _gated_act_mul_bwd_kernel, key, n, launch)
    return grad_gate, grad_up


# ---------------------------------------------------------------- torch.library registration


def _check(gate, up, code):
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gated_act_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have one shape and dtype")
    if code not in ACTIVATION_CODES.values():
        raise ValueError(f"gated_act_mul: activation code {code} is not one of {ACTIVATION_CODES}")


@torch.library.custom_op("fxsparse::gated_act_mul", mutates_args=())
def _gated_act_mul_op(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    _check(gate, up, activation)
    if use_triton(gate, up):
        return _forward_triton(gate, up, activation)
    return (_act(gate, activation) * up).contiguous()  # contiguous, as the fake impl promises


@_gated_act_mul_op.register_fake
def _(gate, up, activation):
    _check(gate, up, activation)
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("fxsparse::gated_act_mul_backward", mutates_args=())
def _gated_act_mul_backward_op(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int,
                               need_gate: bool, need_up: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(grad, gate, up):
        return _backward_triton(grad, gate, up, activation, need_gate, need_up)
    return _backward_torch(grad, gate, up, activation, need_gate, need_up)


@_gated_act_mul_backward_op.register_fake
def _(grad, gate, up, activation, need_gate, need_up):
    grad_gate = torch.empty_like(gate, memory_format=torch.contiguous_format) if need_gate else gate.new_empty(0)
    grad_up = torch.empty_like(up, memory_format=torch.contiguous_format) if need_up else up.new_empty(0)
    return grad_gate, grad_up


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(gate, up)


def _backward_formula(ctx, grad):
    gate, up = ctx.saved_tensors
    need_gate, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_gate, grad_up = torch.ops.fxsparse.gated_act_mul_backward(grad, gate, up, ctx.activation, need_gate, need_up)
    return (grad_gate if need_gate else None), (grad_up if need_up else None), None


_gated_act_mul_op.register_autograd(_backward_formula, setup_context=_setup_context)


def _code(activation: str | int) -> int:
    if isinstance(activation, int) and activation in ACTIVATION_CODES.values():
        return activation
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"unknown activation {activation!r}; supported: {list(ACTIVATION_CODES)}")
    return ACTIVATION_CODES[activation]


def gated_act_mul(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` saving only ``gate`` and ``up`` (``activation``: silu, gelu or gelu_tanh).

    >>> g = torch.randn(4, requires_grad=True)
    >>> gated_act_mul(g, torch.ones(4), "gelu").sum().backward()
    >>> g.grad.shape
    torch.Size([4])
    """
    return torch.ops.fxsparse.gated_act_mul(gate, up, _code(activation))
