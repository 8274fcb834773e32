"""Pass: find attention heads, GQA groups and FFN channels from the captured graph's dataflow.

Nothing here reads attribute names. An *attention* is a ``scaled_dot_product_attention`` call, or one
written out: ``matmul(q, k^T) -> scale / mask / soft-cap -> softmax -> matmul(., v)`` (eager-only
models, nanoGPT-style code). Q, K and V are the linears whose outputs reach its query, key and value
through reshapes and elementwise ops; O is the linear fed by its output; an FFN is a linear ("down")
whose input is ``act(gate) * up`` (gated) or ``act(up)`` (non-gated). A *linear* is ``aten.linear``,
GPT-2's ``Conv1D`` (``addmm``) or ``matmul(x, W.T)`` (+ bias), on the weight of an ``nn.Linear`` (or
``Conv1D``) module: the same product by any other module, on a weight sliced or shared before use, or on
a stacked 3-D expert weight is reported in ``unrecognized`` with why (S²FT could not replace it).

Heads, KV heads and head size come from the reshapes: the output of each projection is followed
through view/transpose/slice/split/repeat ops with an integer *provenance tensor* (each element holds
the feature index it came from) to the (batch, seq, heads, head_dim) view closest to the attention,
which says exactly which output rows of the weight form each head, also inside fused QKV or gate_up
projections (and Falcon-style q|k|v head layouts).

Heads are only permuted where that is exact. Between each of q, k, v and the attention, a *head-index
tensor* (the head each element belongs to) is pushed through every op; an operand that is not itself
derived from the projection and differs from head to head (a per-head gain on Q, a concatenated per-head
sink, a bias added outside the linear, a q/k norm weight per head) would not move with a head
permutation, and a reduction over part of the heads ties them together, so the heads of that attention
stay where they are: it is recognised with ``Attention.fixed_order`` saying why, and S²FT trains its
selected heads in place (a gathered block). So are the heads of an attention whose mask or scores get
per-head slices (ALiBi-style slopes, attention sinks), of one whose query head ``h`` does not attend
with KV head ``h // groups`` (KV heads tiled, not interleaved), of one whose output meets anything but an
output gate on its way to o (a norm over all heads), and of one whose heads cannot be followed through
some op (complex rotary embeddings). Two couplings move with the heads instead: a norm over the
*whole* q or k projection (OLMo-2: its RMS is the same in any head order; its weight's rows follow the
heads, ``Attention.norms``) and an output gate ``out * sigmoid(g(x))`` before o
(Qwen3-Next, AFMoE: g's rows of each head follow it, ``Attention.gates``).

FFN channels stay in place the same way (``FFN.fixed_order``) when a norm over every channel lies between
``act(gate) * up`` and down (BitNet's sub-norm: its weight would have to move) or a parameter scales each
channel on the way (nGPT-style models).

Several FFNs between two attentions that read the same hidden state (mixture-of-experts experts with
their own ``nn.Linear`` projections, shared experts) are blocks of their own, ``part_of`` the first.
A structure the forward runs several times (a looped decoder calling its blocks again) is one structure:
its units move inside modules that are only ever called together, which is exact for every call. A module
called more than once otherwise (shared with something else) takes part in no structure.

Only the linears that feed an attention input are followed with provenance tensors, so their cost is
that of the projections' outputs on the (small) captured example, never of the LM head's.

>>> from fxsparse.capture import capture
>>> from fxsparse.models import tiny_model
>>> structure = find_structure(captured=capture(tiny_model("qwen3"))).outputs["structure"]
>>> a = structure.blocks[0].attention
>>> (a.num_heads, a.num_kv_heads, a.head_dim)
(4, 2, 20)
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections import deque
from typing import NamedTuple

import torch
from torch import fx, nn

from fxsparse.capture import Captured, module_path
from fxsparse.passes.manager import PassResult, fxpass
from fxsparse.structure import FFN, Attention, Block, Projection, Structure

__all__ = ["find_structure", "discover"]

aten = torch.ops.aten

# Ops that only move or relabel data: provenance flows through them unchanged in meaning.
_RESHAPES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default,
    aten.unflatten.int, aten.flatten.using_ints, aten.select.int, aten.t.default, aten.unbind.int,
    aten.narrow.default, operator.getitem, aten.repeat_interleave.self_int, aten.repeat.default,
}
# Ops that are the identity on values (dtype casts, copies, eval-mode dropout).
_IDENTITIES = {
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.to.dtype, aten.to.dtype_layout,
    aten._to_copy.default, aten.dropout.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.to.device, aten.type_as.default,
}
_CONCATS = {aten.cat.default, aten.stack.default}
_SHAPED_AS = {aten.view_as.default, aten.reshape_as.default}  # a reshape to another tensor's shape
_NORMS = {aten.layer_norm.default, aten.rms_norm.default}
# Reductions that may sit between a projection and the attention (RMS norms of q and k over head_dim).
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_ACTIVATIONS = {
    aten.silu.default: "silu", aten.gelu.default: "gelu", aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid", aten.tanh.default: "tanh", aten.mish.default: "mish",
}
_SDPA = {aten.scaled_dot_product_attention.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}


class _Site(NamedTuple):
    """One attention: ``out`` = attention(``q``, ``k``, ``v``), every node (batch, heads, seq, head_dim).

    ``node`` is the SDPA call, or the softmax of a written-out attention
    (``matmul(q, k^T) -> scale/mask/softcap -> softmax -> matmul(., v)``); ``blocker`` says why its
    scores tie heads to their position (a per-head mask or bias), or is None.
    """

    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    blocker: str | None


class _Linear(NamedTuple):
    node: fx.Node
    path: str
    input: fx.Node
    in_features: int
    out_features: int
    conv1d: bool


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}


def _transposed_parameter(node, captured: Captured) -> fx.Node | None:
    """The 2-D parameter placeholder ``node`` is the transpose of (``W.T``, ``W.t()``), or None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _TRANSPOSES):
        return None
    source = node.args[0]
    if not (isinstance(source, fx.Node) and source.name in captured.param_names and len(_shape(source) or ()) == 2):
        return None
    if node.target == aten.permute.default and [d % 2 for d in node.args[1]] != [1, 0]:
        return None
    return source


def _replaceable(captured: Captured, path: str, weight: fx.Node, conv1d: bool) -> str | None:
    """Why the projection at ``path`` using parameter ``weight`` cannot become an S²FT layer, or None."""
    name = captured.param_names[weight.name]
    try:
        module = captured.model.get_submodule(path)
        param = captured.model.get_parameter(name)
    except (AttributeError, ValueError):
        return f"{name} is used as a projection weight outside a module that owns it"
    kind = "Conv1D" if conv1d else "Linear"
    if conv1d and type(module).__name__ != "Conv1D" or not conv1d and not isinstance(module, nn.Linear):
        return (f"{path} ({type(module).__name__}) multiplies by {name} like a {kind} but is no nn.Linear/Conv1D: "
                "S²FT cannot replace it, left dense")
    if getattr(module, "weight", None) is not param:
        return f"{path} multiplies by {name}, which is not its own weight (shared or sliced): left dense"
    return None


def _linears(captured: Captured) -> tuple[dict[fx.Node, _Linear], dict[str, str]]:
    """Linear-like nodes, and the projections that cannot be replaced (module path -> why).

    Linear-like: ``aten.linear``, GPT-2 ``Conv1D``'s ``addmm(bias, x, W[in, out])`` and ``matmul(x, W.T)``
    (+ the module's own bias), each on a 2-D parameter of an ``nn.Linear`` (or ``Conv1D``) that is that
    module's weight. A projection on a parameter of any other module, or on a weight sliced or shared
    before use, is reported instead: S²FT could not replace it, so it must not take part in a structure.
    """
    found: dict[fx.Node, _Linear] = {}
    refused: dict[str, str] = {}
    for node in captured.graph.nodes:
        if node.op != "call_function":
            continue
        out_node = node
        if node.target == aten.linear.default:
            x, weight = node.args[0], node.args[1]
            conv1d = False
        elif node.target == aten.addmm.default:
            x, weight = node.args[1], node.args[2]
            conv1d = True
        elif node.target == aten.matmul.default and (weight := _transposed_parameter(node.args[1], captured)):
            x, conv1d = node.args[0], False
            bias_name = captured.param_names[weight.name].rsplit(".", 1)[0] + ".bias"
            users = list(node.users)
            if len(users) == 1 and users[0].target == aten.add.Tensor and any(
                    isinstance(a, fx.Node) and captured.param_names.get(a.name) == bias_name for a in users[0].args):
                out_node = users[0]  # matmul + the module's own bias: one projection
        else:
            continue
        if not isinstance(weight, fx.Node) or weight.name not in captured.param_names:
            if node.target == aten.linear.default and isinstance(weight, fx.Node) and module_path(node):
                sources = _sources(weight, captured.param_names)
                if sources:
                    refused.setdefault(module_path(node), (
                        f"{module_path(node)} computes its weight from {sources[0]} before use (sliced or "
                        "transformed): left dense"))
            continue  # a matmul with an activation, not a projection
        wshape = _shape(weight)
        if wshape is None or len(wshape) != 2:
            continue
        out_features, in_features = (wshape[1], wshape[0]) if conv1d else wshape
        path = module_path(node) or captured.param_names[weight.name].rsplit(".", 1)[0]
        why = _replaceable(captured, path, weight, conv1d)
        if why is not None:
            refused.setdefault(path, why)
            continue
        found[out_node] = _Linear(out_node, path, x, in_features, out_features, conv1d)
    return found, refused


def _provenance(shape: tuple[int, ...]) -> torch.Tensor:
    """Integer tensor of ``shape``: element = feature + features * token (token = flattened leading dims)."""
    features = shape[-1]
    tokens = 1
    for size in shape[:-1]:
        tokens *= size
    return torch.arange(tokens * features, dtype=torch.int64).reshape(shape)


def _apply(node: fx.Node, source: fx.Node, value):
    """Run ``node``'s reshape op with ``value`` in place of its input ``source``."""
    if node.target in _IDENTITIES or node.target in _SHAPED_AS:
        if node.args[0] is not source:  # type_as(x, source): only source's dtype reaches the output
            raise ValueError("not the value operand")
        if node.target in _SHAPED_AS:
            return value.reshape(_shape(node))
        return value.contiguous() if isinstance(value, torch.Tensor) else value  # a later view must replay

    def sub(arg):
        return value if arg is source else arg

    args = tuple(sub(a) for a in node.args)
    if node.target in (aten.view.default, aten._unsafe_view.default) and args[0] is value:
        return value.reshape(args[1])  # the same values; the real tensor's strides may allow a view ours do not
    return node.target(*args, **node.kwargs)


def _scales(node: fx.Node, source: fx.Node) -> bool:
    """``source * c`` or ``source / c`` with a number ``c``: values change, the layout does not."""
    return (node.op == "call_function" and node.target in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar)
            and node.args[0] is source and isinstance(node.args[1], (int, float)))


def _keeps_layout(user: fx.Node, node: fx.Node) -> bool:
    """An elementwise op whose output has ``node``'s shape (``q + bias``, ``q * cos``): values change,
    the layout does not. What such an op brings in is checked by :func:`_head_blocker`."""
    return (user.op == "call_function" and torch.Tag.pointwise in getattr(user.target, "tags", ())
            and _shape(user) is not None and _shape(user) == _shape(node))


def _follow(start: fx.Node, value, stop, pointwise: bool = False) -> list[tuple[fx.Node, object]]:
    """Push ``value`` (the provenance of ``start``) forward through reshapes/identities (and, with
    ``pointwise``, through elementwise ops that keep the shape).

    Returns ``(node, provenance)`` for each node where ``stop(node, provenance)`` held or where a
    non-reshape consumer begins (those are returned with provenance ``None`` for the consumer edge).
    """
    results: list[tuple[fx.Node, object]] = []
    queue: deque[tuple[fx.Node, object]] = deque([(start, value)])
    while queue:
        node, prov = queue.popleft()
        if node is not start and stop(node, prov):
            results.append((node, prov))
            continue
        for user in node.users:
            if _scales(user, node) or (pointwise and _keeps_layout(user, node)):
                queue.append((user, prov))  # q * scaling keeps the layout
            elif user.op == "call_function" and (user.target in _RESHAPES or user.target in _IDENTITIES
                                                 or user.target in _SHAPED_AS):
                try:
                    queue.append((user, _apply(user, node, prov)))
                except Exception:  # an op we cannot replay on integers: the path ends here
                    continue
            else:
                results.append((node, ("edge", user, prov)))
    return results


def _heads_view(prov: torch.Tensor, features: int) -> tuple[int, list[list[int]]] | None:
    """If ``prov`` is (batch, seq, heads, head_dim) or (batch, heads, seq, head_dim) with every token
    seeing the same feature layout, return (heads, output rows of each head)."""
    if prov.dim() != 4:
        return None
    feature = prov.remainder(features)
    token = prov.div(features, rounding_mode="floor")

    def varies(axis: int) -> bool:
        return prov.shape[axis] > 1 and bool((token.narrow(axis, 0, 1) != token.narrow(axis, 1, 1)).any())

    if varies(1):
        seq_axis = 1
    elif varies(2):
        seq_axis = 2
    elif prov.shape[1] == 1:  # one token per sequence: the axis of size 1 is the sequence
        seq_axis = 1
    elif prov.shape[2] == 1:
        seq_axis = 2
    else:
        return None
    layout = feature.movedim(2, 1) if seq_axis == 1 else feature  # (batch, heads, seq, head_dim)
    per_head = layout[0, :, 0, :]
    if not torch.equal(layout, per_head[None, :, None, :].expand_as(layout)):
        return None
    if per_head.unique().numel() != per_head.numel():
        return None  # heads repeated (a GQA repeat): the view before it says which rows form each head
    return per_head.shape[0], per_head.tolist()


def _reaches(node: fx.Node, arg_of: dict[fx.Node, list[tuple]], linears, limit: int = 400) -> list[tuple]:
    """The (sdpa, role) inputs ``node`` flows into, through any ops but never through a linear or SDPA."""
    if node in arg_of:
        return list(arg_of[node])
    seen, queue, found = {node}, deque([node]), []
    while queue and len(seen) < limit:
        current = queue.popleft()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if user.target == aten.copy_.default and user.args[1] is current and isinstance(user.args[0], fx.Node):
                base = user.args[0].args[0] if user.args[0].args else None  # copied into slice(base)
                if base in arg_of:
                    found.extend(arg_of[base])
                continue
            if user in arg_of:
                found.extend(arg_of[user])
            elif user.op == "call_function" and user.target not in _SDPA and user not in linears and (
                    user.target not in (aten.linear.default, aten.addmm.default)):
                queue.append(user)
    return found


def _index_or_none(rows: list[int], total: int) -> tuple[int, ...] | None:
    return None if rows == list(range(total)) else tuple(rows)


_EMPTY = {aten.new_empty.default, aten.empty.memory_format, aten.new_zeros.default, aten.zeros.default}


def _written_into(node: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """``(slice, source)`` of each ``slice(node).copy_(source)``: a tensor assembled in place, as DeepSeek's
    MLA builds its key (``k = q.new_empty(...); k[..., :d] = k_nope; k[..., d:] = k_rope``)."""
    if node.op != "call_function" or node.target not in _EMPTY:
        return []
    pairs = []
    for view in node.users:
        if view.target in (aten.slice.Tensor, aten.narrow.default) and view.args[0] is node:
            pairs.extend((view, user.args[1]) for user in view.users
                         if user.target == aten.copy_.default and user.args[0] is view)
    return pairs


def _ancestors(arg: fx.Node, linears) -> set[fx.Node]:
    """``arg`` and the nodes it is computed from, up to (and including) linears, SDPA calls and inputs."""
    seen, queue = {arg}, deque([arg])
    while queue:
        node = queue.popleft()
        if node in linears or node.target in _SDPA or node.op != "call_function":
            continue
        for parent in [*node.all_input_nodes, *(source for _, source in _written_into(node))]:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return seen


def _attention_projections(sites: list[_Site], linears):
    """For each attention site: {"q"|"k"|"v": (linear, heads, rows)} found by following projections forward.

    Only linears that some attention input is computed from (without another linear in between) are
    followed: the provenance tensors are then the size of q/k/v outputs, never of an LM head's.
    """
    found: dict[fx.Node, dict[str, tuple[_Linear, int, list[int]]]] = {site.node: {} for site in sites}
    arg_of: dict[fx.Node, list[tuple]] = {}
    head_dims = set()
    feeders: dict[fx.Node, None] = {}
    for site in sites:
        for role, arg in zip("qkv", (site.q, site.k, site.v)):
            arg_of.setdefault(arg, []).append((site.node, role))
            head_dims.add((_shape(arg) or (0,))[-1])
            feeders.update((node, None) for node in _ancestors(arg, linears) if node in linears)

    order = {node: i for i, node in enumerate(sites[0].node.graph.nodes)} if sites else {}
    ranks: dict[tuple, tuple[bool, int]] = {}
    for lin in (linears[node] for node in linears if node in feeders):
        shape = _shape(lin.node)
        if shape is None:
            continue
        candidates: list[tuple[fx.Node, torch.Tensor]] = []

        def is_heads(node, prov, candidates=candidates):
            if isinstance(prov, torch.Tensor) and prov.dim() in (3, 4) and prov.shape[-1] in head_dims:
                candidates.append((node, prov if prov.dim() == 4 else prov.unsqueeze(0)))  # (heads, seq, d), batch 1
            return False  # follow on: a later view may split a fused layout further (Falcon's q|k|v heads)

        _follow(lin.node, _provenance(shape), is_heads, pointwise=True)
        best: dict[tuple, tuple[tuple, int, list[int]]] = {}
        for node, prov in candidates:
            view = _heads_view(prov, lin.out_features)
            if view is None:
                continue
            reached = _reaches(node, arg_of, linears)
            for sdpa, role in reached:
                rows = [r for head in view[1] for r in head]
                # a view feeding this input only (after q|k|v are split), the most rows (MLA's rotary part too),
                # the closest to the attention
                key = (all(s is not sdpa or r == role for s, r in reached), len(rows), order[node])
                if (sdpa, role) not in best or key > best[(sdpa, role)][0]:
                    best[(sdpa, role)] = (key, view[0], rows)
        for (sdpa, role), (key, heads, rows) in best.items():  # across linears: the one with the most heads
            if role not in found[sdpa] or (key[0], heads) > ranks[(sdpa, role)]:
                found[sdpa][role] = (lin, heads, rows)
                ranks[(sdpa, role)] = (key[0], heads)
    return found


def _replay(node: fx.Node, values: dict[fx.Node, object]):
    """Run ``node``'s op with known ``values`` for its inputs and -1 filled tensors for the others."""
    if node.target in _IDENTITIES and node.args[0] in values:
        value = values[node.args[0]]
        return value.contiguous() if isinstance(value, torch.Tensor) else value

    def sub(arg):
        if isinstance(arg, fx.Node):
            if arg in values:
                return values[arg]
            shape = _shape(arg)
            return torch.full(shape, -1, dtype=torch.int64) if shape is not None else arg
        if isinstance(arg, (list, tuple)):
            return type(arg)(sub(a) for a in arg)
        return arg

    return node.target(*(sub(a) for a in node.args), **{k: sub(v) for k, v in node.kwargs.items()})


def _varies(index: torch.Tensor, axis: int) -> bool:
    return index.shape[axis] > 1 and bool((index != index.narrow(axis, 0, 1)).any())


def _per_head_operand(operand: fx.Node, index: torch.Tensor) -> bool:
    """Whether ``operand``, broadcast against a tensor whose elements belong to heads ``index``, takes
    different values along an axis on which the head changes."""
    while operand.op == "call_function" and operand.target in (aten.expand.default, aten.expand_as.default) and (
            isinstance(operand.args[0], fx.Node)):
        operand = operand.args[0]  # an expanded (broadcast) tensor varies only where its source does
    shape = _shape(operand)
    if shape is None:
        return False
    offset = index.dim() - len(shape)
    return any(shape[axis - offset] > 1 and _varies(index, axis) for axis in range(max(offset, 0), index.dim()))


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _sources(node: fx.Node, names: dict[str, str], limit: int = 64) -> list[str]:
    """Names of the parameters and buffers ``node`` is computed from (closest first), for messages."""
    found, seen, queue = [], {node}, deque([node])
    while queue and len(seen) < limit:
        current = queue.popleft()
        if current.op == "placeholder" and current.name in names:
            found.append(names[current.name])
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return found


def _describe(node: fx.Node, names: dict[str, str]) -> str:
    sources = _sources(node, names)
    shape = list(_shape(node) or [])
    return f"{sources[0]} (seen as {shape})" if sources else f"{node.name} {shape}"


def _head_blocker(lin: _Linear, rows: list[int], heads: int, arg: fx.Node, linears,
                  names: dict[str, str], slot_heads: dict[fx.Node, list[int]],
                  norms: list[str] | None = None) -> str | None:
    """Why permuting the ``heads`` of ``lin`` (``rows``: unit-major output rows) would change what
    reaches the attention input ``arg``; None when it would not (see the module docstring).

    When it would not, ``slot_heads[arg]`` is set to the head of ``lin`` in each head slot of ``arg``
    (``arg`` is (batch, heads, seq, head_dim)): after a GQA repeat, the KV head each query slot sees.

    A norm over the whole output of ``lin`` (RMS over every feature: the same whatever the order of the
    heads) does not stop it; its weight (and bias), one per output row of ``lin``, then has to move with
    the heads: the norm module's path is appended to ``norms``."""
    shape = _shape(lin.node)
    if shape is None:
        return f"{lin.path}: no output shape in the graph"
    head_of_row = torch.full((lin.out_features,), -4, dtype=torch.int64)  # -4: lin's rows of no head here
    head_of_row[torch.tensor(rows)] = torch.arange(heads).repeat_interleave(len(rows) // heads)
    values: dict[fx.Node, object] = {lin.node: head_of_row.expand(shape).contiguous()}
    aligned = {lin.node}  # nodes whose last dim is lin's output rows in order (no reshape since lin)
    found_norms: list[str] = []
    upstream = _ancestors(arg, linears)
    assembled = {node: pairs for node in upstream if (pairs := _written_into(node))}
    into = {source: node for node, pairs in assembled.items() for _, source in pairs}
    on_path, queue = set(), deque([lin.node])
    while queue:
        current = queue.popleft()
        for user in [*current.users, *([into[current]] if current in into else [])]:
            if user in upstream and user not in on_path:
                on_path.add(user)
                queue.append(user)
    order = {node: i for i, node in enumerate(arg.graph.nodes)}
    for node in sorted(on_path, key=order.__getitem__):
        inputs = [a for a in node.all_input_nodes if a in values]
        others = [a for a in node.all_input_nodes if a not in values]
        target = node.target
        try:
            if node in assembled:  # slices written in place: like a concatenation
                value = torch.full(_shape(node), -1, dtype=torch.int64)
                for view, source in assembled[node]:
                    region = view.target(value, *view.args[1:])
                    if source in values:
                        region.copy_(torch.broadcast_to(values[source], region.shape))
                    elif _per_head_operand(source, torch.arange(region.shape[1]).view(1, -1, 1, 1).expand(
                            region.shape) if region.dim() == 4 else region):
                        return (f"{_describe(source, names)} is written into the attention input per head: "
                                "permuting heads would change the function")
                values[node] = value
                continue
            if target in _RESHAPES or target in _IDENTITIES or target in _CONCATS or target in _SHAPED_AS:
                value = _replay(node, values)
                seen = value if isinstance(value, torch.Tensor) else None
                if target in _IDENTITIES and node.args[0] in aligned:
                    aligned.add(node)
            elif target in _NORMS and node.args[0] in values and len(node.args[1]) == 1:
                source = values[node.args[0]]  # a norm over the last dim: per head when that dim is within a head
                if not bool((source == source[..., :1]).all()) and node.args[0] not in aligned:
                    return (f"{_op_name(node)} normalises over several heads of {lin.path} on the way to the "
                            "attention (a norm over part of the projection, not per head): permuting heads would "
                            "change the function")
                if node.args[0] in aligned:
                    aligned.add(node)
                value = seen = source
            elif torch.Tag.pointwise in getattr(target, "tags", ()):
                out_shape = _shape(node)
                parts = [torch.broadcast_to(values[a], out_shape) for a in inputs]
                value = parts[0]
                for part in parts[1:]:  # two paths meet (x * rsqrt(mean(x^2))): the heads must agree
                    value = torch.where(value == -3, part, torch.where(
                        (part == -3) | (value == part), value, -2))  # -3: the same for every head
                seen = value
                if out_shape == shape and all(a in aligned or bool((values[a] == -3).all()) for a in inputs):
                    aligned.add(node)
            elif target in _REDUCTIONS:
                source = values[node.args[0]]
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
                high, low = source.amax(dims, keepdim), source.amin(dims, keepdim)
                value = seen = torch.where(high == low, high, -2)  # -2: a reduction over several heads
                last = [d % source.dim() for d in ([dims] if isinstance(dims, int) else dims or [])]
                if node.args[0] in aligned and last == [source.dim() - 1] and keepdim:
                    value, seen = torch.full_like(value, -3), None  # over every row of lin: the order does not matter
                elif bool((value == -2).any()):
                    return (f"{_op_name(node)} reduces over several heads of {lin.path} on the way to the attention "
                            "(a norm over the whole projection, not per head): permuting heads would change "
                            "the function")
            else:
                return f"{_op_name(node)} lies between {lin.path} and the attention (heads not followed through it)"
        except Exception as exc:  # an op we cannot replay on head indices: do not guess
            return f"cannot follow the heads of {lin.path} through {_op_name(node)} ({type(exc).__name__})"
        if seen is not None:
            for other in others:
                owner = _norm_weight_owner(other, node, aligned, lin, names)
                if owner is not None:
                    found_norms.append(owner)
                    continue
                if _per_head_operand(other, seen):
                    return (f"{_describe(other, names)} takes a different value per head on the way "
                            f"from {lin.path} to the attention ({_op_name(node)}): permuting heads would change "
                            "the function")
        values[node] = value
    final = values.get(arg)
    if isinstance(final, torch.Tensor) and final.dim() == 3:
        final = final.unsqueeze(0)  # (heads, seq, head_dim) of a batch of one
    if not isinstance(final, torch.Tensor) or final.dim() != 4:
        return f"the heads of {lin.path} could not be followed to the attention"
    # -1 (other sources, checked above not to differ per head) or -3 (the same for every head) may fill the
    # same positions of every head (MLA's rotary key part shared by all heads); -2 (mixed) and -4 may not.
    own = final >= 0
    if bool(((final == -2) | (final == -4)).any()) or not bool(own.any()) or not torch.equal(
            own, own[:, :1].expand_as(own)):
        return f"the attention input from {lin.path} mixes heads or other rows"
    slots = torch.where(own, final, final.amax()).amin((0, 2, 3))
    expected = slots[None, :, None, None].expand_as(final)
    if not torch.equal(torch.where(own, final, expected), expected):
        return f"the attention input from {lin.path} mixes heads or other rows"
    slot_heads[arg] = slots.tolist()
    if norms is not None:
        norms.extend(dict.fromkeys(found_norms))
    return None


def _norm_weight_owner(other: fx.Node, node: fx.Node, aligned: set, lin: _Linear, names: dict[str, str]):
    """The module whose ``weight``/``bias`` ``other`` is, when it scales or shifts ``lin``'s rows one by one
    (``node`` keeps lin's rows in order): a norm weight over the whole projection; else None."""
    if node not in aligned and not (node.target in _NORMS and node.args[0] in aligned):
        return None
    name = names.get(other.name, "") if other.op == "placeholder" else ""
    path, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias") or _shape(other) != (lin.out_features,):
        return None
    return path


def _mask_blocker(sdpa: fx.Node, names: dict[str, str]) -> str | None:
    """Why the attention mask of ``sdpa`` ties heads to their position (a per-head bias), or None."""
    mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    if not isinstance(mask, fx.Node):
        return None
    node = mask
    while True:
        shape = _shape(node)
        if shape is None or len(shape) < 3 or shape[-3] == 1:
            return None
        source = node.args[0] if node.args else None
        if not (isinstance(source, fx.Node) and (node.target in _RESHAPES or node.target in _IDENTITIES)):
            break
        node = source
    return (f"the attention mask {_describe(mask, names)} has one slice per head (ALiBi-style slopes or a "
            "per-head bias): permuting heads would change the function")


def _last_two_swapped(node: fx.Node) -> bool:
    """``node`` swaps the last two dims of a 3-D or 4-D tensor (``k.transpose(-2, -1)``, ``permute(0, 1, 3, 2)``)."""
    rank = len(_shape(node) or ())
    if node.op != "call_function" or rank not in (3, 4):
        return False
    if node.target == aten.transpose.int:
        return sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]
    if node.target == aten.permute.default:
        return [d % rank for d in node.args[1]] == [*range(rank - 2), rank - 1, rank - 2]
    return False


def _rows(shape) -> tuple[int, int] | None:
    """(batch x heads, queries) of a 3-D (batch*heads, seq, x) or 4-D (batch, heads, seq, x) attention tensor."""
    if shape is None or len(shape) not in (3, 4):
        return None
    return math.prod(shape[:-2]), shape[-2]


def _between(start: fx.Node, end: fx.Node, limit: int = 64) -> list[fx.Node] | None:
    """Nodes computed from ``start`` that ``end`` is computed from (``end`` included, ``start`` not), in
    graph order; None if the walk back from ``end`` does not reach ``start`` within ``limit`` nodes."""
    upstream, queue, reached = {end}, deque([end]), False
    while queue and len(upstream) < limit:
        node = queue.popleft()
        for parent in node.all_input_nodes:
            if parent is start:
                reached = True
            elif parent not in upstream and parent.op == "call_function":
                upstream.add(parent)
                queue.append(parent)
    if not reached:
        return None
    downstream, queue = set(), deque([start])
    while queue:
        for user in queue.popleft().users:
            if user in upstream and user not in downstream:
                downstream.add(user)
                queue.append(user)
    order = {node: i for i, node in enumerate(end.graph.nodes)}
    return sorted(downstream, key=order.__getitem__)


def _score_matmul(softmax: fx.Node, limit: int = 32) -> fx.Node | None:
    """The ``matmul(q, k^T)`` whose (batch, heads, seq, seq) scores ``softmax`` normalises, if any."""
    scores = _shape(softmax)
    queue, seen = deque([softmax.args[0]]), set()
    while queue and len(seen) < limit:
        node = queue.popleft()
        if not isinstance(node, fx.Node) or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if (node.target in _MATMUL or node.target == aten.baddbmm.default) and _rows(_shape(node)) is not None and (
                _rows(_shape(node)) == _rows(scores)):
            return node  # (batch, heads, seq, keys); the softmax may see more keys (sinks concatenated)
        queue.extend(node.all_input_nodes)
    return None


def _pointwise(target) -> bool:
    """An elementwise op, in place (``masked_fill_``) or not."""
    if torch.Tag.pointwise in getattr(target, "tags", ()):
        return True
    name = getattr(getattr(target, "_schema", None), "name", "")
    if not name.endswith("_"):
        return False
    packet = getattr(aten, name.split("::")[-1][:-1], None)
    overload = getattr(packet, getattr(target, "_overloadname", ""), None) if packet is not None else None
    return overload is not None and torch.Tag.pointwise in overload.tags


def _shared_by_heads_step(user: fx.Node, probs: fx.Node) -> bool:
    """``user`` is an elementwise op on the attention probabilities ``probs`` (batch, heads, seq, keys) whose other
    tensors are the same for every head (a mask broadcast over the heads axis, a number): heads still line up."""
    elementwise = _pointwise(user.target) or user.target == aten.masked_fill.Tensor  # (a 0-D fill: untagged)
    if user.args[0] is not probs or not elementwise or _shape(user) != _shape(probs):
        return False
    rank = len(_shape(probs))
    axis = rank - 3  # the heads axis of (batch, heads, seq, keys); of (batch*heads, seq, keys): batch and heads
    for arg in user.all_input_nodes:
        if arg is probs:
            continue
        shape = _shape(arg)
        if shape is None or len(shape) > rank:
            return False
        at = axis - (rank - len(shape))  # the heads axis in the operand, broadcast from the right
        if at >= 0 and shape[at] != 1:
            return False
    return True


def _written_out_site(softmax: fx.Node, names: dict[str, str]) -> _Site | str | None:
    """The attention a softmax over (batch, heads, seq, seq) scores closes, written out as
    ``matmul(q, k^T) -> elementwise (scale, mask, soft-cap) -> softmax -> matmul(., v)``.

    None when the softmax is no attention (a router, 2-D scores); a string (why) when it normalises
    attention scores in a way heads cannot be followed through.
    """
    scores = _shape(softmax)
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    rank = len(scores or ())
    if rank not in (3, 4) or not isinstance(dim, int) or dim % rank != rank - 1:
        return None
    qk = _score_matmul(softmax)
    if qk is None:
        return "the attention scores come from no matmul(q, k^T) or baddbmm over (batch, heads, seq, head_dim)"
    # baddbmm(bias, q, k^T): Bloom's ALiBi added to the scores in the same op
    query, key_t = qk.args[1:3] if qk.target == aten.baddbmm.default else qk.args[:2]
    if not (isinstance(query, fx.Node) and isinstance(key_t, fx.Node)):
        return "the key enters the attention scores as no transpose of (batch, heads, seq, head_dim)"
    if _last_two_swapped(key_t):
        key = key_t.args[0]
    elif key_t.target == aten.permute.default and [d % 4 for d in key_t.args[1]] == [0, 2, 3, 1]:
        key = key_t  # (batch, seq, heads, dim) -> (batch, heads, dim, seq) in one permute (OpenAI GPT): heads on axis 1
    else:
        return "the key enters the attention scores as no transpose of (batch, heads, seq, head_dim)"
    pv, node = None, softmax
    for _ in range(8):  # softmax -> (dropout, dtype cast) -> matmul(probs, v)
        users = [u for u in node.users if u.op == "call_function"]
        pv = next((u for u in users if u.target in _MATMUL and u.args[0] is node), None)
        if pv is not None:
            break
        step = [u for u in users if u.target in _IDENTITIES or u.target in _RESHAPES  # a sink's column dropped
                or _shared_by_heads_step(u, node)]  # masked rows zeroed after the softmax (CPM-Ant)
        if len(step) != 1:
            break
        node = step[0]
    if pv is None or not isinstance(pv.args[1], fx.Node) or _rows(_shape(pv)) != _rows(scores):
        return "the attention probabilities reach no matmul with the values"
    if any(len(_shape(n) or ()) not in (3, 4) for n in (query, key, pv.args[1])):
        return "q, k and v of the written-out attention are not (batch, heads, seq, head_dim)"
    if len({math.prod(_shape(n)[:-2]) for n in (query, key, pv.args[1], pv)}) != 1:
        # 3-D (batch * heads, seq, dim) and 4-D (batch, heads, seq, dim) may mix (GPT-NeoX-Japanese)
        return "q, k and v of the written-out attention have different heads over flattened (batch, heads)"
    path = _between(qk, softmax)
    if path is None:
        return "the attention scores reach the softmax through too many ops"
    on_path = set(path) | {qk}
    blocker = None
    if qk.target == aten.baddbmm.default and isinstance(qk.args[0], fx.Node):
        shape = _shape(qk)
        heads = torch.arange(math.prod(shape[:-2])).view(*shape[:-2], 1, 1).expand(shape)
        if _per_head_operand(qk.args[0], heads):
            blocker = (f"the attention scores get {_describe(qk.args[0], names)}, one slice per head (ALiBi-style "
                       "slopes or a per-head bias): permuting heads would change the function")
    for node in path[:-1] if blocker is None else ():
        others = [a for a in node.all_input_nodes if a not in on_path]
        shape = _shape(node) or scores
        heads = torch.arange(math.prod(shape[:-2])).view(*shape[:-2], 1, 1).expand(shape)
        if node.target in _IDENTITIES and _shape(node) == scores:
            continue
        if node.target in (*_SHAPED_AS, aten.expand_as.default) and node.args[0] not in on_path:
            continue  # the mask expanded to the scores' shape: only the shape comes from the scores
        if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and (
                _rows(_shape(node)) == _rows(scores) and _shape(node)[-1] == _shape(node.args[0])[-1]):
            continue  # (batch*heads, seq, keys) <-> (batch, heads, seq, keys)
        if node.target in (aten.amax.default, aten.max.dim, aten.logsumexp.default):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())
            rank = len(_shape(node.args[0]) or ())
            if all(d % rank == rank - 1 for d in ([dims] if isinstance(dims, int) else dims)) and dims != []:
                continue  # a max per query row (a stable softmax written out): the heads stay apart
        if node.target is operator.getitem and node.args[0] in on_path:
            continue
        if node.target in _CONCATS and (sink := next((o for o in others if _per_head_operand(o, heads)), None)):
            blocker = (f"the attention scores are concatenated with {_describe(sink, names)}, one per head "
                       "(attention sinks): permuting heads would change the function")
            break
        if not _pointwise(node.target) or _rows(_shape(node)) != _rows(scores):
            blocker = (f"{_op_name(node)} lies between the attention scores and the softmax (heads not followed "
                       "through it)")
            break
        bias = next((o for o in others if _per_head_operand(o, heads)), None)
        if bias is not None:
            blocker = (f"the attention scores get {_describe(bias, names)}, one slice per head (ALiBi-style "
                       "slopes or a per-head bias): permuting heads would change the function")
            break
    return _Site(softmax, query, key, pv.args[1], pv, blocker)


def _sites(captured: Captured, names: dict[str, str]) -> tuple[list[_Site], list[tuple[fx.Node, str]]]:
    """Every attention of the graph (SDPA calls and written-out ones), in graph order, and the softmaxes
    over attention scores that could not be read as one (with why)."""
    sites, failed = [], []
    for node in captured.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _SDPA:
            sites.append(_Site(node, *node.args[:3], node, _mask_blocker(node, names)))
        elif node.target in _SOFTMAX:
            site = _written_out_site(node, names)
            if isinstance(site, _Site):
                sites.append(site)
            elif isinstance(site, str):
                failed.append((node, site))
    return sites, failed


def _first_mixing_op(arg: fx.Node, linears, limit: int = 64) -> fx.Node | None:
    """The op closest to attention input ``arg`` that is no reshape or elementwise op (a ``cat``), if any."""
    queue, seen = deque([arg]), {arg}
    while queue and len(seen) < limit:
        node = queue.popleft()
        if node in linears or node.op != "call_function":
            continue
        if not (node.target in _RESHAPES or node.target in _IDENTITIES
                or torch.Tag.pointwise in getattr(node.target, "tags", ())):
            return node
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return None


def _by_head(per_slot: list[int], slots: list[int], head_dim: int) -> list[int]:
    """Columns/rows listed per attention output slot, re-listed per query head (``slots``: head of each slot)."""
    result = [0] * len(per_slot)
    for slot, head in enumerate(slots):
        result[head * head_dim:(head + 1) * head_dim] = per_slot[slot * head_dim:(slot + 1) * head_dim]
    return result


def _pairing_blocker(site: _Site, heads: int, kv_heads: int, slot_heads: dict[fx.Node, list[int]]) -> str | None:
    """Why query head ``h`` does not attend with KV head ``h // groups`` (the GQA grouping head
    permutations keep), or None. Slots are the head positions of each attention input."""
    if any(arg not in slot_heads for arg in (site.q, site.k, site.v)):
        return None  # the per-head check did not run (switched off in a test)
    qs, ks, vs = (slot_heads[arg] for arg in (site.q, site.k, site.v))
    if sorted(qs) != list(range(heads)):
        return f"the query of attention {site.node.name} does not hold each query head once"
    groups = heads // kv_heads
    for role, slots in (("key", ks), ("value", vs)):
        if not slots or len(qs) % len(slots):
            return f"attention {site.node.name} has {len(qs)} query and {len(slots)} {role} head slots"
        per = len(qs) // len(slots)
        if any(slots[i // per] != qs[i] // groups for i in range(len(qs))):
            return (f"in attention {site.node.name} query head h does not attend with {role} head h // {groups} "
                    "(the KV heads are repeated in another order): permuting heads would change the function")
    return None


def _output_projection(sdpa: fx.Node, linears, heads: int, head_dim: int):
    """The linear fed by the attention output, with the input column of each (head, dim) pair, and the output
    gates on the way (``out * sigmoid(gate_proj(x))``: each a linear and its row for each (head, dim) pair).

    Returns ``(o, columns, gates, why)``, or None when no linear takes the output. ``why`` is "" when every
    operand met on the way is an output gate; else it says what acts on the output that is not one (a norm over
    several heads, a gate with a per-head bias), the heads must stay in place, and ``gates`` lists the linears
    that operand is computed from, each with rows None.
    """
    shape = _shape(sdpa)
    if shape is None or len(shape) not in (3, 4) or len(shape) == 3 and shape[0] != heads:
        return None
    batch, seq = (shape[0], shape[2]) if len(shape) == 4 else (1, shape[1])
    feature = torch.arange(heads * head_dim).reshape(1, heads, 1, head_dim)
    token = torch.arange(batch * seq).reshape(batch, 1, seq, 1)
    features = heads * head_dim
    prov = (feature + features * token).expand(batch, heads, seq, head_dim)
    if len(shape) == 3:
        prov = prov[0]  # (heads, seq, head_dim): the batch of one flattened into the heads
    seen: dict[fx.Node, torch.Tensor] = {sdpa: prov}

    def record(node, value):
        if isinstance(value, torch.Tensor):
            seen[node] = value
        return False

    for node, edge in _follow(sdpa, prov, record, pointwise=True):
        if not isinstance(edge, tuple) or edge[0] != "edge":
            continue
        _, user, value = edge
        lin = linears.get(user)
        if lin is None and len(user.users) == 1:  # matmul(x, W.T) + the module's bias: keyed by the add
            lin = linears.get(next(iter(user.users)))
        if lin is None or lin.input is not node or not isinstance(value, torch.Tensor):
            continue
        columns = value.reshape(-1, value.shape[-1])[0].remainder(features)
        if value.shape[-1] != features or sorted(columns.tolist()) != list(range(features)):
            continue
        # unit-major list: column of (head h, dim d) at position h * head_dim + d
        order = torch.empty(features, dtype=torch.int64)
        order[columns] = torch.arange(features)
        gates = []
        for step in _between(sdpa, node, limit=256) or []:
            if step not in seen or step.target in _RESHAPES or step.target in _IDENTITIES:
                continue  # not on the way of the attention's values (the shape operand of view_as), or a reshape
            inner = next((a for a in step.all_input_nodes if a in seen), None)
            for operand in step.all_input_nodes:
                if operand is inner or operand in seen or _same_for_every_channel(operand, linears):
                    continue
                gate = _gate_rows(operand, seen.get(inner), features, head_dim, linears)
                if isinstance(gate, str):
                    ungated = [linears[n] for n in _ancestors(operand, linears) if n in linears]
                    return lin, order.tolist(), [(g, None) for g in ungated], (
                        f"the attention output is multiplied by {operand.name} on its way to {lin.path}: {gate}")
                gates.append(gate)
        return lin, order.tolist(), gates, ""
    return None


def _gate_rows(operand: fx.Node, attn: torch.Tensor | None, features: int, head_dim: int, linears):
    """``(linear, its row for each attention-output feature)`` when ``operand`` is computed from one linear's
    output, element for element, through reshapes and elementwise ops with numbers only (an output gate
    ``sigmoid(gate_proj(x))``); else why not."""
    sources = [n for n in _ancestors(operand, linears) if n in linears]
    if attn is None or len(sources) != 1:
        return "not the output of one linear (a norm or a per-head operand)"
    gate = linears[sources[0]]
    path = [] if operand is gate.node else _between(gate.node, operand) or []
    for node in path:
        if node.target in _SHAPED_AS:
            continue  # its second operand only gives the shape
        others = [a for a in node.all_input_nodes if a not in path and a is not gate.node]
        if node.target in _RESHAPES or node.target in _IDENTITIES:
            continue
        if torch.Tag.pointwise not in getattr(node.target, "tags", ()):
            return f"{_op_name(node)} lies between {gate.path} and the product"
        other = next((a for a in others if not _same_for_every_channel(a, linears)), None)
        if other is not None:
            return (f"{_describe(other, {})} enters the gate from {gate.path} ({_op_name(node)}), e.g. a bias per "
                    "head: it would not move with the heads")
    value = _provenance(_shape(gate.node)) if operand is gate.node else None
    if value is None:
        value = next((p for n, p in _follow(gate.node, _provenance(_shape(gate.node)), lambda n, p: n is operand,
                                            pointwise=True) if n is operand and isinstance(p, torch.Tensor)), None)
    try:  # a gate per head (heads, 1) is broadcast over head_dim
        value = torch.broadcast_to(value, attn.shape) if value is not None else None
    except RuntimeError:
        value = None
    if value is None:
        return f"the rows of {gate.path} could not be followed to the product element for element"
    a, g = attn.flatten(), value.flatten()
    if not torch.equal(a.div(features, rounding_mode="floor"), g.div(gate.out_features, rounding_mode="floor")):
        return f"{gate.path} gates other tokens"
    a, g = a.remainder(features), g.remainder(gate.out_features)
    rows = torch.full((features,), -1, dtype=torch.int64)
    rows[a] = g
    if not torch.equal(rows[a], g) or bool((rows < 0).any()):
        return f"{gate.path} does not give one row per attention output feature"
    per_slot = [list(dict.fromkeys(rows[i:i + head_dim].tolist())) for i in range(0, features, head_dim)]
    flat = [r for slot in per_slot for r in slot]
    if len({len(slot) for slot in per_slot}) != 1 or len(set(flat)) != len(flat):
        return f"the rows of {gate.path} are not split evenly between the heads"
    return gate, flat


def _same_for_every_channel(node: fx.Node, linears, limit: int = 32) -> bool:
    """``node`` holds one number computed from parameters only (no activation, no per-channel values)."""
    shape = _shape(node)
    if shape is None or math.prod(shape) != 1:
        return False
    return _parameters_only(node, linears, limit)


def _parameters_only(node: fx.Node, linears, limit: int = 32) -> bool:
    """``node`` is computed from 1-D parameters, buffers and numbers only (no activation, no token ids)."""
    queue, seen = deque([node]), {node}
    while queue:
        current = queue.popleft()
        if current in linears or len(seen) > limit:
            return False
        if current.op == "placeholder" and len(_shape(current) or ()) > 1:
            return False  # token ids, an activation
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return True


# Reductions whose value does not depend on the order of the reduced elements (a statistic of the channels).
_SYMMETRIC_REDUCTIONS = _REDUCTIONS | {aten.std.dim, aten.std.correction, aten.var.dim, aten.var.correction,
                                       aten.logsumexp.default}


def _channel_statistic(node: fx.Node, width: int, linears, limit: int = 32) -> list[fx.Node] | None:
    """The tensors reduced when ``node`` (one value per row, last dim 1) is computed from order-free reductions
    over all ``width`` channels (mean, std, var, sum, max, min, logsumexp), numbers and parameters only; else None.
    Such a statistic is the same in any channel order (Gemma 3n's activation sparsity: ``relu(g - (mean(g) + k *
    std(g)))``), so the channels it is taken over can still be permuted (exactly, up to summation order)."""
    reduced, seen, queue = [], {node}, deque([node])
    while queue:
        current = queue.popleft()
        if len(seen) > limit or current in linears or current.op != "call_function":
            return None
        if current.target in _SYMMETRIC_REDUCTIONS:
            x = current.args[0]
            dims = current.args[1] if len(current.args) > 1 else current.kwargs.get("dim")
            rank = len(_shape(x) or ())
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if not rank or [d % rank for d in dims] != [rank - 1] or _shape(x)[-1] != width:
                return None
            reduced.append(x)
            continue
        if not _pointwise(current.target) and current.target not in _IDENTITIES:
            return None
        for parent in current.all_input_nodes:
            if parent in seen:
                continue
            seen.add(parent)
            shape = _shape(parent)
            if shape is not None and math.prod(shape) == 1 and _parameters_only(parent, linears, 64):
                continue  # a number computed from constants and parameters (Gemma 3n: erfinv of the sparsity)
            if parent.op in ("placeholder", "get_attr") or not shape or shape[-1] != 1:
                return None  # a tensor of many values, or one from the activations: not a statistic
            queue.append(parent)
    return reduced or None


def _pointwise_sources(start: fx.Node, linears, width: int, fixed: list[str] | None = None) -> set[fx.Node] | None:
    """Linear nodes that feed ``start`` through pointwise ops and reshapes only, or None if anything
    else (a reduction, a norm, another activation tensor) takes part: then this is no FFN.

    A parameter per channel on the way would not move with a channel permutation: with ``fixed`` (a list)
    that is noted there (the channels then stay in place) instead of refused."""
    found, seen, queue = set(), {start}, deque([start])
    while queue:
        node = queue.popleft()
        if node in linears:
            found.add(node)
            continue
        if node.op in ("placeholder", "get_attr"):
            continue  # parameters, buffers, constants
        if node.op != "call_function":
            return None
        passthrough = node.target in _RESHAPES or node.target in _IDENTITIES
        if not passthrough and torch.Tag.pointwise not in getattr(node.target, "tags", ()):
            return None  # a norm, a matmul, a reduction: the channels mix
        shape = _shape(node)
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            arg_shape = _shape(arg)
            if arg.op in ("placeholder", "get_attr") and arg not in linears:
                if arg_shape and arg_shape[-1] > 1 and not passthrough:
                    if fixed is None or arg_shape[-1] != width:
                        return None  # a parameter per channel would not move with a channel permutation
                    fixed.append(f"{arg.name} {list(arg_shape)} scales each channel on the way to the product: "
                                 "permuting channels would change the function")
                continue
            if not passthrough and _same_for_every_channel(arg, linears):
                continue  # e.g. softplus(alpha) of a learned activation (xIELU)
            if (not passthrough and fixed is not None and arg_shape and arg_shape[-1] == width and len(arg_shape) == 1
                    and _parameters_only(arg, linears)):
                fixed.append(f"{arg.name} {list(arg_shape)} (computed from parameters) scales each channel on the "
                             "way to the product: permuting channels would change the function")
                continue
            # x - statistic(x): a shift by a statistic of every channel (the same in any order); a scale by one
            # (a norm) is left to _normed_input, which knows norm weights
            statistic = (node.target in (aten.sub.Tensor, aten.add.Tensor) and arg not in linears and arg_shape
                         and shape and len(arg_shape) == len(shape) and arg_shape[-1] == 1 and shape[-1] == width
                         and _channel_statistic(arg, width, linears))
            if statistic:  # walk on into what it reduces
                for reduced in statistic:
                    if reduced not in seen:
                        seen.add(reduced)
                        queue.append(reduced)
                continue
            if not passthrough and arg not in linears and arg_shape != shape:
                return None  # e.g. rsqrt(mean(x)) of a norm: not pointwise in the channels
            seen.add(arg)
            queue.append(arg)
        if len(seen) > 200:
            return None
    return found


def _strip(node: fx.Node) -> fx.Node:
    """Walk back through identities and plain reshapes that keep the last dimension."""
    while (node.op == "call_function" and (node.target in _IDENTITIES or node.target in (
            aten.view.default, aten.reshape.default, aten._unsafe_view.default))
           and isinstance(node.args[0], fx.Node) and _shape(node.args[0])
           and _shape(node.args[0])[-1] == (_shape(node) or (0,))[-1]):
        node = node.args[0]
    return node


def _channel_rows(lin: _Linear, operand: fx.Node, channels: int) -> list[int] | None:
    """Which output rows of ``lin`` reach ``operand`` (a gate or up input of the product), in order."""
    node = operand  # pointwise ops (the activation) keep the channel order: walk back past them
    for _ in range(64):
        if node is lin.node or node.target in _RESHAPES or node.target in _IDENTITIES:
            break
        parents = [a for a in node.all_input_nodes if _shape(a) == _shape(node)]
        if not parents:
            return None
        node = parents[0]
    if node is lin.node:
        return list(range(lin.out_features)) if lin.out_features == channels else None
    for reached, prov in _follow(lin.node, _provenance(_shape(lin.node)), lambda n, p: n is node):
        if reached is node and isinstance(prov, torch.Tensor) and prov.shape[-1] == channels:
            return prov.reshape(-1, channels)[0].remainder(lin.out_features).tolist()
    return None


def _activation_between(operand: fx.Node, lin_node: fx.Node) -> str | None:
    """Name of the elementwise activation on the path from ``lin_node`` to ``operand`` (None if none)."""
    node, names, thresholded = operand, [], False
    for _ in range(64):
        if node is lin_node or not isinstance(node, fx.Node) or node.op != "call_function":
            break
        if node.target in (aten.sub.Tensor, aten.add.Tensor) and any(
                isinstance(a, fx.Node) and (_shape(a) or (0,))[-1] == 1 != (_shape(node) or (1,))[-1]
                for a in node.args[:2]):
            thresholded = True  # x - statistic(x) (Gemma 3n's activation sparsity): no activation by itself
        elif node.target in _ACTIVATIONS:
            names.append(_ACTIVATIONS[node.target])
            if node.target == aten.gelu.default and node.kwargs.get("approximate") == "tanh":
                names[-1] = "gelu_tanh"
        elif node.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(node.args[0], fx.Node) and (
                not isinstance(node.args[1], fx.Node) or _parameters_only(node.args[1], {})):
            node = node.args[0]  # a scale by parameters (nGPT's per-channel suv): not an activation
            continue
        elif node.target not in _RESHAPES and node.target not in _IDENTITIES:
            names.append("custom")
        parents = [a for a in node.all_input_nodes if _shape(a) and _shape(a)[-1] == (_shape(node) or (0,))[-1]]
        if not parents:
            break
        node = parents[0]
    if not names:
        return None
    named = [n for n in names if n != "custom"]
    if thresholded:  # report the outer activation: the relu right after the threshold is the sparsifier
        return f"{named[0] if named else 'custom'} of a thresholded gate"
    return named[-1] if named else "custom"


_SQUARES = {aten.pow.Tensor_Scalar, aten.square.default, aten.abs.default}


def _normed_input(start: fx.Node, names: dict[str, str]) -> tuple[fx.Node, str] | None:
    """``(x, why)`` when ``start`` is a norm over the last dim of ``x`` (``rms_norm``/``layer_norm``, or written
    out: ``x * rsqrt(mean(x^2) + eps) [* w]``, ``x / ||x||``), else None. Such a norm over every FFN channel gives
    the same RMS in any channel order, but its weight (one per channel) would have to move with them."""
    node = _strip(start)
    if node.op == "call_function" and node.target in _NORMS and len(node.args[1]) == 1:
        return node.args[0], f"{_op_name(node)} over every channel lies between the FFN product and its down projection"
    reductions, seen, queue = [], {node}, deque([node])
    while queue and len(seen) < 48:
        current = queue.popleft()
        if current.op != "call_function":
            continue
        if current.target in _REDUCTIONS or current.target == aten.linalg_vector_norm.default:
            reductions.append(current)
            continue
        if not (_pointwise(current.target) or current.target in _IDENTITIES or current.target in _RESHAPES):
            continue  # a linear (or any other op) ends the walk back
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    if len(reductions) != 1:
        return None
    reduction = reductions[0]
    dims = reduction.args[1] if len(reduction.args) > 1 else reduction.kwargs.get("dim")
    rank = len(_shape(reduction.args[0]) or ())
    if [d % rank for d in ([dims] if isinstance(dims, int) else dims or [])] != [rank - 1]:
        return None
    x = reduction.args[0]  # mean(x^2): walk back to x
    while isinstance(x, fx.Node) and x.op == "call_function" and (
            x.target in _SQUARES or x.target in _IDENTITIES or x.target == aten.mul.Tensor and x.args[0] is x.args[1]):
        x = x.args[0]
    if not isinstance(x, fx.Node) or x not in seen or _shape(x) != _shape(node):
        return None
    path = _between(x, node)
    if path is None:
        return None
    inside = set(path) | {x}
    for step in path:  # what the norm brings in besides x: its weight, eps, numbers
        for operand in step.all_input_nodes:
            if operand not in inside and operand.op == "call_function" and not _same_for_every_channel(operand, {}):
                return None
    return x, f"a norm over every channel ({_op_name(reduction)}) lies between the FFN product and its down projection"


def _find_ffn(down: _Linear, linears, names: dict[str, str] | None = None) -> FFN | None:
    """The FFN whose down projection is ``down``, or None. Channels that cannot be permuted exactly (a norm over
    every channel before down, a per-channel scale on the way) give an FFN with ``fixed_order`` set."""
    channels = down.in_features
    fixed: list[str] = []
    source = down.input
    feeders = _pointwise_sources(source, linears, channels, fixed)
    if feeders is None:
        normed = _normed_input(source, names or {})
        if normed is None:
            return None
        source = normed[0]
        fixed.insert(0, normed[1] + ": permuting channels would move its weight")
        feeders = _pointwise_sources(source, linears, channels, fixed)
    if not feeders or len(feeders) > 2:
        return None
    down_proj = Projection(down.path, None, down.conv1d)
    product = _strip(source)
    if product.op == "call_function" and product.target == aten.mul.Tensor and all(
            isinstance(a, fx.Node) and _shape(a) == _shape(product) for a in product.args[:2]):
        branches = []
        for operand in product.args[:2]:
            sources = _pointwise_sources(operand, linears, channels, fixed)
            if sources is None or len(sources) != 1:
                return None
            lin = linears[next(iter(sources))]
            rows = _channel_rows(lin, operand, channels)
            if rows is None:
                return None
            branches.append((lin, rows, _activation_between(operand, lin.node)))
        (lin_a, rows_a, act_a), (lin_b, rows_b, act_b) = branches
        if not (lin_a is lin_b and rows_a == rows_b):  # x * f(x) (e.g. a written-out GELU) is not gated
            if (act_a is None) == (act_b is None):
                return None  # both or neither activated: cannot tell gate from up
            (g, g_rows, act), (u, u_rows, _) = branches if act_a is not None else branches[::-1]
            gate = Projection(g.path, _index_or_none(g_rows, g.out_features), g.conv1d)
            up = Projection(u.path, _index_or_none(u_rows, u.out_features), u.conv1d)
            return FFN(up=up, gate=gate, down=down_proj, channels=channels, activation=act,
                       fixed_order=fixed[0] if fixed else "")
    if len(feeders) == 1 and source is down.input:  # after a norm only act(gate) * up: a residual -> norm -> linear
        lin = linears[next(iter(feeders))]  # (any pre-norm block) would look like act(up) -> norm -> down
        act = _activation_between(source, lin.node)
        if act is None or lin.out_features != channels:
            return None
        return FFN(up=Projection(lin.path, None, lin.conv1d), gate=None, down=down_proj, channels=channels,
                   activation=act, fixed_order=fixed[0] if fixed else "")
    return None


@fxpass(reads=("captured",), writes=("structure",))
def find_structure(captured: Captured) -> PassResult:
    """Find every transformer block's attention and FFN in the captured graph (a :class:`Structure`).

    Reads only the graph; ``ValueError`` if it holds no attention and no FFN.

    >>> import fxsparse
    >>> from fxsparse.capture import capture
    >>> from fxsparse.models import tiny_model
    >>> result = find_structure(captured=capture(tiny_model("llama")))
    >>> len(result.outputs["structure"].blocks), result.outputs["structure"].unrecognized
    (2, ['lm_head'])
    """
    structure = discover(captured)
    attention = sum(block.attention is not None for block in structure.blocks)
    ffn = sum(block.ffn is not None for block in structure.blocks)
    info = f"{len(structure.blocks)} blocks ({attention} attention, {ffn} FFN), unrecognized {structure.unrecognized}"
    return PassResult(False, info, outputs={"structure": structure})


def discover(captured: Captured) -> Structure:
    """The analysis behind :func:`find_structure`, as a plain function of a :class:`Captured` graph."""
    linears, refused = _linears(captured)
    names = {**captured.param_names, **captured.buffer_names}
    sites, failed = _sites(captured, names)
    qkv = _attention_projections(sites, linears)
    attentions: list[tuple[fx.Node, Attention]] = []
    claimed: set[fx.Node] = set()
    reasons: dict[str, str] = {}
    for softmax, why in failed:
        feeders = [linears[n].path for n in _ancestors(softmax.args[0], linears) if n in linears]
        reasons.update(dict.fromkeys(feeders, f"attention at {softmax.name}: {why}"))
    used_norms: set[str] = set()
    for site in sites:
        roles = qkv[site.node]
        if set(roles) != {"q", "k", "v"}:
            missing = [role for role in "qkv" if role not in roles]
            arg = {"q": site.q, "k": site.k, "v": site.v}[missing[0]]
            op = _first_mixing_op(arg, linears)
            built = f" (it is built by {_op_name(op)}, e.g. heads joined with a part shared by all heads)" if op else ""
            reasons.update(dict.fromkeys((lin.path for lin, _, _ in roles.values()), (
                f"the {'/'.join(missing)} input of attention {site.node.name} comes from no linear through "
                f"reshapes and elementwise ops{built}")))
            continue
        (q_lin, heads, q_rows), (k_lin, kv_heads, k_rows), (v_lin, v_heads, v_rows) = (
            roles["q"], roles["k"], roles["v"])
        paths = [q_lin.path, k_lin.path, v_lin.path]
        head_dim, k_dim, v_dim = len(q_rows) // heads, len(k_rows) // kv_heads, len(v_rows) // v_heads
        if v_heads != kv_heads or heads % kv_heads:
            reasons.update(dict.fromkeys(paths, (
                f"attention {site.node.name}: {heads} query heads of {head_dim}, {kv_heads} key heads of "
                f"{k_dim}, {v_heads} value heads of {v_dim}: not one GQA grouping")))
            continue
        out = _output_projection(site.out, linears, heads, v_dim)
        if out is None:
            reasons.update(dict.fromkeys(paths, f"no linear takes the output of attention {site.node.name} "
                                                "through reshapes and elementwise ops"))
            continue
        o_lin, o_cols, gate_rows, blocker = out
        if any(g is not q_lin and g.node in claimed for g, rows in gate_rows if rows is not None):
            blocker = "an output gate of this attention is part of another structure"
        paths.append(o_lin.path)
        slot_heads: dict[fx.Node, list[int]] = {}
        norm_paths: dict[str, list[str]] = {"q": [], "k": [], "v": []}
        blocker = blocker or site.blocker or next(
            (why for role, arg in zip("qkv", (site.q, site.k, site.v))
             if (why := _head_blocker(roles[role][0], roles[role][2], roles[role][1], arg, linears, names, slot_heads,
                                      norm_paths[role])) is not None), None)
        blocker = blocker or _pairing_blocker(site, heads, kv_heads, slot_heads)
        norm_roles = [(role if role == "q" else "k", path) for role in "qkv" for path in norm_paths[role]]
        if not blocker and len({path for _, path in norm_roles}) != len(norm_roles) or any(
                path in used_norms for _, path in norm_roles):
            blocker = "a norm weight is shared by several projections or attentions: its rows cannot follow all"
        if blocker:  # the heads stay in place: nothing else has to move with them
            reasons.update({g.path: f"an output gate of an attention whose heads stay in place ({blocker}): "
                                    "not trained" for g, _ in gate_rows if g not in (q_lin, k_lin, v_lin, o_lin)})
            gate_rows, norm_roles = [], []
        used_norms.update(path for _, path in norm_roles)
        slots = list(slot_heads.get(site.q, range(heads)))
        if sorted(slots) != list(range(heads)):
            slots = list(range(heads))  # (fixed order) o's columns counted by the attention output's head slots
        gates = tuple(Projection(g.path, tuple(_by_head(rows, slots, len(rows) // heads)), g.conv1d)
                      for g, rows in gate_rows)  # index always given: its length says the rows per head
        dims = tuple((role, dim) for role, dim in (("k", k_dim), ("v", v_dim), ("o", v_dim)) if dim != head_dim)
        attention = Attention(
            q=Projection(q_lin.path, _index_or_none(q_rows, q_lin.out_features), q_lin.conv1d),
            k=Projection(k_lin.path, _index_or_none(k_rows, k_lin.out_features), k_lin.conv1d),
            v=Projection(v_lin.path, _index_or_none(v_rows, v_lin.out_features), v_lin.conv1d),
            o=Projection(o_lin.path, _index_or_none(_by_head(o_cols, slots, v_dim), o_lin.in_features),
                         o_lin.conv1d),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, gates=gates, role_dims=dims,
            norms=tuple((role, Projection(path, tuple(roles[role][2]))) for role, path in norm_roles),
            fixed_order=blocker or "",
        )
        attentions.append((site.node, attention))
        claimed.update((q_lin.node, k_lin.node, v_lin.node, o_lin.node, *(g.node for g, _ in gate_rows)))
    ffns: list[tuple[fx.Node, FFN]] = []
    for node, lin in linears.items():
        if node in claimed:
            continue
        ffn = _find_ffn(lin, linears, names)
        if ffn is not None:
            ffns.append((node, ffn))
    calls: dict[str, int] = {}
    for lin in linears.values():
        calls[lin.path] = calls.get(lin.path, 0) + 1
    if any(count > 1 for count in calls.values()):
        attentions = _merge_repeats(attentions, calls, reasons)
        ffns = _merge_repeats(ffns, calls, reasons)
    blocks = _pair_blocks(attentions, ffns, linears)
    if not blocks:
        raise ValueError(
            f"no attention or FFN found in {type(captured.model).__name__}: no linear reaches "
            "scaled_dot_product_attention and no act(gate) * up -> down or act(up) -> down pattern exists"
            + (f" ({next(iter(reasons.values()))})" if reasons else "")
        )
    refused.update(_stacked_weights(captured))
    paths = list(dict.fromkeys([lin.path for lin in linears.values()] + list(refused)))
    reasons.update(refused)
    placed = set()
    for block in blocks:
        placed.update(p.path for p in block.projections().values())
        placed.update(g.path for g in (block.attention.gates if block.attention is not None else ()))
    unrecognized = [p for p in paths if p not in placed]
    return Structure(blocks=blocks, unrecognized=unrecognized, linear_paths=paths,
                     reasons={p: why for p, why in reasons.items() if p in unrecognized})


def _record_paths(record) -> list[str]:
    paths = [p.path for p in record.projections().values()]
    if isinstance(record, Attention):
        paths += [g.path for g in record.gates]
    return list(dict.fromkeys(paths))


def _merge_repeats(records: list[tuple[fx.Node, object]], calls: dict[str, int], reasons: dict[str, str]):
    """One record per structure that the forward runs several times (a looped or recurrent decoder calling
    the same block again): permuting units inside modules that are only ever called together, as that one
    structure, is exact for every call. Records that agree on their modules but not on their layout are all
    dropped; so is any record with a module called elsewhere too (permuting it would change the other call).
    A repeat whose heads must stay in place keeps them in place for every call."""
    groups: dict[tuple[str, ...], list[tuple[fx.Node, object]]] = {}
    for node, record in records:
        groups.setdefault(tuple(_record_paths(record)), []).append((node, record))
    kept = []
    for paths, group in groups.items():
        first_node, first = group[0]
        fixed = next((r.fixed_order for _, r in group if r.fixed_order), "")
        layouts = {dataclasses.replace(r, fixed_order="", **({"gates": (), "norms": ()} if isinstance(r, Attention)
                                                             else {})) for _, r in group}
        elsewhere = [p for p in paths if calls[p] != len(group)]
        if elsewhere:
            why = (f"{elsewhere[0]} is called {calls[elsewhere[0]]} times in the forward, {len(group)} of them "
                   "in this structure (a module shared with something else): permuting its units would change "
                   "the other calls")
        elif len(layouts) > 1:
            why = f"{paths[0]} is called {len(group)} times, and the calls do not agree on its heads or channels"
        else:
            if fixed and not first.fixed_order:
                extra = {"gates": (), "norms": ()} if isinstance(first, Attention) else {}
                first = dataclasses.replace(first, fixed_order=fixed, **extra)
            kept.append((first_node, first))
            continue
        reasons.update(dict.fromkeys(paths, why))
    order = {node: i for i, node in enumerate(records[0][0].graph.nodes)} if records else {}
    return sorted(kept, key=lambda item: order[item[0]])


_PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.einsum.default, aten.linear.default,
             aten.baddbmm.default, aten.addmm.default}


def _stacked_weights(captured: Captured) -> dict[str, str]:
    """Parameters of three or more dims multiplied with activations (stacked expert weights), with why
    they stay dense: S²FT replaces 2-D nn.Linear/Conv1D weights only."""
    found = {}
    for node in captured.graph.nodes:
        name = captured.param_names.get(node.name)
        shape = _shape(node)
        if node.op != "placeholder" or name is None or shape is None or len(shape) < 3:
            continue
        frontier, depth = [node], 0
        while frontier and depth < 4:
            users = [u for n in frontier for u in n.users if u.op == "call_function"]
            if any(u.target in _PRODUCTS or "grouped_mm" in _op_name(u) for u in users):
                found[name] = (f"{name} {list(shape)} is a {len(shape)}-D weight (stacked experts, or heads kept as "
                               "their own axis), not an nn.Linear: S²FT cannot replace it, left dense")
                break
            frontier, depth = users, depth + 1
    return found


def _ffn_source(ffn: FFN, linears) -> fx.Node | None:
    """What the FFN's producers read, before any gather/reshape (experts read the same hidden state)."""
    producer = next((lin for lin in linears.values() if lin.path == ffn.up.path), None)
    node = producer.input if producer is not None else None
    while isinstance(node, fx.Node) and node.op == "call_function" and (
            node.target in _RESHAPES or node.target in _IDENTITIES or node.target in (
                aten.index.Tensor, aten.index_select.default)):
        node = node.args[0]
    return node


def _pair_blocks(attentions, ffns, linears) -> list[Block]:
    """Block i = the i-th attention (graph order) with the first FFN after it and before the next one.

    A further FFN before the next attention that reads the same hidden state as the block's FFN (an
    expert, a shared expert) is a block of its own, ``part_of`` that one; any other is a block of its own.
    """
    order = {}
    nodes = [n for n, _ in attentions] + [n for n, _ in ffns]
    if nodes:
        for index, node in enumerate(nodes[0].graph.nodes):
            order[node] = index
    events = sorted([(order[n], "attention", a) for n, a in attentions] +
                    [(order[n], "ffn", f) for n, f in ffns], key=lambda e: e[0])
    blocks: list[Block] = []
    attention, ffn, owner = None, None, None  # owner: (index, source) of the emitted block experts join

    def emit():
        blocks.append(Block(len(blocks), attention, ffn))

    for _, kind, record in events:
        if kind == "attention":
            if attention is not None or ffn is not None:
                emit()
            attention, ffn, owner = record, None, None
            continue
        source = _ffn_source(record, linears)
        if owner is None and ffn is not None and source is not None and source is _ffn_source(ffn, linears):
            owner = (len(blocks), source)
            emit()
            attention, ffn = None, None
        if owner is not None and source is owner[1]:
            blocks.append(Block(len(blocks), None, record, part_of=owner[0]))
            continue
        if ffn is not None:
            emit()
            attention = None
        ffn, owner = record, None
    if attention is not None or ffn is not None:
        emit()
    return blocks
