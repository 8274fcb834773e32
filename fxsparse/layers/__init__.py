"""The modules that replace ``nn.Linear`` (S²FT, SLTrain, the fused gated FFN) and what they share."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["check_layer_states", "dense_module", "is_conv1d", "materialize"]


def materialize(model: nn.Module) -> nn.Module:
    """Rebuild what fxsparse layers derive from their plan or seed after ``to_empty()``: S²FT index buffers
    (from the layer's host copy) and SLTrain supports (drawn again from the layer's seed), then check them.

    ``model.to_empty(device=...)`` already calls this per layer when it leaves the meta device; calling it
    again is harmless. Parameters are not touched: load a state dict (or the base weights) for their values.

    >>> import torch, fxsparse
    >>> from fxsparse.models import tiny_model
    >>> with torch.device("meta"):
    ...     model = tiny_model("llama")
    >>> model = fxsparse.transform(model, "sltrain", rank=4, block_size=8)
    >>> model = materialize(model.to_empty(device="cpu"))
    >>> layer = model.model.layers[0].mlp.up_proj
    >>> layer.check_support() is None and layer.support_crow.device.type
    'cpu'
    """
    for module in model.modules():
        rebuild = getattr(module, "materialize", None)
        if module is not model and callable(rebuild) and type(module).__module__.startswith("fxsparse.layers."):
            rebuild()
    return model


def check_layer_states(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of a transformed model: every fxsparse layer checks its part of ``state_dict``
    (plan, rank, alpha, support, indices) before any tensor is copied, so a mismatch in a late layer leaves the
    early ones untouched (torch runs each layer's own check only when it reaches that layer)."""
    for name, layer in module.named_modules():
        check = getattr(layer, "check_state", None)
        if layer is not module and callable(check) and type(layer).__module__.startswith("fxsparse.layers."):
            check(state_dict, f"{prefix}{name}.")


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers GPT-2 ``Conv1D`` (weight stored (in, out)).

    Matched by name and attributes so that transformers is not imported just to check a type.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


@torch.no_grad()
def dense_module(weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool) -> nn.Module:
    """A fresh ``nn.Linear`` (or transformers ``Conv1D``, whose weight is stored (in, out)) holding the
    (out, in) ``weight`` and ``bias``: what a merge puts back in place of an fxsparse layer."""
    out_features, in_features = weight.shape
    factory = {"device": weight.device, "dtype": weight.dtype}
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(out_features, in_features).to(**factory)
        module.weight.copy_(weight.t())
        if bias is None:
            module.bias = None
    else:
        module = nn.Linear(in_features, out_features, bias=bias is not None, **factory)
        module.weight.copy_(weight)
    if bias is not None:
        module.bias.copy_(bias.detach())
    return module
