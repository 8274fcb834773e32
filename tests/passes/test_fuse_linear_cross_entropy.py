"""The LM head + cross-entropy pass on dynamo graphs of tiny models: same loss and gradients, one fused op."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxsparse.compile  # noqa: F401 - lets dynamo skip transformers' warning_once (GPT-2's loss property)
from fxsparse.codegen import cross_entropy as ce
from fxsparse.models import tiny_model
from fxsparse.passes.compile_records import capture_graph, fusions
from fxsparse.passes.fuse_linear_cross_entropy import fuse_linear_cross_entropy

OP = torch.ops.fxsparse.linear_cross_entropy.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # every test compiles the same transformers forward again: start from empty dynamo caches so the
    # recompile limit of one test file never leaks into the next test
    torch._dynamo.reset()
    yield


def _ids(seed=0):
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _fused_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is OP]


def _loss(gm, inputs):
    outputs = gm(*inputs)
    return next(o for o in outputs if isinstance(o, torch.Tensor) and o.dim() == 0)


def _eager(model, x, **kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(x, labels=x, use_cache=False, **kwargs).loss
    loss.backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    return loss.detach(), params, grads


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "phi3"])
@pytest.mark.parametrize("head", ["frozen", "trained"])
def test_loss_and_gradients_unchanged(arch, head):
    torch.manual_seed(0)
    model = tiny_model(arch)
    model.get_output_embeddings().weight.requires_grad_(head == "trained")
    x = _ids()
    ref_loss, params, ref_grads = _eager(model, x)

    gm, inputs = capture_graph(model, x, labels=x, use_cache=False)
    assert F.cross_entropy in _targets(gm)
    result = fuse_linear_cross_entropy(gm)

    assert result.modified
    assert F.cross_entropy not in _targets(gm)
    (node,) = _fused_nodes(gm)
    grad_mode = node.args[6]
    assert grad_mode == (ce.GRAD_RECOMPUTE if head == "trained" else ce.GRAD_IN_FORWARD)
    assert node.args[7] is True  # the model returns its logits: the op writes them out
    head_weight = model.get_output_embeddings().weight
    head_index = next(i for i, t in enumerate(inputs) if t is head_weight)
    head_input = [n for n in gm.graph.nodes if n.op == "placeholder"][head_index]
    assert [u.target for u in head_input.users if u.op == "call_function"].count(torch._C._nn.linear) == 0
    assert [(f.status, f.where) for f in fusions(gm)] == [("fused", "lm_head")]

    loss = _loss(gm, inputs)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
    for p, g in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_num_items_in_batch_uses_the_sum_reduction():
    model = tiny_model("llama")
    x = _ids(1)
    items = torch.tensor(17)
    ref_loss, params, ref_grads = _eager(model, x, num_items_in_batch=items)
    gm, inputs = capture_graph(model, x, labels=x, use_cache=False, num_items_in_batch=items)
    fuse_linear_cross_entropy(gm)
    (node,) = _fused_nodes(gm)
    assert node.args[5] is True  # sum reduction; the division by num_items_in_batch stays in the graph
    loss = _loss(gm, inputs)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
    for p, g in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_unused_logits_are_not_written_and_no_grad_needs_no_gradient():
    head = nn.Linear(8, 11)

    def loss_only(h, y):
        return F.cross_entropy(head(h).view(-1, 11), y.view(-1), reduction="sum")

    h, y = torch.randn(2, 5, 8), torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        gm, inputs = capture_graph(loss_only, h, y)
    fuse_linear_cross_entropy(gm)
    (node,) = _fused_nodes(gm)
    assert node.args[6] == ce.GRAD_NONE and node.args[7] is False
    torch.testing.assert_close(gm(*inputs)[0], loss_only(h, y))


@pytest.mark.parametrize("variant", ["label_smoothing", "class_weights", "reduction_none", "other_op"])
def test_patterns_that_differ_are_left_alone_and_reported(variant):
    head = nn.Linear(8, 11)
    weights = torch.rand(11)

    def fn(h, y):
        logits = head(h)
        if variant == "other_op":
            logits = logits * 2.0
        kwargs = {"label_smoothing": 0.1} if variant == "label_smoothing" else \
            {"weight": weights} if variant == "class_weights" else \
            {"reduction": "none"} if variant == "reduction_none" else {}
        return F.cross_entropy(logits.view(-1, 11), y.view(-1), **kwargs)

    h, y = torch.randn(2, 5, 8, requires_grad=True), torch.randint(0, 11, (2, 5))
    gm, inputs = capture_graph(fn, h, y)
    before = gm.code
    result = fuse_linear_cross_entropy(gm)
    assert not result.modified and gm.code == before
    (record,) = fusions(gm)
    assert record.status == "skipped" and record.detail


def test_autocast_is_left_alone():
    head = nn.Linear(8, 11)

    def fn(h, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(h)
        return F.cross_entropy(logits.float().view(-1, 11), y.view(-1))

    gm, _ = capture_graph(fn, torch.randn(2, 5, 8, requires_grad=True), torch.randint(0, 11, (2, 5)))
    assert not fuse_linear_cross_entropy(gm).modified
    assert "autocast" in fusions(gm)[0].detail


def test_config_controls_the_gradient_mode_and_chunks():
    model = tiny_model("llama")
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    x = _ids(2)
    gm, _ = capture_graph(model, x, labels=x, use_cache=False)
    fuse_linear_cross_entropy(gm, chunk_rows=8, grad_in_forward=False)
    (node,) = _fused_nodes(gm)
    assert node.args[6] == ce.GRAD_RECOMPUTE and node.args[8] == 8
    with pytest.raises(ValueError, match="chunk_rows"):
        fuse_linear_cross_entropy(gm, chunk_rows=-1)
