"""What the ``torch.compile`` passes share: fusion records and small readers of dynamo's FX graph.

The compiler passes (``fuse_linear_cross_entropy``, ``fuse_gated_activation``, ``fuse_sibling_linears``,
``check_layer_ops``) rewrite the torch-level graph dynamo hands a backend. Each one records, for every
candidate it looked at, a :class:`Fusion` in ``graph_module.meta["fxsparse.fusions"]``: which pass, where
(the module path of the layer, as in ``model.named_modules()``), whether it fired, and why not when it did
not. ``fxsparse.compile_report`` collects these records.

>>> import torch
>>> from torch import fx
>>> gm = fx.symbolic_trace(torch.nn.Linear(2, 2))
>>> record(gm, Fusion("demo", "", "fused", "one"))
>>> [f.status for f in fusions(gm)]
['fused']
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import fx
from torch.nn import functional as F

__all__ = [
    "FUSED",
    "SKIPPED",
    "FOUND",
    "Fusion",
    "record",
    "fusions",
    "module_path",
    "example_value",
    "is_linear",
    "is_placeholder",
    "erase_unused",
    "fake_mode_of",
    "propagate",
    "fake_run",
    "Rewrite",
    "capture_graph",
    "quiet_transformers_once_warnings",
    "copy_graph_module",
    "finish",
]

FUSED, SKIPPED, FOUND = "fused", "skipped", "found"
_META_KEY = "fxsparse.fusions"
LINEAR_TARGETS = (torch._C._nn.linear, F.linear)


@dataclass(frozen=True)
class Fusion:
    """One candidate a pass looked at: ``status`` is ``fused``, ``skipped`` (with the reason in ``detail``)
    or ``found`` (already in the wanted form, nothing to do)."""

    pass_name: str
    where: str
    status: str
    detail: str = ""

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.pass_name}: {self.status} at {self.where or '<graph>'}{detail}"


def record(gm: fx.GraphModule, fusion: Fusion) -> None:
    """Append ``fusion`` to the graph module's records."""
    gm.meta.setdefault(_META_KEY, []).append(fusion)


def fusions(gm: fx.GraphModule) -> list[Fusion]:
    """The records the passes left on ``gm`` (empty if none ran)."""
    return list(gm.meta.get(_META_KEY, []))


# dynamo names the root module L['self'] (or L['args'][0] when the module is an argument, as under an
# OptimizedModule); submodules follow as attribute and index accesses.
_ROOT = re.compile(r"^(L|G)\[[^\]]+\](\[\d+\])?\.?")


def module_path(node: fx.Node) -> str:
    """The innermost module path of ``node`` (``model.layers.0.mlp``), ``""`` at the root or if unknown."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _ROOT.sub("", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path).replace("['", ".").replace("']", "")
    return path.strip(".")


def module_types(node: fx.Node) -> list[tuple[str, str]]:
    """(path, class name) of every module ``node`` is inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        name = getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1].rstrip("'>")
        clean = re.sub(r"\[(\d+)\]", r".\1", _ROOT.sub("", path)).replace("['", ".").replace("']", "").strip(".")
        out.append((clean, name))
    return out


def example_value(node: object) -> torch.Tensor | None:
    """The fake tensor dynamo recorded for ``node`` (``None`` for non-tensors and unknown nodes)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def linear_args(node: fx.Node) -> tuple[object, object, object]:
    """(input, weight, bias) of a linear call, whichever way they were passed."""
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return x, weight, bias


def is_placeholder(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder"


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def erase_unused(nodes: list[fx.Node]) -> None:
    """Erase those of ``nodes`` (pure ops the caller replaced) that no longer have users, and so on upwards.

    Never a graph-wide dead-code elimination: dynamo graphs hold in-place method calls whose results are
    unused, and those must stay.
    """
    candidates, erased = set(nodes), set()
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node in erased or node.users or node.op in ("placeholder", "output"):
            continue
        inputs = [n for n in node.all_input_nodes if n in candidates]
        node.graph.erase_node(node)
        erased.add(node)
        pending.extend(inputs)


def finish(gm: fx.GraphModule, modified: bool) -> None:
    """Lint and recompile ``gm`` after a rewrite (nothing to do when it was left alone)."""
    if modified:
        gm.graph.lint()
        gm.recompile()


def fake_mode_of(gm: fx.GraphModule):
    """The fake mode dynamo traced ``gm`` under (from any node's example value), or None."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        mode = getattr(value, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def propagate(node: fx.Node, fake_mode) -> None:
    """Compute ``node.meta["example_value"]`` from its inputs' example values under ``fake_mode``.

    Raises what the op raises: a rewrite calls this on each node it inserts, before wiring it in, so a
    replacement that does not type-check is found (and undone) without touching the rest of the graph.
    """
    node.meta["example_value"] = fake_run(node, fake_mode)


def fake_value(arg: object, substitute: dict | None = None) -> object:
    """What ``arg`` (a node argument) stands for when a node is re-run on fake tensors: the node's
    example value (or ``substitute[node]``), the submodule for a ``get_attr`` node, the constant itself."""
    if not isinstance(arg, fx.Node):
        return arg
    if substitute and arg in substitute:
        return substitute[arg]
    if arg.op == "get_attr":
        owner = arg.graph.owning_module
        target = owner
        for part in str(arg.target).split("."):
            target = getattr(target, part)
        return target
    return arg.meta.get("example_value", arg.meta.get("val"))


def fake_run(node: fx.Node, fake_mode, substitute: dict | None = None) -> object:
    """Run ``node``'s op on its inputs' fake values (``substitute`` overrides some inputs)."""
    args = fx.node.map_aggregate(node.args, lambda a: fake_value(a, substitute))
    kwargs = fx.node.map_aggregate(node.kwargs, lambda a: fake_value(a, substitute))
    with fake_mode:
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise ValueError(f"cannot run {node.op} node {node.name} on fake tensors")


class Rewrite:
    """Inserts new nodes before ``anchor``, giving each its example value as it goes (a replacement that
    does not type-check raises right there); :meth:`undo` erases them again while they have no users.

    >>> gm = fx.symbolic_trace(torch.nn.ReLU())
    >>> out = next(n for n in gm.graph.nodes if n.op == "output")
    >>> rw = Rewrite(gm, out, fake_mode=None)
    >>> node = rw.call_method("abs", (out.args[0],))
    >>> rw.undo(); node in gm.graph.nodes
    False
    """

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, fake_mode):
        self.gm, self.anchor, self.fake_mode = gm, anchor, fake_mode
        self.nodes: list[fx.Node] = []

    def _add(self, op: str, target, args, kwargs) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.create_node(op, target, tuple(args), dict(kwargs or {}))
        self.nodes.append(node)
        if self.fake_mode is not None:
            propagate(node, self.fake_mode)
        return node

    def call_function(self, target, args, kwargs=None) -> fx.Node:
        return self._add("call_function", target, args, kwargs)

    def call_method(self, name: str, args, kwargs=None) -> fx.Node:
        return self._add("call_method", name, args, kwargs)

    def undo(self) -> None:
        for node in reversed(self.nodes):
            if not node.users:
                self.gm.graph.erase_node(node)
        self.nodes = []


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node metadata shared shallowly, submodules shared).

    Backends rewrite this copy: dynamo still reads the graph it handed over (its placeholders' metadata)
    after the backend returns.
    """
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    result, old_output = graph.graph_copy(gm.graph, value_map, return_output_node=True)
    new_output = graph.output(result, type_expr=getattr(old_output, "type", None))
    new_output.meta = dict(old_output.meta)
    graph._codegen = gm.graph._codegen  # dynamo graphs flatten/unflatten their inputs through it
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    copy.meta.pop(_META_KEY, None)
    return copy


def capture_graph(fn, *args, **kwargs) -> tuple[fx.GraphModule, list]:
    """Dynamo's graph of ``fn(*args, **kwargs)`` (one graph, no break allowed) and its example inputs.

    Returns a copy of the graph module (safe to rewrite) and the flat inputs it takes: the tensors passed
    plus the parameters and buffers dynamo lifted. This is how the passes are tested on graphs alone.

    >>> gm, inputs = capture_graph(torch.nn.Linear(3, 2), torch.randn(4, 3))
    >>> [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch._C._nn.linear]
    True
    >>> gm(*inputs)[0].shape
    torch.Size([4, 2])
    """
    quiet_transformers_once_warnings()
    graphs: list[tuple[fx.GraphModule, list]] = []

    def backend(gm: fx.GraphModule, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args, **kwargs)
    gm, inputs = graphs[0]
    return copy_graph_module(gm), inputs


def quiet_transformers_once_warnings() -> None:
    """Let dynamo skip transformers' ``logger.warning_once`` instead of breaking the graph on it.

    GPT-2 (any model whose class name is not ``*ForCausalLM``) warns once from its loss property; dynamo
    cannot trace that call, so ``fullgraph=True`` would fail on the first labelled forward. The warning
    has already been printed by then in eager runs; compiled code skips it.
    """
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    once = getattr(hf_logging, "warning_once", None)
    if once is not None:
        torch._dynamo.config.ignore_logging_functions.add(once)
