"""Graph capture: a model and example inputs to an FX graph whose nodes keep module paths and shapes.

Decoder models (anything with a transformers ``config``) are captured with
``torch.export.export(model, args, kwargs={"use_cache": False}, strict=False)``; export runs on fake
tensors, so no real forward is computed and a model built on the ``meta`` device (a 7B configuration,
say) is analysed without its memory. Every call_function node keeps ``nn_module_stack`` (the module
path it ran in) and ``meta["val"]`` (its output's shape and dtype).

>>> from fxsparse.models import tiny_model
>>> captured = capture(tiny_model("llama"))
>>> any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in captured.graph.nodes)
True
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["Captured", "capture", "example_inputs_for", "module_path"]

# A prime sequence length: no head count or head size is likely to equal it, which keeps shapes in
# the captured graph unambiguous for a reader; discovery itself does not rely on it.
EXAMPLE_SEQ_LEN = 7


@dataclass
class Captured:
    """An exported graph plus what discovery needs to map nodes back to the model's modules."""

    model: nn.Module
    graph_module: fx.GraphModule
    param_names: dict[str, str]  # placeholder name -> parameter FQN ("model.layers.0.mlp.up_proj.weight")

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


def _normalise_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
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


def capture(model: nn.Module, example_inputs: Any = None) -> Captured:
    """Export ``model`` (non-strict, on fake tensors) and return the graph with parameter names.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs; made up
    from the model when omitted.
    """
    args, kwargs = _normalise_inputs(model, example_inputs)
    was_training = model.training
    model.eval()  # dropout off: it would put random masks between a projection and its consumer
    try:
        with _sdpa_attention(model), torch.no_grad():
            exported = torch.export.export(model, args, kwargs=kwargs, strict=False)
    except Exception as exc:
        raise ValueError(
            f"could not capture {type(model).__name__} with torch.export ({type(exc).__name__}: {exc}); "
            "pass example_inputs that the model's forward accepts"
        ) from exc
    finally:
        model.train(was_training)
    signature = exported.graph_signature
    return Captured(model=model, graph_module=exported.graph_module,
                    param_names=dict(signature.inputs_to_parameters))


def module_path(node: fx.Node) -> str | None:
    """The path of the innermost module ``node`` ran in (``model.layers.0.mlp.up_proj``), if known."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]
