"""The ``torch.compile`` backend ``"fxsparse"`` (registered through the ``torch_dynamo_backends`` entry point).

Dynamo hands the backend an FX graph of ATen-level calls with parameters lifted to inputs. Weight
rewrites (permutations, replacements) already happened on the module tree in ``fxsparse.transform``;
what is left for the backend is to hand the graph to inductor. Inductor's ``compile_fx`` does its own
``aot_autograd``, so it is called directly and never wrapped again.

>>> import torch, fxsparse
>>> from fxsparse.models import tiny_model
>>> model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5})
>>> compiled = torch.compile(model, backend="fxsparse")   # compiles on first call
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["fxsparse_backend"]


def fxsparse_backend(graph_module: fx.GraphModule, example_inputs: list[torch.Tensor]):
    """Compile ``graph_module`` with inductor (S²FT and fused-FFN autograd functions trace through)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph_module, example_inputs)
