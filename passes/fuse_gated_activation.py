"""Compiler pass: gated activation ``act(gate) * up`` → ``fxsparse::gated_act_mul`` (saves gate and up only).

Matches, in the torch-level graph dynamo hands a ``torch.compile`` backend, a product of two tensors of the
same shape and dtype where one factor is ``silu(gate)``, ``gelu(gate)`` or ``gelu(gate, approximate="tanh")``
read by nothing else: the gated FFN of LLaMA, Qwen2, Mistral, Gemma (``act(gate_proj(x)) * up_proj(x)``)
and Phi-3 (``up * act(gate)`` on the two halves of ``gate_up_proj``). The replacement
``fxsparse::gated_act_mul(gate, up, activation)`` computes the same values and keeps only ``gate`` and ``up``
for backward (the eager ``RecomputingGatedFFN`` module does the same for transformed models; this pass gives
the saving to models that were not transformed, e.g. full fine-tuning or LoRA).

Gated FFNs already handled in eager (an ``autograd_function_apply`` inside a ``RecomputingGatedFFN``) are recorded
as ``found``; a product whose activation output is also read elsewhere, or whose factors differ in shape
(broadcasting) or dtype, is recorded as skipped and left alone.

>>> import torch
>>> from torch.nn import functional as F
>>> from fxsparse.passes.compile_records import fusions
>>> graphs = []
>>> def backend(gm, example_inputs):
...     fuse_gated_activation(gm)
...     graphs.append(gm)
...     return gm.forward
>>> fn = lambda g, u: F.silu(g) * u
>>> g, u = torch.randn(3, 5), torch.randn(3, 5)
>>> torch.equal(torch.compile(fn, backend=backend)(g, u), fn(g, u))
True
>>> [f.status for f in fusions(graphs[0])]
['fused']
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.nn import functional as F

from fxsparse.passes.compile_records import (
    FOUND,
    FUSED,
    SKIPPED,
    Fusion,
    Rewrite,
    erase_unused,
    example_value,
    fake_mode_of,
    finish,
    module_path,
    module_types,
    record,
)
from fxsparse.passes.manager import PassResult, fxpass

__all__ = ["PASS_NAME", "fuse_gated_activation"]

PASS_NAME = "gated_activation"
_MUL_TARGETS = (operator.mul, torch.mul)
_ACT_TARGETS = (F.silu, F.gelu)
_EAGER_FUSED_MODULES = ("RecomputingGatedFFN", "FusedGatedFFN")


@fxpass(reads=("graph",), writes=("graph",))
def fuse_gated_activation(graph: fx.GraphModule) -> PassResult:
    """Replace every ``act(gate) * up`` of ``graph`` by ``fxsparse::gated_act_mul``; record each candidate."""
    gm = graph
    import fxsparse.codegen.gated_activation  # noqa: F401 - registers fxsparse::gated_act_mul

    fake_mode = fake_mode_of(gm)
    fused = skipped = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.higher_order.autograd_function_apply:
            owner = [path for path, cls in module_types(node) if cls in _EAGER_FUSED_MODULES]
            if owner:
                record(gm, Fusion(PASS_NAME, owner[-1], FOUND, "already recomputed in eager (RecomputingGatedFFN)"))
            continue
        if not (node.op == "call_function" and node.target in _MUL_TARGETS and len(node.args) == 2 and not node.kwargs):
            continue
        match = _match(node)
        if match is None:
            continue
        if isinstance(match, str):
            record(gm, Fusion(PASS_NAME, module_path(node), SKIPPED, match))
            skipped += 1
            continue
        act_node, up, code = match
        rw = Rewrite(gm, node, fake_mode)
        try:
            new = rw.call_function(torch.ops.fxsparse.gated_act_mul.default, (act_node.args[0], up, code))
        except Exception as exc:  # noqa: BLE001 - a replacement that does not type-check leaves the graph alone
            rw.undo()
            record(gm, Fusion(PASS_NAME, module_path(node), SKIPPED, f"replacement failed: {exc}"))
            skipped += 1
            continue
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        erase_unused([act_node])
        record(gm, Fusion(PASS_NAME, module_path(new) or module_path(act_node), FUSED,
                          f"{('silu', 'gelu', 'gelu_tanh')[code]}(gate) * up"))
        fused += 1
    finish(gm, fused > 0)
    return PassResult(fused > 0, f"fused {fused}, skipped {skipped}", outputs={"graph": gm})


def _activation_code(node: object) -> int | None:
    """0 silu, 1 gelu, 2 gelu tanh for an activation call on one tensor, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _ACT_TARGETS:
        return None
    if len(node.args) != 1:
        return None
    if node.target is F.gelu:
        extra = set(node.kwargs) - {"approximate"}
        approximate = node.kwargs.get("approximate", "none")
        if extra or approximate not in ("none", "tanh"):
            return None
        return 1 if approximate == "none" else 2
    if node.kwargs.get("inplace", False) or set(node.kwargs) - {"inplace"}:
        return None
    return 0


def _match(mul: fx.Node) -> tuple[fx.Node, fx.Node, int] | str | None:
    """(activation node, up, code), a reason to skip, or None when this product is no candidate."""
    a, b = mul.args
    for act_node, up in ((a, b), (b, a)):
        code = _activation_code(act_node)
        if code is None:
            continue
        if not isinstance(up, fx.Node):
            return None
        if len(act_node.users) != 1:
            return "the activation output is read elsewhere too"
        gate_val, up_val, act_val = example_value(act_node.args[0]), example_value(up), example_value(act_node)
        if gate_val is None or up_val is None or act_val is None:
            return "no example values on the graph (not a dynamo graph?)"
        if not _same_shape(gate_val, up_val) or gate_val.dtype != up_val.dtype or act_val.dtype != gate_val.dtype:
            return f"gate {tuple(gate_val.shape)} {gate_val.dtype} and up {tuple(up_val.shape)} {up_val.dtype} differ"
        if not gate_val.dtype.is_floating_point:
            return "non-float gate"
        return act_node, up, code
    return None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, symbolic sizes compared by identity/expression (never guarded on)."""
    if a.dim() != b.dim():
        return False
    return all(x is y or str(x) == str(y) for x, y in zip(a.shape, b.shape))
