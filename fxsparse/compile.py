"""The ``torch.compile`` backend ``"fxsparse"``: fusion passes over dynamo's graph, then inductor.

Registered through the ``torch_dynamo_backends`` entry point, so ``torch.compile(model, backend="fxsparse")``
works after ``pip install`` without importing fxsparse first.

Design. Dynamo hands the backend a torch-level FX graph (parameters lifted to inputs, fake tensors in
``node.meta["example_value"]``). The passes rewrite *that* graph, before AOT autograd, and every fusion
they insert is a ``torch.library`` custom op carrying its own backward (``register_autograd``). AOT
autograd (inside inductor's ``compile_fx``, which is called once and never wrapped again) then traces the
rewritten graph into forward and backward graphs in which each fused op is one opaque node whose saved
tensors are exactly what its autograd formula saves. The alternative, pattern passes over the ATen
forward/backward graphs after partitioning, would have to match the decomposed softmax/nll backward and
re-derive what to save in two graphs at once; the torch-level patterns are few, stable across the
transformers models we target, and readable. Weight rewrites (permutations, S²FT/SLTrain layers)
happened before compile in ``fxsparse.transform``; dynamo lifts parameters to graph inputs, so the
backend only fuses ops.

Passes (``options={"passes": [...]}`` or ``"all"``; they run in this order). Each is an ``@fxpass`` of
:mod:`fxsparse.passes.manager` that reads (and writes) ``graph``, so ``python -m fxsparse.passes --list``
shows them and a :class:`~fxsparse.passes.manager.PassManager` pipeline can run them; the backend runs
them one by one on a copy of dynamo's graph and undoes a pass that raises (recording why), so a pass
bug costs a fusion, never the user's compile:

- ``linear_cross_entropy`` (:mod:`fxsparse.passes.fuse_linear_cross_entropy`): LM head + cross-entropy →
  ``fxsparse::linear_cross_entropy``, chunked, never saving the float32 ``tokens x vocab`` logits;
- ``gated_activation`` (:mod:`fxsparse.passes.fuse_gated_activation`): ``act(gate) * up`` →
  ``fxsparse::gated_act_mul``, saving gate and up only;
- ``sibling_linears`` (:mod:`fxsparse.passes.fuse_sibling_linears`): frozen Q/K/V (gate/up) reading one
  input → one GEMM over the concatenated weights (built once, rebuilt when a weight changes);
- ``layer_ops`` (:mod:`fxsparse.passes.compile_layer_ops`): checks that every S²FT/SLTrain layer is one
  fused ``fxsparse::`` op (their layers call the codegen ops directly; nothing to rewrite).

Defaults (:data:`DEFAULT_PASSES`) follow measurements on SmolLM2-135M, batch 2 x 128, 2 CPU threads:
with inductor, ``linear_cross_entropy`` and ``layer_ops``. The LM-head fusion removes the 48 MiB of
saved float32 logits (S²FT: 217 -> 170 MB saved; LoRA: 299 -> 252 MB) and its chunked op runs the head
and loss in 451 ms of CPU time where inductor's own code takes 481. ``gated_activation`` saves nothing
under inductor (its partitioner already recomputes ``act(gate)``: 299 MB with or without, LoRA) and
costs 3% of step time as an opaque op, so it is on by default only for ``aot_eager``/``eager``, where
it does save a tensor per block. ``sibling_linears`` measured no gain on the CPU (S²FT: 1165 ms either
way) for a copy of the fused frozen weights (264 MB on SmolLM2): on request only.

A pattern that does not match exactly is left alone; :func:`compile_report` lists, for every graph the
backend compiled, which passes fired where and why the others did not. Other options: ``compiler``
(``"inductor"``, the default; ``"aot_eager"`` or ``"eager"`` run the rewritten graph without inductor, for
debugging and quick tests), ``chunk_rows`` and ``grad_in_forward`` (see
:func:`~fxsparse.passes.fuse_linear_cross_entropy.fuse_linear_cross_entropy`), ``inductor`` (a dict of
inductor config patches); ``mode=`` is passed on to inductor as ``torch.compile`` would.

>>> import torch, fxsparse
>>> from fxsparse.models import tiny_model
>>> model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5})
>>> compiled = torch.compile(model, backend="fxsparse", options={"compiler": "aot_eager"})
>>> x = torch.randint(0, 96, (1, 8))
>>> compiled(x, labels=x).loss.backward()
>>> print(compile_report(model).summary())
linear_cross_entropy: 1 fused
gated_activation: 2 found
s2ft_split_gemm: 2 found
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = ["PASSES", "DEFAULT_PASSES", "COMPILERS", "CompileOptions", "CompileReport", "GraphRecord",
           "fxsparse_backend", "compile_report", "clear_compile_report", "compile_module", "uncompile_module"]

log = logging.getLogger(__name__)


def _setup_dynamo() -> None:
    from fxsparse.passes.compile_records import quiet_transformers_once_warnings

    quiet_transformers_once_warnings()

PASSES = ("linear_cross_entropy", "gated_activation", "sibling_linears", "layer_ops")
COMPILERS = ("inductor", "aot_eager", "eager")
# What runs when ``passes`` is not given, per compiler. Measured on SmolLM2-135M, batch 2 x 128, 2 CPU
# threads (benchmarks/bench_compile.py and the numbers in the module docstring): under inductor the gated
# activation op saves nothing (inductor's partitioner already recomputes act(gate) instead of saving it:
# 299.1 MB saved with and without the pass, PEFT LoRA) and costs 3% of step time (an opaque op where
# inductor fuses), and the sibling GEMMs gain nothing on the CPU (1165 ms with and without, S²FT) while
# their concatenated copies of the frozen weights cost 264 MB. Both stay available by name.
DEFAULT_PASSES = {
    "inductor": ("linear_cross_entropy", "layer_ops"),
    "aot_eager": ("linear_cross_entropy", "gated_activation", "layer_ops"),
    "eager": ("linear_cross_entropy", "gated_activation", "layer_ops"),
}


def _pass_table() -> dict[str, Callable[..., Any]]:
    """Option name -> the ``@fxpass`` function (each reads ``graph``; options come from CompileOptions)."""
    from fxsparse.passes.compile_layer_ops import check_layer_ops
    from fxsparse.passes.fuse_gated_activation import fuse_gated_activation
    from fxsparse.passes.fuse_linear_cross_entropy import fuse_linear_cross_entropy
    from fxsparse.passes.fuse_sibling_linears import fuse_sibling_linears

    return {
        "linear_cross_entropy": fuse_linear_cross_entropy,
        "gated_activation": fuse_gated_activation,
        "sibling_linears": fuse_sibling_linears,
        "layer_ops": check_layer_ops,
    }


@dataclass(frozen=True)
class CompileOptions:
    """The backend's options (``torch.compile(..., backend="fxsparse", options={...})``), validated.

    >>> CompileOptions.parse({"passes": ["gated_activation"], "compiler": "aot_eager"}).passes
    ('gated_activation',)
    """

    passes: tuple[str, ...] | None = None  # None: DEFAULT_PASSES[compiler]
    compiler: str = "inductor"
    chunk_rows: int = 0
    grad_in_forward: bool = True
    inductor: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler={self.compiler!r} is not one of {list(COMPILERS)}")
        if self.passes is None:
            object.__setattr__(self, "passes", DEFAULT_PASSES[self.compiler])
        unknown = [p for p in self.passes if p not in PASSES]
        if unknown:
            raise ValueError(f"unknown fxsparse compile pass(es) {unknown}; known: {list(PASSES)}")
        if len(set(self.passes)) != len(self.passes):
            raise ValueError(f"a pass is listed twice in {list(self.passes)}")
        if not isinstance(self.chunk_rows, int) or self.chunk_rows < 0:
            raise ValueError(f"chunk_rows must be an int >= 0 (0: automatic), got {self.chunk_rows!r}")

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> CompileOptions:
        options = dict(options or {})
        known = {"passes", "compiler", "chunk_rows", "grad_in_forward", "inductor"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown fxsparse backend option(s) {unknown}; known: {sorted(known)}")
        if "passes" in options:
            passes = options["passes"]
            if isinstance(passes, str) and passes != "all":
                passes = [passes]
            if passes == "all":
                passes = PASSES
            # run in the canonical order whatever order they were listed in
            options["passes"] = tuple(p for p in PASSES if p in passes) + tuple(p for p in passes if p not in PASSES)
        if "inductor" in options:
            options["inductor"] = dict(options["inductor"] or {})
        return cls(**options)


@dataclass
class GraphRecord:
    """One graph the backend compiled: what each pass reported, and every candidate it looked at."""

    index: int
    passes: list[tuple[str, str, float]]  # (pass, info, seconds)
    fusions: list  # fxsparse.passes.compile_records.Fusion
    compiler: str
    _params: dict[int, weakref.ref] = field(default_factory=dict, repr=False)  # id -> parameter, weakly

    def add_parameter(self, param: torch.Tensor) -> None:
        self._params[id(param)] = weakref.ref(param)

    def belongs_to(self, model: torch.nn.Module) -> bool:
        for param in model.parameters():
            ref = self._params.get(id(param))
            if ref is not None and ref() is param:
                return True
        return False


@dataclass
class CompileReport:
    """What the backend did to the graphs of one model (or of every model, see :func:`compile_report`)."""

    graphs: list[GraphRecord]

    @property
    def fusions(self) -> list:
        return [f for g in self.graphs for f in g.fusions]

    def counts(self) -> Counter:
        """``{(pass, status): count}`` over all graphs."""
        return Counter((f.pass_name, f.status) for f in self.fusions)

    def summary(self) -> str:
        """One line per pass (layer checks by their fusion name): how many candidates ``fused``, were
        ``found`` already in fused form, or were ``skipped``."""
        per_pass: dict[str, Counter] = {}
        for (name, status), n in self.counts().items():
            per_pass.setdefault(name, Counter())[status] += n
        order = [p for p in PASSES if p in per_pass] + sorted(p for p in per_pass if p not in PASSES)
        return "\n".join(f"{name}: " + ", ".join(f"{n} {s}" for s, n in sorted(per_pass[name].items()))
                         for name in order)

    def __str__(self) -> str:
        out = []
        for g in self.graphs:
            timing = ", ".join(f"{name} {1e3 * sec:.0f} ms" for name, _, sec in g.passes)
            out.append(f"graph {g.index} ({g.compiler}; {timing}):")
            out.extend(f"  {f}" for f in g.fusions)
        return "\n".join(out) if out else "no graph compiled with backend='fxsparse'"


_RECORDS: list[GraphRecord] = []
_COUNTER = itertools.count()


def compile_report(model: torch.nn.Module | None = None) -> CompileReport:
    """Which passes fired where, for the graphs compiled from ``model`` (all graphs when ``None``).

    A graph belongs to ``model`` when one of its parameters was an input of the graph; pass the model or
    the ``torch.compile`` wrapper of it.
    """
    graphs = [g for g in _RECORDS if model is None or g.belongs_to(model)]
    return CompileReport(graphs)


def clear_compile_report() -> None:
    """Forget the records of earlier compilations."""
    _RECORDS.clear()


def fxsparse_backend(graph_module: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                     options: Mapping[str, Any] | None = None):
    """Run the fusion passes on a copy of dynamo's graph, record them, and compile it (inductor by default)."""
    from fxsparse.passes.compile_records import copy_graph_module, fusions
    from fxsparse.passes.fuse_sibling_linears import ConcatInputBuilder, with_concat_inputs

    opts = CompileOptions.parse(options)
    gm = copy_graph_module(graph_module)  # dynamo keeps reading the graph it handed over
    from fxsparse.passes.manager import spec_of

    table = _pass_table()
    ran: list[tuple[str, str, float]] = []
    for name in opts.passes:
        start = time.perf_counter()
        pass_fn = table[name]
        spec = spec_of(pass_fn)
        backup = copy_graph_module(gm)
        try:
            # called as the pass manager would: the graph, plus the options the pass declares
            result = pass_fn(graph=gm, **{option: getattr(opts, option) for option in spec.options})
            gm = result.outputs.get("graph", gm)
            info = result.info
        except Exception as exc:  # noqa: BLE001 - a broken pass must not break the user's compile
            from fxsparse.passes.compile_records import SKIPPED, Fusion, record

            log.warning("fxsparse compile pass %s failed and was undone: %s", name, exc)
            gm = backup
            record(gm, Fusion(name, "", SKIPPED, f"pass failed and was undone: {type(exc).__name__}: {exc}"))
            info = "failed"
        ran.append((name, info, time.perf_counter() - start))
    gm.graph.lint()
    gm.recompile()
    graph_record = GraphRecord(next(_COUNTER), ran, fusions(gm), opts.compiler)
    for value in example_inputs:
        if isinstance(value, torch.nn.Parameter):
            graph_record.add_parameter(value)
    _RECORDS.append(graph_record)
    log.info("fxsparse backend, graph %d: %s", graph_record.index, "; ".join(f"{n}: {i}" for n, i, _ in ran))

    builder = ConcatInputBuilder.for_graph(gm)
    inputs = list(example_inputs) + (builder(example_inputs) if builder is not None else [])
    compiled = _compile(gm, inputs, opts, mode)
    return with_concat_inputs(compiled, gm)


def _compile(gm: fx.GraphModule, inputs: list, opts: CompileOptions, mode: str | None):
    if opts.compiler == "eager":
        return gm.forward
    if opts.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    patches.update(opts.inductor)
    return compile_fx(gm, inputs, config_patches=patches or None)


def compile_module(model: torch.nn.Module, backend: str = "fxsparse", **kwargs: Any) -> torch.nn.Module:
    """Compile ``model``'s forward in place (``nn.Module.compile``) and return it.

    Unlike ``torch.compile(model)``, the module keeps its class, parameter names and ``state_dict`` keys
    (no ``_orig_mod.`` prefix), so checkpoints, adapters and resumption work unchanged. ``kwargs`` go to
    ``torch.compile`` (``options=``, ``fullgraph=``, ``mode=``...). :func:`uncompile_module` undoes it.

    >>> layer = compile_module(torch.nn.Linear(3, 2), options={"compiler": "eager"})
    >>> layer(torch.randn(4, 3)).shape, list(layer.state_dict())
    (torch.Size([4, 2]), ['weight', 'bias'])
    >>> uncompile_module(layer) is layer
    True
    """
    model.compile(backend=backend, **kwargs)
    return model


def uncompile_module(model: torch.nn.Module) -> torch.nn.Module:
    """Run ``model`` eagerly again after :func:`compile_module` (e.g. for ``generate``, whose shapes vary)."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        model._compiled_call_impl = None
    return model


_setup_dynamo()
