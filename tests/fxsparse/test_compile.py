"""A transformed model under torch.compile(fullgraph=True), with the "fxsparse" backend and inductor."""

import pytest
import torch

import fxsparse
from fxsparse.models import tiny_model


@pytest.mark.parametrize("backend", ["fxsparse"])
def test_compiled_s2ft_model_matches_eager(backend):
    model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5, "down": 0.2})
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    eager_loss = model(x, labels=x).loss
    eager_loss.backward()
    params = fxsparse.trainable_parameters(model)
    eager_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # no graph break allowed
    loss = compiled(x, labels=x).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), eager_loss.detach(), rtol=1e-5, atol=1e-6)
    for p, g in zip(params, eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
