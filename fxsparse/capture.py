"""Graph capture: a model and example inputs to an FX graph whose nodes keep module paths and shapes.

Decoder models (anything with a transformers ``config``) are captured with
``torch.export.export(model, args, kwargs={"use_cache": False}, strict=False)``; export runs on fake
tensors, so no real forward is computed and a model built on the ``meta`` device (a 7B configuration,
say) is analysed without its memory. Every call_function node keeps ``nn_module_stack`` (the module
path it ran in) and ``meta["val"]`` (its output's shape and dtype).

A user's example input is cut down before the capture (:func:`small_example`): batch 1, and at most
``MAX_EXAMPLE_TOKENS`` tokens when the input holds token ids. Discovery follows integer tensors the
size of a projection's output through the graph, and the function check runs the example forward: both
must cost the same for an 8 x 2048 example as for the 1 x 7 one made up here.

>>> from fxsparse.models import tiny_model
>>> captured = capture(tiny_model("llama"))
>>> any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in captured.graph.nodes)
True
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

__all__ = ["Captured", "capture", "example_inputs_for", "model_inputs", "small_example", "module_path"]

# A prime sequence length: no head count or head size is likely to equal it, which keeps shapes in
# the captured graph unambiguous for a reader; discovery itself does not rely on it.
EXAMPLE_SEQ_LEN = 7
# Longest token sequence of a user's example that capture and the function check keep.
MAX_EXAMPLE_TOKENS = 32


@dataclass
class Captured:
    """An exported graph plus what discovery needs to map nodes back to the model's modules."""

    model: nn.Module
    graph_module: fx.GraphModule
    param_names: dict[str, str]  # placeholder name -> parameter FQN ("model.layers.0.mlp.up_proj.weight")
    buffer_names: dict[str, str] = field(default_factory=dict)  # placeholder name -> buffer FQN
    args: tuple = ()  # the (small) example the graph was exported with: model(*args, **kwargs)
    kwargs: dict = field(default_factory=dict)
    fallback: str = ""  # the capture fallback that worked ("": the usual export; see capture.ATTEMPTS)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def example_inputs_for(model: nn.Module) -> tuple[tuple, dict]:
    """(args, kwargs) for one forward: token ids for models with a config, else a (1, 7, in) float input."""
    device = _model_device(model)
    config = getattr(model, "config", None)
    if config is not None and not hasattr(config, "vocab_size") and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()  # a multimodal wrapper: its text model's vocabulary
    if config is not None and hasattr(config, "vocab_size"):
        vocab = int(getattr(config, "vocab_size", 2) or 2)
        input_ids = torch.arange(EXAMPLE_SEQ_LEN, device="cpu").remainder(vocab).unsqueeze(0).to(device)
        return (input_ids,), {"use_cache": False}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return (torch.zeros(1, EXAMPLE_SEQ_LEN, dtype=torch.long, device=device),), {}
        if isinstance(module, nn.Linear):
            dtype = module.weight.dtype
            return (torch.zeros(1, EXAMPLE_SEQ_LEN, module.in_features, dtype=dtype, device=device),), {}
    raise ValueError(
        f"cannot guess example inputs for {type(model).__name__}: it has no config, embedding or linear; "
        "pass example_inputs"
    )


def _attention_configs(model: nn.Module) -> list:
    """The transformers configs of ``model`` and its submodules that pick an attention implementation."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    return list(configs.values())


@contextlib.contextmanager
def _attention_implementation(model: nn.Module, implementation: str | None = "sdpa"):
    """Temporarily route a transformers model's attention through ``implementation`` (None: as it is).

    With ``"sdpa"``: through scaled_dot_product_attention, which discovery reads Q/K/V off. The weights
    and the function do not change; only which attention kernel the graph shows does.
    """
    if implementation == "sdpa" and any(getattr(type(m), "_supports_sdpa", True) is False for m in model.modules()):
        # no SDPA path: switching would drop what its eager attention does (sinks, soft-caps), a changed function
        raise ValueError(f"{type(model).__name__} has no SDPA attention (_supports_sdpa = False)")
    configs = [] if implementation is None else [
        (c, c._attn_implementation) for c in _attention_configs(model)
        if c._attn_implementation not in (None, implementation)]
    try:
        for config, _ in configs:
            config._attn_implementation = implementation
        yield
    finally:
        for config, previous in configs:
            config._attn_implementation = previous


def _sdpa_attention(model: nn.Module):
    return _attention_implementation(model, "sdpa")


def model_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)`` from a tensor, a tuple or a dict of inputs
    (made up by :func:`example_inputs_for` when None); transformers models get ``use_cache=False``."""
    if example_inputs is None:
        return example_inputs_for(model)
    if isinstance(example_inputs, dict):
        kwargs = dict(example_inputs)
        if getattr(model, "config", None) is not None:
            kwargs.setdefault("use_cache", False)
        return (), kwargs
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = {"use_cache": False} if getattr(model, "config", None) is not None else {}
    return tuple(example_inputs), kwargs


def small_example(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example cut to batch 1 and, when it holds token ids, to ``MAX_EXAMPLE_TOKENS`` tokens.

    The batch size is dim 0 of the first input of two or more dims; every such input with that dim 0
    keeps its first row. The sequence length is dim 1 of the first 2-D integer input (the token ids);
    every input of two or more dims with that dim 1 keeps its first tokens. Inputs of other shapes are
    left alone (a capture that then fails falls back to the full example).

    >>> ids = torch.zeros(8, 2048, dtype=torch.long)
    >>> args, kwargs = small_example((ids,), {"attention_mask": torch.ones(8, 2048), "use_cache": False})
    >>> tuple(args[0].shape), tuple(kwargs["attention_mask"].shape), kwargs["use_cache"]
    ((1, 32), (1, 32), False)
    """
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() >= 2]
    if not tensors:
        return args, kwargs
    batch = tensors[0].shape[0]
    seq = next((t.shape[1] for t in tensors if t.dim() == 2 and not t.is_floating_point()), None)

    def cut(value):
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            return value
        if value.shape[0] == batch:
            value = value[:1]
        if seq is not None and seq > MAX_EXAMPLE_TOKENS and value.shape[1] == seq:
            value = value[:, :MAX_EXAMPLE_TOKENS]
        return value

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


@contextlib.contextmanager
def _experts_implementation(model: nn.Module, implementation: str | None):
    """Temporarily run a transformers model's mixture-of-experts layers with ``implementation`` (None: as is).

    ``batched_mm`` computes every expert on every token and weights the results by the router: no
    data-dependent loop over the experts that were hit, so export does not stop at a guard on a router output.
    """
    setter = getattr(model, "set_experts_implementation", None)
    getter = getattr(model, "get_experts_implementation", None)
    if implementation is None or setter is None or getter is None:
        yield
        return
    previous = getter()
    setter(implementation)
    try:
        yield
    finally:
        setter(previous)


class _FirstOutput(nn.Module):
    """Runs the model and returns only its logits (or first tensor): for models whose output holds objects
    export cannot flatten (a cache). Parameter and module paths get a ``model.`` prefix, removed after export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        output = self.model(*args, **kwargs)
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        if isinstance(output, (tuple, list)):
            return next(t for t in output if isinstance(t, torch.Tensor))
        return output


def _unprefix(exported, prefix: str = "model") -> None:
    """Make the module paths of an export of :class:`_FirstOutput` those of the model it wraps."""
    for node in exported.graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        paths = {}
        for key, (path, kind) in stack.items():
            if path == prefix:
                paths[key] = ("", kind)  # the wrapped model is the root
            elif path.startswith(prefix + "."):
                paths[key] = (path[len(prefix) + 1:], kind)
        node.meta["nn_module_stack"] = paths


@dataclass(frozen=True)
class _Attempt:
    """One way to export: which attention kernel, example, keyword arguments and export mode."""

    name: str  # what :attr:`Captured.fallback` says ("" for the first, usual way)
    attention: str | None = "sdpa"  # transformers attention implementation during export (None: the model's)
    example: str = "small"  # small | full (the example as given) | other (another sequence length)
    use_cache: bool = True  # keep use_cache=False in the kwargs (False: drop the keyword)
    experts: str | None = None  # transformers experts implementation during export
    strict: bool = False
    logits_only: bool = False  # export a wrapper that returns only the logits (outputs export cannot flatten)


# Tried in order until one exports; the first is the usual way (module docstring).
ATTEMPTS = (
    _Attempt(""),
    _Attempt("the example as given", example="full"),
    _Attempt("the model's own attention implementation", attention=None),
    _Attempt("eager attention", attention="eager"),
    _Attempt("without use_cache", use_cache=False),
    _Attempt("without use_cache, own attention implementation", attention=None, use_cache=False),
    _Attempt("only the logits as output", logits_only=True),
    _Attempt("only the logits as output, own attention implementation", attention=None, logits_only=True),
    _Attempt("experts as batched_mm", experts="batched_mm"),
    _Attempt("experts as batched_mm, own attention implementation", attention=None, experts="batched_mm"),
    _Attempt(f"example of {2 * EXAMPLE_SEQ_LEN + 2} tokens", example="other"),
    _Attempt(f"example of {2 * EXAMPLE_SEQ_LEN + 2} tokens, own attention implementation", attention=None,
             example="other"),
    _Attempt("strict export", strict=True),
    _Attempt("strict export, own attention implementation", attention=None, strict=True),
)


def _other_length(args: tuple, kwargs: dict, length: int) -> tuple[tuple, dict] | None:
    """The example with its token axis (dim 1 of the first 2-D integer input) cut or tiled to ``length``."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    seq = next((t.shape[1] for t in tensors if t.dim() == 2 and not t.is_floating_point()), None)
    if seq is None or seq == length:
        return None

    def resize(value):
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] != seq:
            return value
        reps = [1] * value.dim()
        reps[1] = -(-length // seq)
        return value.repeat(*reps)[:, :length]

    return tuple(resize(a) for a in args), {k: resize(v) for k, v in kwargs.items()}


def _attempt_inputs(attempt: _Attempt, small: tuple[tuple, dict], full: tuple[tuple, dict]):
    """``(args, kwargs)`` for ``attempt``, or None where it would repeat an earlier attempt."""
    if attempt.example == "full":
        same = all(a is b for a, b in zip(small[0], full[0])) and all(
            small[1][k] is full[1][k] for k in small[1])
        args, kwargs = (None, None) if same else full
    elif attempt.example == "other":
        args, kwargs = _other_length(*small, 2 * EXAMPLE_SEQ_LEN + 2) or (None, None)
    else:
        args, kwargs = small
    if args is None:
        return None
    if not attempt.use_cache:
        if "use_cache" not in kwargs:
            return None
        kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
    return args, kwargs


def _effect(attempt: _Attempt, model: nn.Module, inputs: tuple[tuple, dict]) -> tuple:
    """What ``attempt`` changes for this model: two attempts with the same effect export the same graph."""
    attention = frozenset(attempt.attention or c._attn_implementation for c in _attention_configs(model))
    experts = attempt.experts
    if experts is not None:
        try:
            settable = bool(model._can_set_experts_implementation())  # transformers: MoE layers it can switch
            experts = experts if settable and model.get_experts_implementation().get("") != experts else None
        except Exception:  # noqa: BLE001 - a model without settable experts: the attempt changes nothing
            experts = None
    example = (attempt.example, "use_cache" in inputs[1])  # "full" is None where it equals "small"
    return attention, experts, example, attempt.strict, attempt.logits_only


def _export(model: nn.Module, args: tuple, kwargs: dict, attempt: _Attempt = ATTEMPTS[0]):
    target = _FirstOutput(model) if attempt.logits_only else model
    with _attention_implementation(model, attempt.attention), _experts_implementation(model, attempt.experts), \
            torch.no_grad():
        exported = torch.export.export(target, args, kwargs=kwargs, strict=attempt.strict)
    if attempt.logits_only:
        _unprefix(exported)
    return exported


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def capture(model: nn.Module, example_inputs: Any = None) -> Captured:
    """Export ``model`` (non-strict, on fake tensors) and return the graph with parameter names.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs; made up
    from the model when omitted, cut down by :func:`small_example` when given.

    When the usual export fails, the other ways in :data:`ATTEMPTS` are tried in order — the example as
    given, the model's own attention implementation instead of SDPA, without ``use_cache``, experts as
    ``batched_mm``, another sequence length, strict export — and :attr:`Captured.fallback` names the one
    that worked ("" when none was needed). The weights and the function never change; only the graph does.
    When none works, the ``ValueError`` gives the usual way's error and what else was tried.
    """
    full = model_inputs(model, example_inputs)
    small = small_example(*full)
    was_training = model.training
    model.eval()  # dropout off: it would put random masks between a projection and its consumer
    errors: list[tuple[str, BaseException]] = []
    exported, tried = None, set()
    try:
        for attempt in ATTEMPTS:
            inputs = _attempt_inputs(attempt, small, full)
            effect = None if inputs is None else _effect(attempt, model, inputs)
            if effect is None or effect in tried:
                continue
            tried.add(effect)
            try:
                exported = _export(model, *inputs, attempt)
            except Exception as exc:  # noqa: BLE001 - every failure moves on to the next way
                errors.append((attempt.name or "usual export", exc))
                continue
            args, kwargs, fallback = *inputs, attempt.name
            break
    finally:
        model.train(was_training)
    if exported is None:
        first = errors[0][1]
        tried = ", ".join(name for name, _ in errors[1:])
        raise ValueError(
            f"could not capture {type(model).__name__} with torch.export ({_first_line(first)})"
            + (f"; also tried: {tried}" if tried else "")
            + "; pass example_inputs that the model's forward accepts"
        ) from first
    signature = exported.graph_signature
    names = (lambda fqn: fqn[len("model."):]) if fallback and attempt.logits_only else (lambda fqn: fqn)
    return Captured(model=model, graph_module=exported.graph_module,
                    param_names={k: names(v) for k, v in signature.inputs_to_parameters.items()},
                    buffer_names={k: names(v) for k, v in signature.inputs_to_buffers.items()},
                    args=args, kwargs=kwargs, fallback=fallback)


def module_path(node: fx.Node) -> str | None:
    """The path of the innermost module ``node`` ran in (``model.layers.0.mlp.up_proj``), if known."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]
