"""Compiler pass: sibling projections with frozen weights → one GEMM over the concatenated weights.

Matches, in the torch-level graph dynamo hands a ``torch.compile`` backend, two or more ``linear`` calls
that read the *same* input node and whose weights (and biases) are graph inputs that do not require grad:
Q/K/V of an attention block, gate/up of a gated FFN, when those projections are frozen (S²FT trains O and
Down; a frozen base under LoRA is wrapped by PEFT and does not match). They become::

    y = linear(x, cat([Wq, Wk, Wv]), cat([bq, bk, bv]))
    q, k, v = y[..., :nq], y[..., nq:nq + nk], y[..., nq + nk:]

which is exact: every output element is the same dot product. The concatenated weight is a new graph
input (listed in ``graph_module.meta["fxsparse.concat_inputs"]``); the backend builds it from the
original weights when the compiled function is called, and rebuilds it only when one of them changed
(its identity, storage or version counter), so frozen weights cost one concatenation in total, at the
price of one extra copy of the fused frozen weights in memory.

Left alone (and recorded): weights that train (their gradient would have to be split again), mixed
bias/no-bias groups, autocast (the output dtype differs from the weight's), different dtypes.

>>> import torch
>>> from fxsparse.passes.compile_records import fusions
>>> q, k = torch.nn.Linear(4, 3).requires_grad_(False), torch.nn.Linear(4, 5).requires_grad_(False)
>>> from fxsparse.passes.compile_records import copy_graph_module
>>> graphs = []
>>> def backend(gm, example_inputs):
...     gm = copy_graph_module(gm)       # dynamo keeps reading the graph it handed over: rewrite a copy
...     fuse_sibling_linears(gm)
...     graphs.append(gm)
...     return with_concat_inputs(gm.forward, gm)
>>> fn = lambda x: q(x) * 2 + k(x)[..., :3]
>>> x = torch.randn(2, 4)
>>> torch.allclose(torch.compile(fn, backend=backend)(x), fn(x))
True
>>> [f.status for f in fusions(graphs[0])], len(graphs[0].meta["fxsparse.concat_inputs"])
(['fused'], 2)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from fxsparse.passes.compile_records import (
    FUSED,
    SKIPPED,
    Fusion,
    Rewrite,
    example_value,
    fake_mode_of,
    fake_run,
    finish,
    is_linear,
    is_placeholder,
    linear_args,
    module_path,
    record,
)
from fxsparse.passes.manager import PassResult, fxpass

__all__ = ["PASS_NAME", "CONCAT_INPUTS", "ConcatInput", "ConcatInputBuilder", "fuse_sibling_linears",
           "with_concat_inputs"]

PASS_NAME = "sibling_linears"
CONCAT_INPUTS = "fxsparse.concat_inputs"


@dataclass(frozen=True)
class ConcatInput:
    """A graph input the caller must supply: ``torch.cat`` of the inputs named ``sources`` along dim 0."""

    name: str
    sources: tuple[str, ...]


@fxpass(reads=("graph",), writes=("graph",))
def fuse_sibling_linears(graph: fx.GraphModule) -> PassResult:
    """Merge frozen sibling projections of ``graph`` into one linear each; record each group."""
    gm = graph
    fake_mode = fake_mode_of(gm)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if is_linear(node):
            x = linear_args(node)[0]
            if isinstance(x, fx.Node):
                groups.setdefault(x, []).append(node)
    fused = skipped = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        where = _where(members)
        reason = _check(members)
        if reason:
            record(gm, Fusion(PASS_NAME, where, SKIPPED, reason))
            skipped += 1
            continue
        widths = [example_value(linear_args(m)[1]).shape[0] for m in members]
        error = _rewrite(gm, members, fake_mode)
        if error:
            record(gm, Fusion(PASS_NAME, where, SKIPPED, error))
            skipped += 1
        else:
            record(gm, Fusion(PASS_NAME, where, FUSED, f"{len(members)} projections, widths {widths}"))
            fused += 1
    finish(gm, fused > 0)
    return PassResult(fused > 0, f"fused {fused}, skipped {skipped}", outputs={"graph": gm})


def _where(members: list[fx.Node]) -> str:
    paths = [module_path(m) for m in members]
    parent = paths[0].rpartition(".")[0]
    names = ", ".join(p.rpartition(".")[2] or p for p in paths)
    return f"{parent}.{{{names}}}" if parent and all(p.startswith(parent + ".") for p in paths) else ", ".join(paths)


def _check(members: list[fx.Node]) -> str:
    """Why ``members`` cannot merge ("" when they can)."""
    first_w = example_value(linear_args(members[0])[1])
    has_bias = [linear_args(m)[2] is not None for m in members]
    if any(has_bias) and not all(has_bias):
        return "some projections have a bias and some do not"
    for m in members:
        _, weight, bias = linear_args(m)
        w_val, out_val = example_value(weight), example_value(m)
        if not is_placeholder(weight) or (bias is not None and not is_placeholder(bias)):
            return "a weight or bias is computed in the graph, not a parameter input"
        if w_val is None or out_val is None or w_val.dim() != 2:
            return "no example values on the graph (not a dynamo graph?)"
        if w_val.requires_grad or (bias is not None and example_value(bias).requires_grad):
            return "a weight or bias trains (only frozen projections merge)"
        if w_val.dtype != first_w.dtype or w_val.device != first_w.device or w_val.shape[1] != first_w.shape[1]:
            return "weights differ in dtype, device or input width"
        if out_val.dtype != w_val.dtype:
            return "autocast (output dtype differs from the weight's)"
        if not all(isinstance(d, int) for d in w_val.shape):
            return "dynamic shapes"
    return ""


def _rewrite(gm: fx.GraphModule, members: list[fx.Node], fake_mode) -> str:
    graph = gm.graph
    x = linear_args(members[0])[0]
    weights = [linear_args(m)[1] for m in members]
    biases = [linear_args(m)[2] for m in members]
    specs = gm.meta.setdefault(CONCAT_INPUTS, [])
    # A counter that never goes back: placeholder *targets* become argument names and must stay unique
    # even when an earlier group was undone.
    index = gm.meta["fxsparse.concat_counter"] = gm.meta.get("fxsparse.concat_counter", -1) + 1
    new_inputs = []
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    try:
        with graph.inserting_after(last_placeholder):
            w_cat = graph.placeholder(f"fxsparse_concat_{index}_weight")
        new_inputs.append(w_cat)
        b_cat = None
        if biases[0] is not None:
            with graph.inserting_after(w_cat):
                b_cat = graph.placeholder(f"fxsparse_concat_{index}_bias")
            new_inputs.append(b_cat)
        if fake_mode is not None:
            for node, parts in ((w_cat, weights), (b_cat, biases)):
                if node is not None:
                    vals = [example_value(p) for p in parts]
                    with fake_mode:
                        node.meta["example_value"] = torch.cat([v.detach() for v in vals])
        rw = Rewrite(gm, members[0], fake_mode)
        y = rw.call_function(torch._C._nn.linear, (x, w_cat, b_cat))
        outputs, offset = [], 0
        for weight in weights:
            width = example_value(weight).shape[0]
            outputs.append(rw.call_function(operator.getitem, (y, (Ellipsis, slice(offset, offset + width)))))
            offset += width
        if fake_mode is not None:
            for member, out in zip(members, outputs):
                _check_users(member, out, fake_mode)
    except Exception as exc:  # noqa: BLE001 - a replacement that does not type-check leaves the graph alone
        if "rw" in locals():
            rw.undo()
        for node in reversed(new_inputs):
            graph.erase_node(node)
        return f"replacement failed: {type(exc).__name__}: {exc}"
    specs.append(ConcatInput(w_cat.name, tuple(w.name for w in weights)))
    if b_cat is not None:
        specs.append(ConcatInput(b_cat.name, tuple(b.name for b in biases)))
    for member, out in zip(members, outputs):
        member.replace_all_uses_with(out)
        graph.erase_node(member)
    return ""


def _check_users(member: fx.Node, replacement: fx.Node, fake_mode) -> None:
    """Raise if a reader of ``member`` fails on ``replacement`` (a strided slice, not a fresh tensor:
    e.g. a ``view`` that merges the feature dim with another one)."""
    for user in member.users:
        if user.op in ("call_function", "call_method"):
            fake_run(user, fake_mode, {member: replacement.meta["example_value"]})


class ConcatInputBuilder:
    """Supplies the concatenated inputs a rewritten graph expects, given the original inputs.

    A concatenation is rebuilt only when one of its sources changed: another tensor object, another
    storage, shape or dtype, or a bumped version counter (an in-place write such as ``load_state_dict``).

    >>> b = ConcatInputBuilder([(0, 1)])
    >>> w0, w1 = torch.ones(2, 3), torch.zeros(1, 3)
    >>> out = b([w0, w1])[0]
    >>> out.shape, b([w0, w1])[0] is out
    (torch.Size([3, 3]), True)
    >>> _ = w1.add_(1)
    >>> b([w0, w1])[0] is out
    False
    """

    def __init__(self, sources: list[tuple[int, ...]]):
        self.sources = [tuple(s) for s in sources]
        self._keys: list[tuple | None] = [None] * len(self.sources)
        self._values: list[torch.Tensor | None] = [None] * len(self.sources)

    @staticmethod
    def _key(parts) -> tuple:
        return tuple((id(p), p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.stride(),
                      p.dtype, p._version) for p in parts)

    def __call__(self, args) -> list[torch.Tensor]:
        out = []
        for i, idx in enumerate(self.sources):
            parts = [args[j] for j in idx]
            key = self._key(parts)
            if key != self._keys[i]:
                with torch.no_grad():
                    self._values[i] = torch.cat([p.detach() for p in parts])
                self._keys[i] = key
            out.append(self._values[i])
        return out

    @classmethod
    def for_graph(cls, gm: fx.GraphModule) -> ConcatInputBuilder | None:
        """The builder for ``gm``'s concatenated inputs (None when the pass added none)."""
        specs = gm.meta.get(CONCAT_INPUTS) or []
        if not specs:
            return None
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        added = {spec.name for spec in specs}
        original = [name for name in placeholders if name not in added]
        if placeholders[: len(original)] != original:
            raise RuntimeError("concatenated inputs must follow the original graph inputs")
        order = {spec.name: spec for spec in specs}
        ordered = [order[name] for name in placeholders[len(original):]]
        index = {name: i for i, name in enumerate(original)}
        return cls([tuple(index[s] for s in spec.sources) for spec in ordered])


def with_concat_inputs(fn, gm: fx.GraphModule):
    """``fn`` (compiled from ``gm``) called with the original inputs plus the concatenations it needs."""
    builder = ConcatInputBuilder.for_graph(gm)
    if builder is None:
        return fn
    # dynamo calls a backend's function with positional arguments (whatever ``_boxed_call`` it carries).
    def run(*args):
        return fn(*args, *builder(args))

    return run
