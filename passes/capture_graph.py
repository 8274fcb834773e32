"""Pass: capture the model as an exported FX graph on a small example (see :mod:`fxsparse.capture`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fxsparse.capture import capture
from fxsparse.passes.manager import PassResult, fxpass

__all__ = ["capture_graph"]


@fxpass(reads=("model", "example_inputs"), writes=("captured",))
def capture_graph(model: nn.Module, example_inputs: Any) -> PassResult:
    """Export ``model`` on fake tensors; ``captured`` holds the graph, parameter names and the example.

    ``example_inputs`` (a tensor, tuple or dict; None: made up) is cut to batch 1 and a few tokens first.
    When the usual export fails and a fallback works (``fxsparse.capture.ATTEMPTS``), the info says which.

    >>> import torch
    >>> from fxsparse.models import tiny_model
    >>> result = capture_graph(model=tiny_model("llama"), example_inputs=torch.zeros(8, 100, dtype=torch.long))
    >>> tuple(result.outputs["captured"].args[0].shape), result.modified
    ((1, 32), False)
    """
    captured = capture(model, example_inputs)
    nodes = len(captured.graph.nodes)
    fallback = f" (capture fallback: {captured.fallback})" if captured.fallback else ""
    return PassResult(False, f"{nodes} nodes{fallback}", outputs={"captured": captured})
