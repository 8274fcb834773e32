"""float32 master blocks on a bfloat16 frozen model, the usual mixed-precision recipe (issue 13, point 11):
both S²FT dims (rows: q/k/v/gate/up, columns: o/down) and SLTrain run forward and backward, computing in the
activation dtype, with float32 gradients, against a float64 reference at bfloat16 tolerances."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxsparse
from fxsparse.layers.s2ft import S2FTLinear
from fxsparse.layers.sltrain import SLTrainLinear
from fxsparse.models import tiny_model

# bfloat16 outputs of O(1) values (8-bit mantissa: one rounding is 2**-9 relative), float32 accumulation
TOLERANCE = {torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}, torch.float16: {"rtol": 4e-3, "atol": 4e-3}}
IN, OUT = 42, 123


def _bf16_exact(*shape, seed):
    """Random values that bfloat16 holds exactly, so the float64 reference sees the same numbers."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim, index", [(0, [1, 5, 6, 7, 100]), (1, [0, 3, 4, 41])])
def test_s2ft_float32_blocks_on_a_low_precision_layer(dim, index, dtype):
    linear = nn.Linear(IN, OUT, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(_bf16_exact(OUT, IN, seed=0) * 0.2)
        linear.bias.copy_(_bf16_exact(OUT, seed=1))
    layer = S2FTLinear.from_linear(linear, dim=dim, index=index).to(dtype)
    layer.block.data = layer.block.data.float()  # the master copy stays float32
    x64 = _bf16_exact(6, 7, IN, seed=2)
    dy64 = _bf16_exact(6, 7, OUT, seed=3)
    x = x64.to(dtype).requires_grad_()
    y = layer(x)
    y.backward(dy64.to(dtype))
    assert y.dtype == dtype and layer.block.grad.dtype == torch.float32 and x.grad.dtype == dtype

    block64 = layer.block.detach().double().requires_grad_()
    x_ref = x64.clone().requires_grad_()
    weight64 = layer.weight.detach().double().index_copy(dim, torch.tensor(index), block64)
    y_ref = F.linear(x_ref, weight64, layer.bias.double())
    y_ref.backward(dy64)
    torch.testing.assert_close(y.double(), y_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(x.grad.double(), x_ref.grad, **TOLERANCE[dtype])
    scale = block64.grad.abs().max()
    torch.testing.assert_close(layer.block.grad.double() / scale, block64.grad / scale, **TOLERANCE[dtype])


@pytest.mark.parametrize("support, block_size", [("random", 32), ("block", 8)])
def test_sltrain_float32_parameters_on_bfloat16_activations(support, block_size):
    layer = SLTrainLinear(IN, OUT, rank=4, sparsity=0.1, alpha=8.0, support=support, block_size=block_size, seed=1)
    with torch.no_grad():
        for p in layer.parameters():  # float32 master values that bfloat16 holds exactly
            p.copy_(_bf16_exact(*p.shape, seed=p.numel()).float() * 0.3)
    x64, dy64 = _bf16_exact(5, IN, seed=2), _bf16_exact(5, OUT, seed=3)
    x = x64.to(torch.bfloat16).requires_grad_()
    y = layer(x)  # float32 parameters, bfloat16 activations: no dtype mismatch
    y.backward(dy64.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in layer.parameters())

    params = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    rows, cols = layer.support_indices()
    sparse = torch.zeros(OUT, IN, dtype=torch.float64).index_put((rows, cols), params["values"])
    x_ref = x64.clone().requires_grad_()
    weight = params["B"] @ params["A"] * layer.scale + sparse
    y_ref = F.linear(x_ref, weight, params["bias"])
    y_ref.backward(dy64)
    tol = TOLERANCE[torch.bfloat16]
    # relative to each tensor's largest entry: the rank-r path rounds its (tokens x r) product to bfloat16
    # before the second GEMM, so entries that cancel carry an absolute, not a relative, error
    pairs = [("y", y, y_ref), ("dx", x.grad, x_ref.grad)]
    pairs += [(name, p.grad, params[name].grad) for name, p in layer.named_parameters()]
    for name, got, want in pairs:
        scale = want.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got.double() / scale, want / scale, **tol, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_a_bfloat16_model_with_float32_blocks_in_every_role_trains(arch):
    ratios = {"q": 0.5, "k": 0.5, "v": 0.5, "o": 0.5, "up": 0.1, "down": 0.1}
    if arch == "llama":
        ratios["gate"] = 0.1
    model = fxsparse.transform(tiny_model(arch).to(torch.bfloat16), "s2ft", ratios=ratios)
    layers = [m for m in model.modules() if isinstance(m, S2FTLinear)]
    assert {m.dim for m in layers} == {0, 1}
    for m in layers:
        m.block.data = m.block.data.float()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(m.block.grad).all() and m.block.grad.dtype == torch.float32
                                        for m in layers)
    merged = fxsparse.merge(model)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
