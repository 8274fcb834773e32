"""Pass: find attention heads, GQA groups and FFN channels from the captured graph's dataflow.

Nothing here reads attribute names. Q, K and V are the linears whose outputs reach
``scaled_dot_product_attention``'s query, key and value through reshapes only; O is the linear fed by
its output; an FFN is a linear ("down") whose input is ``act(gate) * up`` (gated) or ``act(up)``
(non-gated). Heads, KV heads and head size come from the reshapes: the output of each projection is
followed through view/transpose/slice/split ops with an integer *provenance tensor* (each element holds
the feature index it came from) until it has the (batch, seq, heads, head_dim) shape, which says exactly
which output rows of the weight form each head, also inside fused QKV or gate_up projections.

Heads are only recognised where permuting them is exact. Between each of q, k, v and the attention, a
*head-index tensor* (the head each element belongs to) is pushed through every op; an operand that is
not itself derived from the projection and differs from head to head (a per-head gain on Q, a
concatenated per-head sink, a bias added outside the linear) would not move with a head permutation,
so that attention is left unrecognised, with the reason in ``Structure.reasons``. So is an attention
whose mask has per-head slices (ALiBi-style slopes).

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

import operator
from collections import deque
from typing import NamedTuple

import torch
from torch import fx

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
    aten.narrow.default, operator.getitem,
}
# Ops that are the identity on values (dtype casts, copies, eval-mode dropout).
_IDENTITIES = {
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.to.dtype, aten.to.dtype_layout,
    aten._to_copy.default, aten.dropout.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.to.device,
}
_CONCATS = {aten.cat.default, aten.stack.default}
# Reductions that may sit between a projection and the attention (RMS norms of q and k over head_dim).
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_ACTIVATIONS = {
    aten.silu.default: "silu", aten.gelu.default: "gelu", aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid", aten.tanh.default: "tanh", aten.mish.default: "mish",
}
_SDPA = {aten.scaled_dot_product_attention.default}


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


def _linears(captured: Captured) -> dict[fx.Node, _Linear]:
    """Linear-like nodes: ``aten.linear`` and GPT-2 ``Conv1D``'s ``addmm(bias, x, W[in, out])``."""
    found: dict[fx.Node, _Linear] = {}
    for node in captured.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.linear.default:
            x, weight = node.args[0], node.args[1]
            conv1d = False
        elif node.target == aten.addmm.default:
            x, weight = node.args[1], node.args[2]
            conv1d = True
        else:
            continue
        if not isinstance(weight, fx.Node) or weight.name not in captured.param_names:
            continue  # a matmul with an activation, not a projection
        wshape = _shape(weight)
        if wshape is None or len(wshape) != 2:
            continue
        out_features, in_features = (wshape[1], wshape[0]) if conv1d else wshape
        path = module_path(node) or captured.param_names[weight.name].rsplit(".", 1)[0]
        found[node] = _Linear(node, path, x, in_features, out_features, conv1d)
    return found


def _provenance(shape: tuple[int, ...]) -> torch.Tensor:
    """Integer tensor of ``shape``: element = feature + features * token (token = flattened leading dims)."""
    features = shape[-1]
    tokens = 1
    for size in shape[:-1]:
        tokens *= size
    return torch.arange(tokens * features, dtype=torch.int64).reshape(shape)


def _apply(node: fx.Node, source: fx.Node, value):
    """Run ``node``'s reshape op with ``value`` in place of its input ``source``."""
    if node.target in _IDENTITIES:
        return value

    def sub(arg):
        return value if arg is source else arg

    args = tuple(sub(a) for a in node.args)
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
            elif user.op == "call_function" and (user.target in _RESHAPES or user.target in _IDENTITIES):
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
    return per_head.shape[0], per_head.tolist()


def _reaches(node: fx.Node, arg_of: dict[fx.Node, list[tuple]], limit: int = 400) -> list[tuple]:
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
            if user in arg_of:
                found.extend(arg_of[user])
            elif user.op == "call_function" and user.target not in _SDPA and user.target not in (
                    aten.linear.default, aten.addmm.default):
                queue.append(user)
    return found


def _index_or_none(rows: list[int], total: int) -> tuple[int, ...] | None:
    return None if rows == list(range(total)) else tuple(rows)


def _ancestors(arg: fx.Node, linears) -> set[fx.Node]:
    """``arg`` and the nodes it is computed from, up to (and including) linears, SDPA calls and inputs."""
    seen, queue = {arg}, deque([arg])
    while queue:
        node = queue.popleft()
        if node in linears or node.target in _SDPA or node.op != "call_function":
            continue
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return seen


def _attention_projections(sdpa_nodes, linears):
    """For each SDPA node: {"q"|"k"|"v": (linear, heads, rows)} found by following projections forward.

    Only linears that some attention input is computed from (without another linear in between) are
    followed: the provenance tensors are then the size of q/k/v outputs, never of an LM head's.
    """
    found: dict[fx.Node, dict[str, tuple[_Linear, int, list[int]]]] = {n: {} for n in sdpa_nodes}
    arg_of: dict[fx.Node, list[tuple]] = {}
    head_dims = set()
    feeders: dict[fx.Node, None] = {}
    for sdpa in sdpa_nodes:
        for role, arg in zip("qkv", sdpa.args[:3]):
            arg_of.setdefault(arg, []).append((sdpa, role))
            head_dims.add((_shape(arg) or (0,))[-1])
            feeders.update((node, None) for node in _ancestors(arg, linears) if node in linears)

    def is_heads(node, prov):
        return isinstance(prov, torch.Tensor) and prov.dim() == 4 and prov.shape[-1] in head_dims

    for lin in (linears[node] for node in linears if node in feeders):
        shape = _shape(lin.node)
        if shape is None:
            continue
        for node, prov in _follow(lin.node, _provenance(shape), is_heads, pointwise=True):
            if not isinstance(prov, torch.Tensor):
                continue
            view = _heads_view(prov, lin.out_features)
            if view is None:
                continue
            for sdpa, role in _reaches(node, arg_of):
                found[sdpa].setdefault(role, (lin, view[0], [r for head in view[1] for r in head]))
    return found


def _replay(node: fx.Node, values: dict[fx.Node, object]):
    """Run ``node``'s op with known ``values`` for its inputs and -1 filled tensors for the others."""
    if node.target in _IDENTITIES:
        return values[next(a for a in node.all_input_nodes if a in values)]

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
                  names: dict[str, str]) -> str | None:
    """Why permuting the ``heads`` of ``lin`` (``rows``: unit-major output rows) would change what
    reaches the attention input ``arg``; None when it would not (see the module docstring)."""
    shape = _shape(lin.node)
    if shape is None:
        return f"{lin.path}: no output shape in the graph"
    head_of_row = torch.full((lin.out_features,), -1, dtype=torch.int64)
    head_of_row[torch.tensor(rows)] = torch.arange(heads).repeat_interleave(len(rows) // heads)
    values: dict[fx.Node, object] = {lin.node: head_of_row.expand(shape).contiguous()}
    upstream = _ancestors(arg, linears)
    on_path, queue = set(), deque([lin.node])
    while queue:
        for user in queue.popleft().users:
            if user in upstream and user not in on_path:
                on_path.add(user)
                queue.append(user)
    order = {node: i for i, node in enumerate(arg.graph.nodes)}
    for node in sorted(on_path, key=order.__getitem__):
        inputs = [a for a in node.all_input_nodes if a in values]
        others = [a for a in node.all_input_nodes if a not in values]
        target = node.target
        try:
            if target in _RESHAPES or target in _IDENTITIES or target in _CONCATS:
                value = _replay(node, values)
                seen = value if isinstance(value, torch.Tensor) else None
            elif torch.Tag.pointwise in getattr(target, "tags", ()):
                out_shape = _shape(node)
                parts = [torch.broadcast_to(values[a], out_shape) for a in inputs]
                value = parts[0]
                for part in parts[1:]:  # two paths meet (x * rsqrt(mean(x^2))): the heads must agree
                    value = torch.where(value == part, value, -2)
                seen = value
            elif target in _REDUCTIONS:
                source = values[node.args[0]]
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
                high, low = source.amax(dims, keepdim), source.amin(dims, keepdim)
                value = seen = torch.where(high == low, high, -2)  # -2: a reduction over several heads
            else:
                return f"{_op_name(node)} lies between {lin.path} and the attention (heads not followed through it)"
        except Exception as exc:  # an op we cannot replay on head indices: do not guess
            return f"cannot follow the heads of {lin.path} through {_op_name(node)} ({type(exc).__name__})"
        if seen is not None:
            for other in others:
                if _per_head_operand(other, seen):
                    return (f"{_describe(other, names)} takes a different value per head on the way "
                            f"from {lin.path} to the attention ({_op_name(node)}): permuting heads would change "
                            "the function")
        values[node] = value
    final = values.get(arg)
    if isinstance(final, torch.Tensor) and bool((final < 0).any()):
        return f"the attention input from {lin.path} mixes heads or other rows"
    return None


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


def _output_projection(sdpa: fx.Node, linears, heads: int, head_dim: int):
    """The linear fed by the attention output, with the input column of each (head, dim) pair."""
    shape = _shape(sdpa)
    if shape is None or len(shape) != 4:
        return None
    batch, _, seq, _ = shape
    feature = torch.arange(heads * head_dim).reshape(1, heads, 1, head_dim)
    token = torch.arange(batch * seq).reshape(batch, 1, seq, 1)
    features = heads * head_dim
    prov = (feature + features * token).expand(batch, heads, seq, head_dim)
    for node, edge in _follow(sdpa, prov, lambda n, p: False):
        if not isinstance(edge, tuple) or edge[0] != "edge":
            continue
        _, user, value = edge
        lin = linears.get(user)
        if lin is None or lin.input is not node or not isinstance(value, torch.Tensor):
            continue
        columns = value.reshape(-1, value.shape[-1])[0].remainder(features)
        if value.shape[-1] != features or sorted(columns.tolist()) != list(range(features)):
            continue
        # unit-major list: column of (head h, dim d) at position h * head_dim + d
        order = torch.empty(features, dtype=torch.int64)
        order[columns] = torch.arange(features)
        return lin, order.tolist()
    return None


def _pointwise_sources(start: fx.Node, linears, width: int) -> set[fx.Node] | None:
    """Linear nodes that feed ``start`` through pointwise ops and reshapes only, or None if anything
    else (a reduction, a norm, another activation tensor) takes part: then this is no FFN."""
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
    node, names = operand, []
    for _ in range(64):
        if node is lin_node or not isinstance(node, fx.Node) or node.op != "call_function":
            break
        if node.target in _ACTIVATIONS:
            names.append(_ACTIVATIONS[node.target])
            if node.target == aten.gelu.default and node.kwargs.get("approximate") == "tanh":
                names[-1] = "gelu_tanh"
        elif node.target not in _RESHAPES and node.target not in _IDENTITIES:
            names.append("custom")
        parents = [a for a in node.all_input_nodes if _shape(a) and _shape(a)[-1] == (_shape(node) or (0,))[-1]]
        if not parents:
            break
        node = parents[0]
    if not names:
        return None
    named = [n for n in names if n != "custom"]
    return named[-1] if named else "custom"


def _find_ffn(down: _Linear, linears) -> FFN | None:
    channels = down.in_features
    feeders = _pointwise_sources(down.input, linears, channels)
    if not feeders or len(feeders) > 2:
        return None
    down_proj = Projection(down.path, None, down.conv1d)
    product = _strip(down.input)
    if product.op == "call_function" and product.target == aten.mul.Tensor and all(
            isinstance(a, fx.Node) and _shape(a) == _shape(product) for a in product.args[:2]):
        branches = []
        for operand in product.args[:2]:
            sources = _pointwise_sources(operand, linears, channels)
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
            return FFN(up=up, gate=gate, down=down_proj, channels=channels, activation=act)
    if len(feeders) == 1:
        lin = linears[next(iter(feeders))]
        act = _activation_between(down.input, lin.node)
        if act is None or lin.out_features != channels:
            return None
        return FFN(up=Projection(lin.path, None, lin.conv1d), gate=None, down=down_proj, channels=channels,
                   activation=act)
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
    linears = _linears(captured)
    names = {**captured.param_names, **captured.buffer_names}
    sdpa_nodes = [n for n in captured.graph.nodes if n.op == "call_function" and n.target in _SDPA]
    qkv = _attention_projections(sdpa_nodes, linears)
    attentions: list[tuple[fx.Node, Attention]] = []
    claimed: set[fx.Node] = set()
    reasons: dict[str, str] = {}
    for sdpa in sdpa_nodes:
        roles = qkv[sdpa]
        if set(roles) != {"q", "k", "v"}:
            missing = [role for role in "qkv" if role not in roles]
            reasons.update(dict.fromkeys((lin.path for lin, _, _ in roles.values()), (
                f"the {'/'.join(missing)} input of attention {sdpa.name} comes from no linear through reshapes "
                "and elementwise ops")))
            continue
        (q_lin, heads, q_rows), (k_lin, kv_heads, k_rows), (v_lin, v_heads, v_rows) = (
            roles["q"], roles["k"], roles["v"])
        head_dim = len(q_rows) // heads
        if v_heads != kv_heads or heads % kv_heads:
            continue
        paths = [q_lin.path, k_lin.path, v_lin.path]
        out = _output_projection(sdpa, linears, heads, (_shape(sdpa) or (0,))[-1])
        if out is None:
            reasons.update(dict.fromkeys(paths, f"no linear takes the output of attention {sdpa.name} through "
                                                "reshapes only"))
            continue
        o_lin, o_cols = out
        paths.append(o_lin.path)
        blocker = _mask_blocker(sdpa, names) or next(
            (why for (lin, count, rows), arg in zip((roles["q"], roles["k"], roles["v"]), sdpa.args[:3])
             if (why := _head_blocker(lin, rows, count, arg, linears, names)) is not None), None)
        if blocker is not None:
            reasons.update(dict.fromkeys(paths, blocker))
            continue
        attention = Attention(
            q=Projection(q_lin.path, _index_or_none(q_rows, q_lin.out_features), q_lin.conv1d),
            k=Projection(k_lin.path, _index_or_none(k_rows, k_lin.out_features), k_lin.conv1d),
            v=Projection(v_lin.path, _index_or_none(v_rows, v_lin.out_features), v_lin.conv1d),
            o=Projection(o_lin.path, _index_or_none(o_cols, o_lin.in_features), o_lin.conv1d),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        )
        attentions.append((sdpa, attention))
        claimed.update((q_lin.node, k_lin.node, v_lin.node, o_lin.node))
    ffns: list[tuple[fx.Node, FFN]] = []
    for node, lin in linears.items():
        if node in claimed:
            continue
        ffn = _find_ffn(lin, linears)
        if ffn is not None:
            ffns.append((node, ffn))
    blocks = _pair_blocks(attentions, ffns, linears)
    if not blocks:
        raise ValueError(
            f"no attention or FFN found in {type(captured.model).__name__}: no linear reaches "
            "scaled_dot_product_attention and no act(gate) * up -> down or act(up) -> down pattern exists"
            + (f" ({next(iter(reasons.values()))})" if reasons else "")
        )
    paths = list(dict.fromkeys(lin.path for lin in linears.values()))
    placed = set()
    for block in blocks:
        placed.update(p.path for p in block.projections().values())
    unrecognized = [p for p in paths if p not in placed]
    return Structure(blocks=blocks, unrecognized=unrecognized, linear_paths=paths,
                     reasons={p: why for p, why in reasons.items() if p in unrecognized})


def _pair_blocks(attentions, ffns, linears) -> list[Block]:
    """Block i = the i-th attention (graph order) with the first FFN after it and before the next one."""
    order = {}
    nodes = [n for n, _ in attentions] + [n for n, _ in ffns]
    if nodes:
        for index, node in enumerate(nodes[0].graph.nodes):
            order[node] = index
    events = sorted([(order[n], "attention", a) for n, a in attentions] +
                    [(order[n], "ffn", f) for n, f in ffns], key=lambda e: e[0])
    blocks: list[Block] = []
    current_attention, current_ffn = None, None
    for _, kind, record in events:
        if kind == "attention":
            if current_attention is not None or current_ffn is not None:
                blocks.append(Block(len(blocks), current_attention, current_ffn))
            current_attention, current_ffn = record, None
        else:
            if current_ffn is not None:
                blocks.append(Block(len(blocks), current_attention, current_ffn))
                current_attention = None
            current_ffn = record
    if current_attention is not None or current_ffn is not None:
        blocks.append(Block(len(blocks), current_attention, current_ffn))
    return blocks
