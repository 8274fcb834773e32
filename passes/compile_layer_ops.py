"""Compiler check: every S²FT / SLTrain layer in the compiled graph is one fused ``fxsparse::`` op.

The issue asked for two fusions in the backend: SLTrain's low-rank and sparse products of one layer into
the codegen fused op, and S²FT's frozen product plus block product into the codegen split GEMM. Both
layers already call those ops directly (``fxsparse.layers.s2ft`` → ``fxsparse::s2ft_linear``,
``fxsparse.layers.sltrain`` → ``fxsparse::sltrain_*_fwd``), so dynamo's graph holds one opaque op per layer
and there is nothing left to rewrite. This pass verifies that, layer by layer, and records it: ``found``
when a layer is exactly one ``fxsparse::`` op with no other matrix product under it, ``skipped`` (with
what it found instead) otherwise, e.g. a layer still written as separate products.

>>> import torch
>>> from fxsparse.layers.s2ft import S2FTLinear
>>> from fxsparse.passes.compile_records import fusions
>>> layer = S2FTLinear.from_linear(torch.nn.Linear(8, 6), dim=1, index=[2, 3])
>>> graphs = []
>>> def backend(gm, example_inputs):
...     check_layer_ops(gm)
...     graphs.append(gm)
...     return gm.forward
>>> _ = torch.compile(torch.nn.Sequential(layer), backend=backend)(torch.randn(3, 8))
>>> [(f.pass_name, f.status) for f in fusions(graphs[0])]
[('s2ft_split_gemm', 'found')]
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from fxsparse.passes.compile_records import FOUND, SKIPPED, Fusion, module_types, record
from fxsparse.passes.manager import PassResult, fxpass

__all__ = ["LAYER_CHECKS", "check_layer_ops"]

# layer class name -> name of the fusion the issue asked for
LAYER_CHECKS = {"S2FTLinear": "s2ft_split_gemm", "SLTrainLinear": "sltrain_lowrank_sparse"}
_PRODUCT_NAMES = ("linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "einsum", "addmm_", "mv", "sparse")


@fxpass(reads=("graph",), writes=())
def check_layer_ops(graph: fx.GraphModule) -> PassResult:
    """Record, for each S²FT/SLTrain layer in ``graph``, whether it is one fused op (never rewrites)."""
    gm = graph
    layers: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        for path, cls in reversed(module_types(node)):
            if cls in LAYER_CHECKS:
                layers.setdefault(path, (cls, []))[1].append(node)
                break
    found = skipped = 0
    for path, (cls, nodes) in layers.items():
        ops = [n for n in nodes if _is_fxsparse_op(n)]
        products = [n for n in nodes if _is_product(n)]
        wrapped = [n for n in nodes if n.target is torch.ops.higher_order.autograd_function_apply]
        if len(ops) == 1 and not products and not wrapped:
            record(gm, Fusion(LAYER_CHECKS[cls], path, FOUND, f"one op: {_op_name(ops[0])}"))
            found += 1
        else:
            parts = [f"{len(ops)} fxsparse ops"] + ([f"{len(products)} separate products"] if products else []) \
                + ([f"{len(wrapped)} autograd.Function"] if wrapped else [])
            record(gm, Fusion(LAYER_CHECKS[cls], path, SKIPPED, "not one fused op: " + ", ".join(parts)))
            skipped += 1
    return PassResult(False, f"{found} layers fused, {skipped} not")


def _is_fxsparse_op(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.startswith("fxsparse::")
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "fxsparse"


def _op_name(node: fx.Node) -> str:
    return str(node.target).replace(".default", "")


def _is_product(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _PRODUCT_NAMES
    if node.target is operator.matmul:
        return True
    name = getattr(node.target, "__name__", "") or ""
    return name in _PRODUCT_NAMES and not _is_fxsparse_op(node)
