"""fxsparse::gated_act_mul against a float64 reference, its saved tensors, and the Triton kernels."""

import pytest
import torch

from fxsparse.codegen.gated_activation import gated_act_mul, gated_act_mul_reference
from fxsparse.memory import SavedActivations

TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
SHAPES = [(6, 42), (2, 16, 64), (431,)]
ACTIVATIONS = ["silu", "gelu", "gelu_tanh"]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * 2).to(dtype).requires_grad_(True)
    up = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    grad = torch.randn(shape, generator=g).to(dtype)
    return gate, up, grad


def _check(gate, up, grad, activation, dtype):
    out = gated_act_mul(gate, up, activation)
    out.backward(grad)
    g64 = gate.detach().double().requires_grad_(True)
    u64 = up.detach().double().requires_grad_(True)
    ref = gated_act_mul_reference(g64, u64, activation)
    ref.backward(grad.double())
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(gate.grad.double(), g64.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(up.grad.double(), u64.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_float64_reference(shape, dtype, activation):
    _check(*_inputs(shape, dtype), activation, dtype)


def test_forward_is_bit_identical_to_the_unfused_ops_on_cpu():
    gate, up, _ = _inputs((6, 42), torch.float32)
    for activation in ACTIVATIONS:
        assert torch.equal(gated_act_mul(gate, up, activation), gated_act_mul_reference(gate, up, activation))


def test_saves_gate_and_up_only():
    gate, up, _ = _inputs((64, 128), torch.float32)
    with SavedActivations() as fused:
        gated_act_mul(gate, up, "silu")
    with SavedActivations() as plain:
        gated_act_mul_reference(gate, up, "silu")
    assert fused.bytes == 2 * gate.numel() * 4
    assert plain.bytes == 3 * gate.numel() * 4


def test_bad_inputs_raise_value_errors():
    gate, up, _ = _inputs((3, 4), torch.float32)
    with pytest.raises(ValueError, match="activation"):
        gated_act_mul(gate, up, "relu")
    with pytest.raises(ValueError, match="shape"):
        gated_act_mul(gate, up[:, :2], "silu")


def test_opcheck():
    gate, up, _ = _inputs((5, 7), torch.float32)
    torch.library.opcheck(torch.ops.fxsparse.gated_act_mul.default, (gate, up, 0))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_kernels_in_interpreter(monkeypatch, activation):
    pytest.importorskip("triton")
    from fxsparse.codegen.autotune import interpreting

    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("FXSPARSE_KERNELS", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gate, up, grad = _inputs((6, 431), torch.float32)
    gate = gate.detach().to(device).requires_grad_(True)
    up = up.detach().to(device).requires_grad_(True)
    _check(gate, up, grad.to(device), activation, torch.float32)
