"""The saved-activation counter used by tests and benchmarks."""

import pytest
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


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensors_saved_for_backward_count_by_their_parts(layout):
    """A sparse operand saved for backward (PEFT's SHiRA saves its delta weight as COO) counts its index and value
    storages; before, the counter stopped on it (a sparse tensor has no storage of its own)."""
    dense = torch.randn(3, 3, requires_grad=True)
    values = torch.ones(3, requires_grad=True)
    indices = torch.tensor([[0, 1, 2], [2, 0, 1]])
    with SavedActivations(exclude=[dense, values]) as saved:
        sparse = torch.sparse_coo_tensor(indices, values, (3, 3))
        if layout == "csr":
            sparse = sparse.to_sparse_csr()
        torch.sparse.mm(sparse, dense * 2)
    index_bytes = 48 if layout == "coo" else 4 * 8 + 3 * 8  # COO: 2 x 3 int64; CSR: crow (4) + col (3) int64
    assert saved.bytes >= index_bytes + 36  # + dense * 2 (36 bytes)
    assert all(size > 0 for size in saved.storages.values())
