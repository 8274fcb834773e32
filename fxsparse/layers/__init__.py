"""The modules that replace ``nn.Linear`` (S²FT, SLTrain, the fused gated FFN) and what they share."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["dense_module"]


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
