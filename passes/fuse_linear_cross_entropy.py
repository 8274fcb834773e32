"""Compiler pass: LM head + cross-entropy → ``fxsparse::linear_cross_entropy`` (chunked, no full fp32 logits).

Matches, in the torch-level graph dynamo hands a ``torch.compile`` backend, a cross-entropy whose input is
a linear layer's output, reached through flattening, dtype casts and ``contiguous`` only:

    logits = linear(hidden, weight, bias)            # (batch, seq, vocab): returned to the caller
    loss = cross_entropy(logits.float().view(-1, vocab), shift_labels, ignore_index=-100, reduction=...)

This is transformers 5's ``ForCausalLMLoss`` (LLaMA, Qwen2, GPT-2, Phi-3, ...: ``model(x, labels=x)``
shifts the labels in the graph, before this point). It becomes::

    loss, logits_flat, _, _ = fxsparse::linear_cross_entropy(hidden.reshape(-1, width), weight, bias,
                                                               shift_labels, ignore_index, ...)
    logits = logits_flat.view(batch, seq, vocab)        # only if something still uses the logits

so the float32 ``tokens x vocab`` logits are never saved for backward (see
``fxsparse.codegen.cross_entropy`` for the gradient modes: a frozen head computes ``dhidden`` chunk by chunk
in forward, a trainable one recomputes each chunk in backward). Anything else is left alone and
recorded as skipped with the reason: class weights, label smoothing, a reduction other than mean/sum,
autocast (the op would not follow the autocast dtype), a chain with other ops, dynamic vocabulary sizes.

>>> import torch
>>> from torch.nn import functional as F
>>> from fxsparse.passes.compile_records import fusions
>>> head = torch.nn.Linear(8, 11, bias=False)
>>> def loss_fn(h, y):
...     return F.cross_entropy(head(h).float().view(-1, 11), y.view(-1))
>>> graphs = []
>>> def backend(gm, example_inputs):
...     fuse_linear_cross_entropy(gm)
...     graphs.append(gm)
...     return gm.forward
>>> h, y = torch.randn(2, 3, 8), torch.randint(0, 11, (2, 3))
>>> loss = torch.compile(loss_fn, backend=backend)(h, y)
>>> torch.allclose(loss, loss_fn(h, y))
True
>>> [f.status for f in fusions(graphs[0])]
['fused']
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.nn import functional as F

from fxsparse.passes.compile_records import (
    FUSED,
    SKIPPED,
    Fusion,
    Rewrite,
    erase_unused,
    example_value,
    fake_mode_of,
    finish,
    is_linear,
    linear_args,
    module_path,
    propagate,
    record,
)
from fxsparse.passes.manager import PassResult, fxpass

__all__ = ["PASS_NAME", "fuse_linear_cross_entropy"]

PASS_NAME = "linear_cross_entropy"
_CE_TARGETS = (F.cross_entropy,)
_CE_SIGNATURE = inspect.signature(F.cross_entropy)
# Ops allowed between the head and the loss: they flatten or cast, never mix tokens or vocabulary entries.
_PASS_THROUGH_METHODS = {"float", "contiguous", "view", "reshape", "to"}


@dataclass(frozen=True)
class _Options:
    chunk_rows: int
    grad_in_forward: bool


@dataclass
class _Match:
    ce: fx.Node
    linear: fx.Node
    chain: list[fx.Node]
    hidden: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    labels: fx.Node
    ignore_index: int
    sum_reduction: bool
    width: int
    logits_shape: tuple[int, ...]
    loss_dtype: torch.dtype
    grad_needed: bool
    head_trains: bool


@fxpass(reads=("graph",), writes=("graph",), options=("chunk_rows", "grad_in_forward"))
def fuse_linear_cross_entropy(graph: fx.GraphModule, chunk_rows: int = 0, grad_in_forward: bool = True) -> PassResult:
    """Replace every LM-head + cross-entropy pair of ``graph`` by one chunked op; record each candidate.

    ``chunk_rows``: tokens per chunk (0: ``auto_chunk_rows``). ``grad_in_forward``: with a frozen head,
    compute ``dhidden`` in forward (no extra GEMM); False recomputes each chunk in backward instead.
    """
    import fxsparse.codegen.cross_entropy as ce_ops  # registers fxsparse::linear_cross_entropy

    if not isinstance(chunk_rows, int) or chunk_rows < 0:
        raise ValueError(f"chunk_rows must be an int >= 0 (0: automatic), got {chunk_rows!r}")
    gm = graph
    config = _Options(chunk_rows, grad_in_forward)
    fake_mode = fake_mode_of(gm)
    fused = skipped = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _CE_TARGETS]:
        match = _match(node)
        if isinstance(match, str):
            record(gm, Fusion(PASS_NAME, module_path(node) or f"node {node.name}", SKIPPED, match))
            skipped += 1
            continue
        where = module_path(match.linear) or module_path(node)
        error = _rewrite(gm, match, config, ce_ops, fake_mode)
        if error:
            record(gm, Fusion(PASS_NAME, where, SKIPPED, error))
            skipped += 1
        else:
            mode = {ce_ops.GRAD_NONE: "no grad", ce_ops.GRAD_IN_FORWARD: "dhidden in forward",
                    ce_ops.GRAD_RECOMPUTE: "backward recomputes"}[_grad_mode(match, config, ce_ops)]
            record(gm, Fusion(PASS_NAME, where, FUSED, f"vocab {match.logits_shape[-1]}, {mode}"))
            fused += 1
    finish(gm, fused > 0)
    return PassResult(fused > 0, f"fused {fused}, skipped {skipped}", outputs={"graph": gm})


def _bind(node: fx.Node) -> dict | None:
    try:
        bound = _CE_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _match(ce: fx.Node) -> _Match | str:
    """The pattern around ``ce``, or why it does not match."""
    args = _bind(ce)
    if args is None:
        return "cross_entropy called with arguments this pass does not know"
    if args["weight"] is not None:
        return "class weights"
    if args["size_average"] is not None or args["reduce"] is not None:
        return "legacy size_average/reduce arguments"
    if args["label_smoothing"] != 0.0:
        return "label smoothing"
    if args["reduction"] not in ("mean", "sum"):
        return f"reduction={args['reduction']!r} (only mean and sum fuse)"
    if not isinstance(args["ignore_index"], int):
        return "ignore_index is not a constant int"
    logits_in, labels = args["input"], args["target"]
    ce_val, logits_val, labels_val = example_value(ce), example_value(logits_in), example_value(labels)
    if ce_val is None or logits_val is None or labels_val is None:
        return "no example values on the graph (not a dynamo graph?)"
    if logits_val.dim() != 2 or labels_val.dim() != 1 or labels_val.dtype != torch.long:
        return "cross_entropy input is not (tokens, vocab) logits with (tokens,) int64 labels"
    chain, node = [], logits_in
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _PASS_THROUGH_METHODS:
        if node.target == "to" and not _is_dtype_cast(node):
            return "a .to() other than a dtype cast between head and loss"
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node) or not is_linear(node):
        return "cross_entropy input does not come from a linear layer through flatten/cast ops only"
    hidden, weight, bias = linear_args(node)
    lin_val, w_val, h_val = example_value(node), example_value(weight), example_value(hidden)
    if lin_val is None or w_val is None or h_val is None or w_val.dim() != 2:
        return "head without example values or with a non-matrix weight"
    shape = tuple(lin_val.shape)
    if not all(isinstance(d, int) for d in (*w_val.shape, h_val.shape[-1])):
        return "dynamic vocabulary or hidden size"
    if lin_val.dtype != w_val.dtype or h_val.dtype != w_val.dtype:
        return f"autocast or mixed dtypes (logits {lin_val.dtype}, weight {w_val.dtype}, hidden {h_val.dtype})"
    vocab, n_tokens = shape[-1], math.prod(shape[:-1])
    # Token counts may be symbolic (dynamic batch/sequence): compare them as expressions, never guard.
    if not (_same(logits_val.shape, (n_tokens, vocab)) and _same(labels_val.shape, (n_tokens,))):
        return f"loss input {tuple(logits_val.shape)} is not the head output {shape} flattened"
    if not logits_val.dtype.is_floating_point:
        return "non-float logits"
    bias_val = example_value(bias) if bias is not None else None
    head_trains = bool(w_val.requires_grad or (bias_val is not None and bias_val.requires_grad))
    return _Match(ce, node, chain, hidden, weight, bias, labels, args["ignore_index"],
                  args["reduction"] == "sum", h_val.shape[-1], shape, ce_val.dtype,
                  bool(ce_val.requires_grad), head_trains)


def _same(shape, expected) -> bool:
    """Equal sizes, symbolic ones compared as expressions (no guard is added)."""
    return len(shape) == len(expected) and all(a is b or str(a) == str(b) for a, b in zip(shape, expected))


def _is_dtype_cast(node: fx.Node) -> bool:
    """``x.to(dtype)`` / ``x.to(dtype=...)``: a cast that does not move the tensor."""
    args = list(node.args[1:])
    kwargs = dict(node.kwargs)
    if kwargs.keys() - {"dtype"}:
        return False
    if len(args) == 1 and isinstance(args[0], torch.dtype) and not kwargs:
        return True
    return not args and isinstance(kwargs.get("dtype"), torch.dtype)


def _grad_mode(match: _Match, config: _Options, ce_ops) -> int:
    if not match.grad_needed:
        return ce_ops.GRAD_NONE
    if match.head_trains or not config.grad_in_forward:
        return ce_ops.GRAD_RECOMPUTE
    return ce_ops.GRAD_IN_FORWARD


def _rewrite(gm: fx.GraphModule, match: _Match, config: _Options, ce_ops, fake_mode) -> str:
    """Put the fused op in place; returns "" or, having changed nothing, why it could not."""
    op = torch.ops.fxsparse.linear_cross_entropy.default
    mode = _grad_mode(match, config, ce_ops)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    early = [u for u in match.linear.users if u not in match.chain and order[u] < order[match.ce]]
    if early:
        # The fused op sits where the loss was; a reader of the logits before that point would lose them.
        return f"the logits are read before the loss ({early[0].name})"
    rw = Rewrite(gm, match.ce, fake_mode)
    try:
        hidden = rw.call_method("reshape", (match.hidden, (-1, match.width)))
        # keep_logits is settled below, once it is known whether anything else reads the logits.
        fused = rw.call_function(op, (hidden, match.weight, match.bias, match.labels, match.ignore_index,
                                      match.sum_reduction, mode, True, config.chunk_rows))
        loss = rw.call_function(operator.getitem, (fused, 0))
        acc = example_value(loss).dtype
        if acc != match.loss_dtype:
            loss = rw.call_method("to", (loss, match.loss_dtype))
        flat = rw.call_function(operator.getitem, (fused, 1))
        if all(isinstance(d, int) for d in match.logits_shape):
            logits = rw.call_method("view", (flat, match.logits_shape))
        else:  # symbolic batch/sequence: the leading sizes of hidden, read in the graph
            sizes = rw.call_method("size", (match.hidden,))
            lead = rw.call_function(operator.getitem, (sizes, slice(None, -1)))
            logits = rw.call_method("view", (flat, rw.call_function(operator.add, (lead, (match.logits_shape[-1],)))))
    except Exception as exc:  # noqa: BLE001 - a replacement that does not type-check leaves the graph alone
        rw.undo()
        return f"replacement failed: {type(exc).__name__}: {exc}"
    match.ce.replace_all_uses_with(loss)
    gm.graph.erase_node(match.ce)
    erase_unused(match.chain)
    if match.linear.users:
        # Something else (the returned CausalLMOutput.logits) reads the logits: the op writes them out
        # chunk by chunk; they are an output, not a saved tensor.
        match.linear.replace_all_uses_with(logits)
    else:
        logits_item = logits.args[0]
        gm.graph.erase_node(logits)
        gm.graph.erase_node(logits_item)
        fused.args = fused.args[:7] + (False,) + fused.args[8:]
        if fake_mode is not None:
            propagate(fused, fake_mode)
    gm.graph.erase_node(match.linear)
    return ""
