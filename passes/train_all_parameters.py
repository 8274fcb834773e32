"""Pass: make every parameter of the model trainable (pre-training trains embeddings, norms and head)."""

from __future__ import annotations

from torch import nn

from fxsparse.passes.manager import PassResult, fxpass

__all__ = ["train_all_parameters"]


@fxpass(reads=("model",), writes=("model",))
def train_all_parameters(model: nn.Module) -> PassResult:
    """Set ``requires_grad`` on every parameter; ``modified`` says whether any flag changed.

    >>> from torch import nn
    >>> model = nn.Linear(2, 2).requires_grad_(False)
    >>> train_all_parameters(model=model).modified, model.weight.requires_grad
    (True, True)
    """
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for param in frozen:
        param.requires_grad_(True)
    return PassResult(bool(frozen), f"{len(frozen)} parameters unfrozen", outputs={"model": model})
