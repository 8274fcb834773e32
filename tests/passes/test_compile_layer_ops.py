"""The layer check: in a compiled S²FT / SLTrain model every such layer is exactly one fxsparse op."""

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.layers.s2ft import S2FTLinear
from fxsparse.layers.sltrain import SLTrainLinear
from fxsparse.models import tiny_model
from fxsparse.passes.compile_layer_ops import check_layer_ops
from fxsparse.passes.compile_records import capture_graph, fusions, module_types


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # every test compiles the same transformers forward again: start from empty dynamo caches so the
    # recompile limit of one test file never leaks into the next test
    torch._dynamo.reset()
    yield


def _ids():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _layer_nodes(gm, cls_name):
    """module path -> call nodes inside that layer."""
    layers = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            for path, cls in module_types(node):
                if cls == cls_name:
                    layers.setdefault(path, []).append(node)
    return layers


def _is_fxsparse(node):
    return str(node.target).startswith("fxsparse.")


def _check(model, cls, cls_name, fusion_name):
    x = _ids()
    gm, _ = capture_graph(model, x, labels=x, use_cache=False)
    before = gm.code
    result = check_layer_ops(gm)
    assert not result.modified and gm.code == before  # a check, never a rewrite
    expected = sorted(name for name, m in model.named_modules() if isinstance(m, cls))
    assert expected
    layers = _layer_nodes(gm, cls_name)
    assert sorted(layers) == expected
    for nodes in layers.values():
        # exactly one fxsparse op per layer, and no separate product beside it
        assert sum(_is_fxsparse(n) for n in nodes) == 1
        assert not any(n.target in (torch._C._nn.linear, torch.matmul, torch.mm, torch.addmm) for n in nodes)
    records = fusions(gm)
    assert sorted(f.where for f in records) == expected
    assert {(f.pass_name, f.status) for f in records} == {(fusion_name, "found")}


def test_s2ft_layers_are_one_split_gemm_op_each():
    model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5, "down": 0.25, "v": 0.5})
    _check(model, S2FTLinear, "S2FTLinear", "s2ft_split_gemm")


def test_sltrain_layers_are_one_lowrank_sparse_op_each():
    torch.manual_seed(0)
    model = fxsparse.transform(tiny_model("llama"), "sltrain", rank=4, sparsity=0.05)
    _check(model, SLTrainLinear, "SLTrainLinear", "sltrain_lowrank_sparse")


def test_a_layer_written_as_separate_products_is_reported():
    class S2FTLinear(nn.Module):  # the name the check looks for, written as two separate products
        def __init__(self):
            super().__init__()
            self.frozen, self.block = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.frozen(x) + self.block(x)

    gm, _ = capture_graph(nn.Sequential(S2FTLinear()), torch.randn(2, 4))
    check_layer_ops(gm)
    (record,) = fusions(gm)
    assert record.status == "skipped" and "2 separate products" in record.detail
