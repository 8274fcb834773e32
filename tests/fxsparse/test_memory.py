"""The saved-activation counter used by tests and benchmarks."""

import torch

from fxsparse.memory import SavedActivations, saved_activation_bytes


def test_counts_unique_storages_once():
    x = torch.randn(64, 32, requires_grad=True)
    # x * x saves x twice (one storage), exp saves its output (a new storage)
    assert saved_activation_bytes(lambda: (x * x).exp().sum()) == 2 * 64 * 32 * 4


def test_excluded_tensors_do_not_count():
    weight = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    everything = saved_activation_bytes(lambda: (x @ weight.t()).sum())
    activations = saved_activation_bytes(lambda: (x @ weight.t()).sum(), exclude=[weight])
    assert everything == (16 * 8 + 4 * 8) * 4 and activations == 4 * 8 * 4


def test_nothing_saved_without_grad():
    x = torch.randn(10)
    with SavedActivations() as saved:
        (x * x).sum()
    assert saved.bytes == 0 and saved.storages == {}
