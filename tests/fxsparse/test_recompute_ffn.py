"""gated_act_mul and RecomputingGatedFFN: exact gradients, what backward saves, unchanged state_dict keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fxsparse.layers.recompute_ffn import RecomputingGatedFFN, activation_name, gated_act_mul
from fxsparse.memory import SavedActivations

REFERENCE = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def _saved_storages(fn) -> dict[int, int]:
    with SavedActivations() as saved:
        fn()
    return saved.storages


@pytest.mark.parametrize("act", list(REFERENCE))
@pytest.mark.parametrize("shape", [(7,), (3, 42), (2, 6, 123)])
def test_gated_act_mul_matches_autograd_float64(act, shape):
    torch.manual_seed(0)
    # Spread over a wide range so both tails and the curved middle of each activation are exercised.
    gate = (3 * torch.randn(shape, dtype=torch.float64)).requires_grad_(True)
    up = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(shape, dtype=torch.float64)

    out = gated_act_mul(gate, up, act)
    dgate, dup = torch.autograd.grad(out, (gate, up), grad_out)
    ref = REFERENCE[act](gate) * up
    dgate_ref, dup_ref = torch.autograd.grad(ref, (gate, up), grad_out)

    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dgate, dgate_ref)
    torch.testing.assert_close(dup, dup_ref)


@pytest.mark.parametrize("act", list(REFERENCE))
def test_gated_act_mul_gradcheck(act):
    torch.manual_seed(1)
    gate = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: gated_act_mul(g, u, act), (gate, up))


@pytest.mark.parametrize("act", list(REFERENCE))
def test_gated_act_mul_bfloat16_close_to_autograd(act):
    torch.manual_seed(2)
    gate = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(5, 64, dtype=torch.bfloat16)
    out = gated_act_mul(gate, up, act)
    dgate, dup = torch.autograd.grad(out, (gate, up), grad_out)
    ref = REFERENCE[act](gate) * up
    dgate_ref, dup_ref = torch.autograd.grad(ref, (gate, up), grad_out)
    assert out.dtype == dgate.dtype == dup.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dgate, dgate_ref)
    torch.testing.assert_close(dup, dup_ref)


def test_gated_act_mul_saves_only_gate_and_up():
    gate = torch.randn(3, 40, requires_grad=True)
    up = torch.randn(3, 40, requires_grad=True)
    ours = _saved_storages(lambda: gated_act_mul(gate, up, "silu"))
    assert set(ours) == {gate.untyped_storage().data_ptr(), up.untyped_storage().data_ptr()}
    plain = _saved_storages(lambda: F.silu(gate) * up)
    assert len(plain) == 3  # gate, silu(gate) and up: the tensor we no longer keep


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="relu"):
        gated_act_mul(torch.randn(2), torch.randn(2), "relu")


def test_activation_name_from_hints_and_modules():
    from transformers.activations import ACT2FN

    assert activation_name("gelu_pytorch_tanh") == "gelu_tanh"
    assert activation_name("aten.silu.default") == "silu"
    assert activation_name(None, ACT2FN["silu"]) == "silu"
    assert activation_name("", ACT2FN["gelu"]) == "gelu"
    assert activation_name("", ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert activation_name("relu", nn.ReLU()) is None


class _GatedMLP(nn.Module):
    def __init__(self, act: str, hidden: int = 12, channels: int = 20):
        super().__init__()
        self.w_gate = nn.Linear(hidden, channels, dtype=torch.float64)
        self.w_up = nn.Linear(hidden, channels, dtype=torch.float64)
        self.w_down = nn.Linear(channels, hidden, dtype=torch.float64)
        self.act = REFERENCE[act]

    def forward(self, x):
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))


@pytest.mark.parametrize("act", list(REFERENCE))
def test_recomputing_gated_ffn_module_matches_and_keeps_keys(act):
    torch.manual_seed(3)
    mlp = _GatedMLP(act)
    ffn = RecomputingGatedFFN(mlp.w_gate, mlp.w_up, mlp.w_down, act, names=("w_gate", "w_up", "w_down"))
    assert list(ffn.state_dict()) == list(mlp.state_dict())
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 5, 12, dtype=torch.float64)
    params = list(mlp.parameters())
    grads_ref = torch.autograd.grad(mlp(x), [x, *params], grad_out)
    grads = torch.autograd.grad(ffn(x), [x, *params], grad_out)
    torch.testing.assert_close(ffn(x), mlp(x), rtol=0, atol=0)
    for got, ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, ref)


def test_recomputing_gated_ffn_rejects_repeated_names():
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="distinct"):
        RecomputingGatedFFN(lin, lin, lin, "silu", names=("a", "a", "b"))


def test_recomputing_gated_ffn_compiles_fullgraph():
    torch.manual_seed(4)
    mlp = _GatedMLP("silu").float()
    ffn = RecomputingGatedFFN(mlp.w_gate, mlp.w_up, mlp.w_down, "silu", names=("w_gate", "w_up", "w_down"))
    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 12, requires_grad=True)
    (dx,) = torch.autograd.grad(compiled(x).sum(), (x,))
    (dx_ref,) = torch.autograd.grad(mlp(x).sum(), (x,))
    torch.testing.assert_close(dx, dx_ref)
