"""S2FTLinear: function preservation, exact gradients, what backward saves, merge-back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.layers.s2ft import S2FTLinear, s2ft_linear
from fxsparse.memory import saved_activation_bytes
from fxsparse.models import tiny_model

# Index sets: contiguous (slice path) and scattered (gather path), for rows and columns.
IN_FEATURES, OUT_FEATURES = 42, 24
INDEXES = {
    "contiguous": [5, 6, 7, 8, 9],
    "gathered": [17, 1, 23, 6],
}


def _linear(bias: bool, dtype=torch.float64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias, dtype=dtype)


def _dense_reference(layer: S2FTLinear, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Autograd through an explicitly masked dense weight: frozen part + block scattered back."""
    dense = layer.weight.detach().index_copy(layer.dim, layer.index, block)
    return nn.functional.linear(x, dense, None if layer.bias is None else layer.bias.detach())


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("kind", list(INDEXES))
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_original_float32(dim, kind, bias):
    linear = _linear(bias, dtype=torch.float32)
    layer = S2FTLinear.from_linear(linear, dim, INDEXES[kind])
    x = torch.randn(3, 7, IN_FEATURES)
    expected = linear(x)
    got = layer(x)
    rel = (got - expected).norm() / expected.norm()
    assert rel.item() < 1e-6
    assert (layer._span is not None) == (kind == "contiguous")


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("kind", list(INDEXES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(11,), (2, 5)])
def test_gradients_match_dense_masked_reference_float64(dim, kind, bias, shape):
    layer = S2FTLinear.from_linear(_linear(bias), dim, INDEXES[kind])
    torch.manual_seed(1)
    x = torch.randn(*shape, IN_FEATURES, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(*shape, OUT_FEATURES, dtype=torch.float64)

    y = layer(x)
    dx, dblock = torch.autograd.grad(y, (x, layer.block), grad_out)

    block_ref = layer.block.detach().clone().requires_grad_(True)
    y_ref = _dense_reference(layer, x, block_ref)
    dx_ref, dblock_ref = torch.autograd.grad(y_ref, (x, block_ref), grad_out)

    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dblock, dblock_ref)
    assert layer.weight.grad is None


@pytest.mark.parametrize("dim", [0, 1])
def test_trainable_bias_gradient(dim):
    layer = S2FTLinear.from_linear(_linear(True), dim, INDEXES["gathered"])
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 3, IN_FEATURES, dtype=torch.float64)
    grad_out = torch.randn(4, 3, OUT_FEATURES, dtype=torch.float64)
    (dbias,) = torch.autograd.grad(layer(x), (layer.bias,), grad_out)
    torch.testing.assert_close(dbias, grad_out.sum((0, 1)))


def test_torch_autograd_gradcheck():
    layer = S2FTLinear.from_linear(nn.Linear(6, 5, dtype=torch.float64), 1, [1, 4])
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    block = layer.block.detach().clone().requires_grad_(True)
    fn = lambda x_, b_: s2ft_linear(x_, layer.weight, layer.bias, b_, layer.index, 1, layer._span)
    assert torch.autograd.gradcheck(fn, (x, block))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [0, 1])
def test_low_precision_dtypes_are_as_accurate_as_dense_autograd(dtype, dim):
    """In float32/bfloat16 the S²FT path is no less accurate than the plain dense layer in that dtype.

    Both are measured against float64 on the same rounded inputs and weights; S²FT may lose at most a
    factor 2 in norm-wise error (it rounds the frozen and the block part separately).
    """
    linear = _linear(True).to(dtype)
    layer = S2FTLinear.from_linear(linear, dim, INDEXES["contiguous"])
    torch.manual_seed(2)
    x = torch.randn(2, 6, IN_FEATURES, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, 6, OUT_FEATURES, dtype=dtype)

    y = layer(x)
    dx, dblock = torch.autograd.grad(y, (x, layer.block), grad_out)
    assert y.dtype == dx.dtype == dblock.dtype == dtype
    y_dense = linear(x)
    dx_dense, dw_dense = torch.autograd.grad(y_dense, (x, linear.weight), grad_out)

    linear64 = _linear(True).to(dtype).double()
    x64 = x.detach().double().requires_grad_(True)
    y64 = linear64(x64)
    dx64, dw64 = torch.autograd.grad(y64, (x64, linear64.weight), grad_out.double())
    dblock64 = dw64.index_select(dim, layer.index)
    dblock_dense = dw_dense.index_select(dim, layer.index)

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    for ours, dense, exact in [(y, y_dense, y64), (dx, dx_dense, dx64), (dblock, dblock_dense, dblock64)]:
        assert err(ours, exact) <= 2 * err(dense, exact) + torch.finfo(dtype).eps


@pytest.mark.parametrize("dim", [0, 1])
def test_cpu_autocast_bfloat16(dim):
    """Under autocast the layer computes in bfloat16 like nn.Linear, and is no less accurate than it."""
    linear = _linear(True, dtype=torch.float32)
    layer = S2FTLinear.from_linear(linear, dim, INDEXES["gathered"])
    torch.manual_seed(5)
    x = torch.randn(3, 4, IN_FEATURES, requires_grad=True)
    grad_out = torch.randn(3, 4, OUT_FEATURES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_dense = layer(x), linear(x)
    assert y.dtype == y_dense.dtype == torch.bfloat16
    dx, dblock = torch.autograd.grad(y, (x, layer.block), grad_out.to(y.dtype))
    dx_dense, dw_dense = torch.autograd.grad(y_dense, (x, linear.weight), grad_out.to(y.dtype))
    assert dx.dtype == torch.float32 and dblock.dtype == torch.float32

    ref = _linear(True, dtype=torch.float64)
    x64 = x.detach().double().requires_grad_(True)
    dx64, dw64 = torch.autograd.grad(ref(x64), (x64, ref.weight), grad_out.to(torch.bfloat16).double())
    y64 = ref(x64)

    def err(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    eps = torch.finfo(torch.bfloat16).eps
    assert err(y, y64) <= 2 * err(y_dense, y64) + eps
    assert err(dx, dx64) <= 2 * err(dx_dense, dx64) + eps
    dblock64 = dw64.index_select(dim, layer.index)
    assert err(dblock, dblock64) <= 2 * err(dw_dense.index_select(dim, layer.index), dblock64) + eps


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("kind", list(INDEXES))
def test_saved_for_backward_is_exactly_what_the_block_needs(dim, kind):
    layer = S2FTLinear.from_linear(_linear(True), dim, INDEXES[kind])
    x = torch.randn(3, 8, IN_FEATURES, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters()) + list(layer.buffers())  # model state, saved by reference
    k = len(INDEXES[kind])
    saved = saved_activation_bytes(lambda: layer(x), exclude=params)
    expected = x.numel() // IN_FEATURES * k * x.element_size() if dim == 1 else x.numel() * x.element_size()
    assert saved == expected

    layer.block.requires_grad_(False)
    assert saved_activation_bytes(lambda: layer(x), exclude=params) == 0


def test_column_slice_saved_does_not_keep_input_alive():
    layer = S2FTLinear.from_linear(_linear(False), 1, INDEXES["contiguous"])
    x = torch.randn(4, IN_FEATURES, dtype=torch.float64)
    y = layer(x)
    x_storage = x.untyped_storage().data_ptr()
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert all(t.untyped_storage().data_ptr() != x_storage for t in saved)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("kind", list(INDEXES))
def test_only_selected_entries_change_after_step_and_to_linear(dim, kind):
    linear = _linear(True)
    layer = S2FTLinear.from_linear(linear, dim, INDEXES[kind])
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(5, IN_FEATURES, dtype=torch.float64)
    layer(x).square().sum().backward()
    optimizer.step()

    merged = layer.to_linear()
    assert type(merged) is nn.Linear and merged.weight.shape == linear.weight.shape
    changed = merged.weight.detach() != linear.weight.detach()
    mask = torch.zeros_like(changed)
    if dim == 0:
        mask[INDEXES[kind], :] = True
    else:
        mask[:, INDEXES[kind]] = True
    assert torch.equal(changed, mask)
    torch.testing.assert_close(merged.bias, linear.bias, rtol=0, atol=0)
    torch.testing.assert_close(merged(x), layer(x))


def test_gradient_accumulation_over_half_batches_equals_full_batch():
    layer = S2FTLinear.from_linear(_linear(True), 1, INDEXES["gathered"])
    x = torch.randn(8, 3, IN_FEATURES, dtype=torch.float64)
    target = torch.randn(8, 3, OUT_FEATURES, dtype=torch.float64)
    loss = lambda xs, ts: (layer(xs) - ts).square().sum()
    loss(x, target).backward()
    full = layer.block.grad.clone()
    layer.block.grad = None
    loss(x[:4], target[:4]).backward()
    loss(x[4:], target[4:]).backward()
    torch.testing.assert_close(layer.block.grad, full)


def test_conv1d_round_trip():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(OUT_FEATURES, IN_FEATURES).double()
    nn.init.normal_(conv.bias)
    layer = S2FTLinear.from_linear(conv, 0, INDEXES["gathered"])
    assert layer.weight.shape == (OUT_FEATURES, IN_FEATURES)
    x = torch.randn(2, 3, IN_FEATURES, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x))
    with torch.no_grad():
        layer.block.add_(1.0)
    back = layer.to_linear()
    assert type(back) is Conv1D and back.weight.shape == conv.weight.shape == (IN_FEATURES, OUT_FEATURES)
    torch.testing.assert_close(back(x), layer(x))


def test_state_dict_round_trip_refreshes_span():
    source = S2FTLinear.from_linear(_linear(True), 1, [3, 4, 5])
    target = S2FTLinear(IN_FEATURES, OUT_FEATURES, 1, [0, 10, 20], dtype=torch.float64)
    assert target._span is None
    # a state dict written before the plan was recorded (no origin/base_sha256) is adopted as it is
    old = {k: v for k, v in source.state_dict().items() if k not in ("origin", "base_sha256")}
    target.load_state_dict(old)
    assert target._span == (3, 6)
    assert target._sel.tolist() == [3, 4, 5]
    assert target._rest.tolist() == [i for i in range(IN_FEATURES) if not 3 <= i < 6]
    x = torch.randn(2, IN_FEATURES, dtype=torch.float64)
    torch.testing.assert_close(target(x), source(x))
    assert set(source.state_dict()) == {"weight", "bias", "block", "index", "origin", "base_sha256"}


@pytest.mark.parametrize(
    "dim, index, match",
    [(2, [0], "dim"), (1, [], "empty"), (1, [0, IN_FEATURES], str(IN_FEATURES)), (0, [1, 1], "duplicate"),
     (0, [1.5], "1.5"), (0, [-1], "-1")],
)
def test_bad_input_raises_value_error(dim, index, match):
    with pytest.raises(ValueError, match=match):
        S2FTLinear.from_linear(_linear(False), dim, index)


def test_unfrozen_weight_is_rejected():
    layer = S2FTLinear.from_linear(_linear(False), 1, [0])
    layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="requires_grad"):
        layer(torch.randn(2, IN_FEATURES, dtype=torch.float64))


@pytest.mark.parametrize("dim, kind", [(1, "contiguous"), (0, "gathered")])
def test_torch_compile_fullgraph(dim, kind):
    layer = S2FTLinear.from_linear(_linear(True, dtype=torch.float32), dim, INDEXES[kind])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, IN_FEATURES, requires_grad=True)
    y_eager = layer(x)
    dx_eager, db_eager = torch.autograd.grad(y_eager.sum(), (x, layer.block))
    y = compiled(x)
    dx, db = torch.autograd.grad(y.sum(), (x, layer.block))
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(dx, dx_eager)
    torch.testing.assert_close(db, db_eager)


def test_compiled_s2ft_model_fullgraph_matches_eager():
    """torch.compile (inductor) of a model with S²FT rows (v, up) and columns (o, down): one graph, the
    fxsparse ops in it, loss and block gradients as in eager."""
    model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5, "down": 0.2, "v": 0.5, "up": 0.2})
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    explanation = torch._dynamo.explain(model)(ids, labels=ids)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    targets = [node.target for node in explanation.graphs[0].graph.nodes]
    layers = sum(isinstance(m, S2FTLinear) for m in model.modules())
    assert layers == 7 and targets.count(torch.ops.fxsparse.s2ft_linear) == layers  # every layer in the graph
    params = fxsparse.trainable_parameters(model)
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch._dynamo.reset()
    loss = torch.compile(model, fullgraph=True)(ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - eager_loss.item()) <= 1e-4 * abs(eager_loss.item())
    for p, expected in zip(params, eager_grads):
        assert ((p.grad - expected).norm() / expected.norm()).item() < 1e-4


@pytest.mark.parametrize("role", ["o_proj", "up_proj"])
def test_output_can_be_updated_in_place_with_the_same_gradients(role):
    """``y += residual`` on a layer's output (Falcon's block does it) works under autograd, gradients unchanged."""
    import fxsparse
    from fxsparse.models import tiny_model

    torch.manual_seed(0)
    model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5, "down": 0.5, "up": 0.5}).double()
    path = f"model.layers.0.self_attn.{role}" if role == "o_proj" else f"model.layers.0.mlp.{role}"
    layer = model.get_submodule(path)
    x = torch.randn(2, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 5, layer.out_features, dtype=torch.float64)
    y = layer(x)
    y += residual
    (y * y).sum().backward()
    in_place = (x.grad.clone(), layer.block.grad.clone())
    x.grad = None
    layer.block.grad = None
    z = layer(x) + residual
    (z * z).sum().backward()
    torch.testing.assert_close(in_place[0], x.grad, rtol=0, atol=0)
    torch.testing.assert_close(in_place[1], layer.block.grad, rtol=0, atol=0)
