"""Gated FFN that recomputes its activation in backward: ``down(act(gate(x)) * up(x))`` saving gate and up.

Plain autograd on ``act(gate) * up`` keeps three intermediate tensors for backward (``gate`` for the
activation, ``act(gate)`` and ``up`` for the product). :func:`gated_act_mul` keeps ``gate`` and ``up``
and recomputes ``act(gate)`` in backward: one (tokens x channels) tensor less per block, for a few more
elementwise ops. Nothing is fused: forward runs the same three ops as the original module (the
SmolLM2 training step measured 2% slower for the saved tensor); a fused kernel belongs to the compiler
backend.

>>> import torch
>>> gate, up = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
>>> torch.allclose(gated_act_mul(gate, up, "silu"), torch.nn.functional.silu(gate) * up)
True
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ACTIVATIONS", "gated_act_mul", "activation_name", "RecomputingGatedFFN"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")

# Aliases seen in transformers configs, aten op names and torch modules, mapped to ACTIVATIONS.
_ALIASES = {
    "silu": "silu", "swish": "silu", "silu_": "silu",
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_tanh": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh",
}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_COEF = 0.044715


def _check_activation(act: str) -> str:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; supported: {list(ACTIVATIONS)}")
    return act


def _act(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(x)
    if act == "gelu":
        return F.gelu(x)
    return F.gelu(x, approximate="tanh")


def _act_and_derivative(x: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(x)`` and ``act'(x)``, in the (float32 or wider) dtype of ``x``."""
    if act == "silu":
        sig = torch.sigmoid(x)
        value = x * sig
        return value, sig * (1 + x * (1 - sig))
    if act == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return x * cdf, cdf + x * pdf
    inner = _SQRT_2_OVER_PI * (x + _TANH_COEF * x * x * x)
    t = torch.tanh(inner)
    value = 0.5 * x * (1 + t)
    derivative = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _TANH_COEF * x * x)
    return value, derivative


class _GatedActMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act: str):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        # The same ops as the original module, so forward results are bit-identical to it.
        return _act(gate, act) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        # Half-precision inputs: recompute in float32, as the matching autograd kernels do internally.
        compute = torch.float32 if gate.dtype in (torch.float16, torch.bfloat16) else gate.dtype
        value, derivative = _act_and_derivative(gate.to(compute), ctx.act)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = (grad_out.to(compute) * up.to(compute) * derivative).to(gate.dtype)
        if ctx.needs_input_grad[1]:
            grad_up = (grad_out.to(compute) * value.to(gate.dtype).to(compute)).to(up.dtype)
        return grad_gate, grad_up, None


def gated_act_mul(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` saving only ``gate`` and ``up`` for backward (``act`` recomputed there).

    ``act`` is one of ``"silu"``, ``"gelu"`` (exact, erf) or ``"gelu_tanh"``.

    >>> g = torch.randn(4, requires_grad=True)
    >>> gated_act_mul(g, torch.ones(4), "gelu").sum().backward()
    >>> g.grad.shape
    torch.Size([4])
    """
    return _GatedActMul.apply(gate, up, _check_activation(act))


def activation_name(hint: str | None = None, module: nn.Module | None = None) -> str | None:
    """Normalise an activation description to one of :data:`ACTIVATIONS`, or None if unsupported.

    ``hint`` is a name (``"silu"``, ``"gelu_pytorch_tanh"``, ``"aten.silu.default"``...); ``module`` an
    activation module (``nn.SiLU``, ``nn.GELU``, transformers' ``ACT2FN`` classes), used when the hint is
    missing or unknown.

    >>> activation_name("aten.gelu.default"), activation_name(module=nn.GELU(approximate="tanh"))
    ('gelu', 'gelu_tanh')
    """
    if hint:
        name = hint.lower().strip()
        for prefix in ("torch.ops.", "aten.", "torch.nn.functional.", "f."):
            name = name[len(prefix):] if name.startswith(prefix) else name
        name = name.split(".")[0]
        if name in _ALIASES:
            return _ALIASES[name]
    if module is None:
        return None
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    cls = type(module).__name__
    by_class = {"SiLUActivation": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                "FastGELUActivation": "gelu_tanh"}
    return by_class.get(cls)


class RecomputingGatedFFN(nn.Module):
    """``down(act(gate(x)) * up(x))`` with :func:`gated_act_mul`; submodules keep their original names.

    Registering ``gate``, ``up`` and ``down`` under the attribute names they had in the module this
    replaces keeps ``state_dict`` keys (and so checkpoints and adapters) unchanged.

    >>> ffn = RecomputingGatedFFN(nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4), "silu",
    ...                     names=("w1", "w3", "w2"))
    >>> sorted(k for k in ffn.state_dict() if k.endswith("weight"))
    ['w1.weight', 'w2.weight', 'w3.weight']
    """

    def __init__(
        self,
        gate: nn.Module,
        up: nn.Module,
        down: nn.Module,
        activation: str,
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ):
        super().__init__()
        if len(set(names)) != 3:
            raise ValueError(f"gate/up/down names must be three distinct attribute names, got {names!r}")
        # Plain attributes only under underscore names: the submodules may be called ``gate``, ``up``, ``down``
        # or ``activation`` in the module this replaces, and must keep those names.
        self._activation = _check_activation(activation)
        self._names = tuple(names)
        for name, module in zip(names, (gate, up, down), strict=True):
            self.add_module(name, module)

    def parts(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(gate, up, down), whatever their attribute names."""
        return tuple(self._modules[name] for name in self._names)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.parts()
        return down(gated_act_mul(gate(hidden_states), up(hidden_states), self._activation))

    def extra_repr(self) -> str:
        return f"activation={self._activation!r}"
