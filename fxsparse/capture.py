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


@contextlib.contextmanager
def _sdpa_attention(model: nn.Module):
    """Temporarily route a transformers model's attention through scaled_dot_product_attention.

    The weights and the function do not change; only which attention kernel the graph shows does, and
    discovery reads Q/K/V off the SDPA node.
    """
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) not in (None, "sdpa"):
            configs.append((config, config._attn_implementation))
    try:
        for config, _ in configs:
            config._attn_implementation = "sdpa"
        yield
    finally:
        for config, previous in configs:
            config._attn_implementation = previous


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


def _export(model: nn.Module, args: tuple, kwargs: dict):
    with _sdpa_attention(model), torch.no_grad():
        return torch.export.export(model, args, kwargs=kwargs, strict=False)


def capture(model: nn.Module, example_inputs: Any = None) -> Captured:
    """Export ``model`` (non-strict, on fake tensors) and return the graph with parameter names.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs; made up
    from the model when omitted, cut down by :func:`small_example` when given.
    """
    full_args, full_kwargs = model_inputs(model, example_inputs)
    args, kwargs = small_example(full_args, full_kwargs)
    was_training = model.training
    model.eval()  # dropout off: it would put random masks between a projection and its consumer
    try:
        try:
            exported = _export(model, args, kwargs)
        except Exception:
            if all(a is b for a, b in zip(args, full_args)) and all(
                    kwargs[k] is full_kwargs[k] for k in kwargs):
                raise
            args, kwargs = full_args, full_kwargs  # an input the cut did not fit: the example as given
            exported = _export(model, args, kwargs)
    except Exception as exc:
        raise ValueError(
            f"could not capture {type(model).__name__} with torch.export ({type(exc).__name__}: {exc}); "
            "pass example_inputs that the model's forward accepts"
        ) from exc
    finally:
        model.train(was_training)
    signature = exported.graph_signature
    return Captured(model=model, graph_module=exported.graph_module,
                    param_names=dict(signature.inputs_to_parameters),
                    buffer_names=dict(signature.inputs_to_buffers), args=args, kwargs=kwargs)


def module_path(node: fx.Node) -> str | None:
    """The path of the innermost module ``node`` ran in (``model.layers.0.mlp.up_proj``), if known."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]
