"""The gated-activation pass on dynamo graphs of tiny models: same function, one op per FFN, less saved."""

import pytest
import torch
from torch.nn import functional as F

import fxsparse
import fxsparse.codegen.gated_activation  # noqa: F401 - registers the op the pass inserts
from fxsparse.memory import SavedActivations
from fxsparse.models import tiny_model
from fxsparse.passes.compile_records import capture_graph, fusions
from fxsparse.passes.fuse_gated_activation import fuse_gated_activation

OP = torch.ops.fxsparse.gated_act_mul.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # every test compiles the same transformers forward again: start from empty dynamo caches so the
    # recompile limit of one test file never leaks into the next test
    torch._dynamo.reset()
    yield


def _ids():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _loss(gm, inputs):
    return next(o for o in gm(*inputs) if isinstance(o, torch.Tensor) and o.dim() == 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_full_finetuning_graph_keeps_its_function_and_saves_less(arch):
    torch.manual_seed(0)
    model = tiny_model(arch)
    x = _ids()
    params = list(model.parameters())
    ref = model(x, labels=x, use_cache=False).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    gm, inputs = capture_graph(model, x, labels=x, use_cache=False)
    with SavedActivations(exclude=inputs) as unfused:
        _loss(gm, inputs).backward()
    model.zero_grad(set_to_none=True)
    result = fuse_gated_activation(gm)

    layers = model.config.num_hidden_layers
    assert result.modified
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(OP) == layers and F.silu not in targets
    assert [f.status for f in fusions(gm)] == ["fused"] * layers
    with SavedActivations(exclude=inputs) as fused:
        loss = _loss(gm, inputs)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    for p, g in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    # act(gate) is no longer kept: one (tokens x intermediate) float32 tensor less per block
    assert unfused.bytes - fused.bytes == layers * x.numel() * model.config.intermediate_size * 4


def test_non_gated_ffn_has_no_candidate():
    model = tiny_model("gpt2")
    x = _ids()
    gm, _ = capture_graph(model, x, labels=x, use_cache=False)
    before = gm.code
    assert not fuse_gated_activation(gm).modified
    assert gm.code == before and fusions(gm) == []


def test_eager_fused_ffns_are_reported_as_found():
    # O trains, so every FFN input requires grad and dynamo keeps the eager autograd.Function as one node
    model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5, "down": 0.5})
    x = _ids()
    gm, _ = capture_graph(model, x, labels=x, use_cache=False)
    fuse_gated_activation(gm)
    assert [(f.status, f.where) for f in fusions(gm)] == [("found", "model.layers.0.mlp"),
                                                        ("found", "model.layers.1.mlp")]


@pytest.mark.parametrize("variant", ["act_reused", "broadcast", "gelu_none", "gelu_tanh"])
def test_only_exact_patterns_fuse(variant):
    def fn(gate, up, bias):
        if variant == "act_reused":
            act = F.silu(gate)
            return act * up + act
        if variant == "broadcast":
            return F.silu(gate) * bias
        return up * F.gelu(gate, approximate="none" if variant == "gelu_none" else "tanh")

    gate, up = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    bias = torch.randn(7)
    gm, inputs = capture_graph(fn, gate, up, bias)
    result = fuse_gated_activation(gm)
    torch.testing.assert_close(gm(*inputs)[0], fn(gate, up, bias))
    if variant in ("gelu_none", "gelu_tanh"):
        assert result.modified and fusions(gm)[0].detail.startswith(variant.replace("_none", ""))
    else:
        assert not result.modified and fusions(gm)[0].status == "skipped"
