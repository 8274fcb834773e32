"""The sibling-projection pass: frozen Q/K/V and gate/up become one GEMM each; same function."""

import pytest
import torch
from torch import nn

from fxsparse.models import tiny_model
from fxsparse.passes.compile_records import capture_graph, fusions
from fxsparse.passes.fuse_sibling_linears import CONCAT_INPUTS, fuse_sibling_linears, with_concat_inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # every test compiles the same transformers forward again: start from empty dynamo caches so the
    # recompile limit of one test file never leaks into the next test
    torch._dynamo.reset()
    yield


def _ids():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _frozen_projections(arch):
    """A tiny model whose linear weights are frozen and whose norms train (so gradients flow)."""
    torch.manual_seed(0)
    model = tiny_model(arch)
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)
    return model


def _linears(gm):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear)


def _loss(fn, inputs):
    return next(o for o in fn(*inputs) if isinstance(o, torch.Tensor) and o.dim() == 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_frozen_projections_merge_and_the_function_is_unchanged(arch):
    model = _frozen_projections(arch)
    x = _ids()
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(x, labels=x, use_cache=False).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    gm, inputs = capture_graph(model, x, labels=x, use_cache=False)
    linears_before = _linears(gm)
    result = fuse_sibling_linears(gm)

    layers = model.config.num_hidden_layers
    assert result.modified
    # per block: q, k, v -> one; gate, up -> one; o, down and the head stay
    assert _linears(gm) == linears_before - 3 * layers
    assert [f.status for f in fusions(gm)] == ["fused"] * (2 * layers)
    biases = arch == "qwen2"  # Qwen2's q/k/v carry biases: they are concatenated too
    assert len(gm.meta[CONCAT_INPUTS]) == 2 * layers + int(biases) * layers
    run = with_concat_inputs(gm.forward, gm)
    loss = _loss(run, inputs)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    for p, g in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)

    # a frozen weight changed in place: the concatenation is rebuilt, the result follows
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(-1.5)
        model.model.layers[1].mlp.up_proj.weight.add_(0.1)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(_loss(run, inputs).detach(), model(x, labels=x, use_cache=False).loss.detach(),
                               rtol=1e-6, atol=1e-6)


def test_trainable_projections_are_left_alone():
    model = tiny_model("llama")
    x = _ids()
    gm, _ = capture_graph(model, x, labels=x, use_cache=False)
    before = gm.code
    assert not fuse_sibling_linears(gm).modified
    assert gm.code == before
    assert {f.status for f in fusions(gm)} == {"skipped"}
    assert all("trains" in f.detail for f in fusions(gm))


def test_a_reader_that_needs_a_fresh_tensor_keeps_the_group_apart():
    q, k = nn.Linear(4, 6).requires_grad_(False), nn.Linear(4, 5).requires_grad_(False)

    def fn(x):
        return q(x).view(-1), k(x)  # flattening a column slice of the merged output would fail

    x = torch.randn(2, 3, 4)
    gm, inputs = capture_graph(fn, x)
    assert not fuse_sibling_linears(gm).modified
    assert "replacement failed" in fusions(gm)[0].detail
    torch.testing.assert_close(gm(*inputs)[0], fn(x)[0])


def test_mixed_bias_groups_are_left_alone():
    q, k = nn.Linear(4, 6).requires_grad_(False), nn.Linear(4, 5, bias=False).requires_grad_(False)
    gm, _ = capture_graph(lambda x: q(x).sum() + k(x).sum(), torch.randn(3, 4))
    assert not fuse_sibling_linears(gm).modified
    assert "bias" in fusions(gm)[0].detail
