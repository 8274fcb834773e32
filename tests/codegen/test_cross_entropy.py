"""fxsparse::linear_cross_entropy against a float64 reference: loss, gradients, modes, chunking, Triton rows."""

import pytest
import torch
from torch.nn import functional as F

from fxsparse.codegen import cross_entropy as ce
from fxsparse.memory import SavedActivations

# dtype -> (rtol, atol) for loss and gradients against the float64 reference
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 2e-3),
}
# (tokens, width, vocab): powers of two and awkward sizes
SHAPES = [(6, 42, 123), (16, 32, 64), (42, 16, 431)]


def _inputs(tokens, width, vocab, dtype, *, bias=False, head_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, width, generator=g) / width**0.5).to(dtype).requires_grad_(head_grad)
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).requires_grad_(head_grad) if bias else None
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::4] = -100  # ignored positions, as transformers' shifted labels end with one
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, reduction, upstream):
    """Loss and gradients of the unfused computation in float64."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(weight.requires_grad)
    b = bias.detach().double().requires_grad_(bias.requires_grad) if bias is not None else None
    loss = F.cross_entropy(F.linear(h, w, b), labels, reduction=reduction)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_grad", [False, True], ids=["frozen-head", "trained-head"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_float64_reference(shape, dtype, head_grad, reduction):
    hidden, weight, bias, labels = _inputs(*shape, dtype, bias=True, head_grad=head_grad)
    loss = ce.linear_cross_entropy(hidden, weight, bias, labels, reduction=reduction, chunk_rows=5)
    (loss * 0.75).backward()
    ref_loss, ref_h, ref_w, ref_b = _reference(hidden, weight, bias, labels, reduction, 0.75)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(hidden.grad.double(), ref_h, rtol=rtol, atol=atol)
    if head_grad:
        torch.testing.assert_close(weight.grad.double(), ref_w, rtol=rtol, atol=atol)
        torch.testing.assert_close(bias.grad.double(), ref_b, rtol=rtol, atol=atol)
    else:
        assert weight.grad is None


@pytest.mark.parametrize("grad_mode", [ce.GRAD_IN_FORWARD, ce.GRAD_RECOMPUTE])
@pytest.mark.parametrize("chunk_rows", [0, 1, 7, 100])
def test_modes_and_chunk_sizes_agree(grad_mode, chunk_rows):
    hidden, weight, _, labels = _inputs(23, 12, 37, torch.float64)
    loss = ce.linear_cross_entropy(hidden, weight, None, labels, grad_mode=grad_mode, chunk_rows=chunk_rows)
    loss.backward()
    ref_loss, ref_h, _, _ = _reference(hidden, weight, None, labels, "mean", 1.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-12, atol=1e-12)


def test_kept_logits_are_returned_and_their_gradient_counts():
    hidden, weight, _, labels = _inputs(10, 8, 19, torch.float64)
    loss, logits, _, _ = torch.ops.fxsparse.linear_cross_entropy(hidden, weight, None, labels, -100, False,
                                                                   ce.GRAD_IN_FORWARD, True, 3)
    torch.testing.assert_close(logits, F.linear(hidden, weight))
    coef = torch.randn(10, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (loss + (logits * coef).sum()).backward()
    h = hidden.detach().requires_grad_(True)
    ref_logits = F.linear(h, weight)
    (F.cross_entropy(ref_logits, labels) + (ref_logits * coef).sum()).backward()
    torch.testing.assert_close(hidden.grad, h.grad, rtol=1e-12, atol=1e-12)


def test_nothing_of_vocabulary_size_is_saved():
    tokens, width, vocab = 32, 16, 4096
    for head_grad in (False, True):
        hidden, weight, _, labels = _inputs(tokens, width, vocab, torch.float32, head_grad=head_grad)
        with SavedActivations(exclude=[weight]) as saved:
            loss = ce.linear_cross_entropy(hidden, weight, None, labels)
        loss.backward()
        # frozen head: dhidden (tokens x width); trained head: hidden + log-sum-exp; plus the labels
        assert saved.bytes <= tokens * width * 4 + tokens * 4 + tokens * 8 + 64, saved.bytes
        assert saved.bytes < tokens * vocab * 4 // 8


def test_all_ignored_gives_nan_loss_and_zero_gradient_like_eager():
    hidden, weight, _, labels = _inputs(5, 4, 7, torch.float64)
    labels[:] = -100
    loss = ce.linear_cross_entropy(hidden, weight, None, labels)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_bad_inputs_raise_value_errors():
    hidden, weight, _, labels = _inputs(5, 4, 7, torch.float32)
    bad = labels.clone()
    bad[1] = 7
    with pytest.raises(ValueError, match="outside"):
        ce.linear_cross_entropy(hidden, weight, None, bad)
    with pytest.raises(ValueError, match="labels"):
        ce.linear_cross_entropy(hidden, weight, None, labels[:3])
    with pytest.raises(ValueError, match="reduction"):
        ce.linear_cross_entropy(hidden, weight, None, labels, reduction="none")
    weight.requires_grad_(True)
    loss = ce.linear_cross_entropy(hidden, weight, None, labels, grad_mode=ce.GRAD_IN_FORWARD)
    with pytest.raises(ValueError, match="frozen weight"):
        loss.backward()


def test_auto_chunk_rows():
    assert ce.auto_chunk_rows(256, 49152) == 128
    assert ce.auto_chunk_rows(5, 10) == 5
    assert ce.auto_chunk_rows(1000, 10**7) == 16


def test_opcheck():
    hidden, weight, _, labels = _inputs(6, 8, 11, torch.float32)
    for mode, keep in ((ce.GRAD_NONE, True), (ce.GRAD_IN_FORWARD, False), (ce.GRAD_RECOMPUTE, True)):
        w = weight.detach().requires_grad_(mode == ce.GRAD_RECOMPUTE)
        h = hidden.detach().requires_grad_(mode != ce.GRAD_NONE)
        torch.library.opcheck(torch.ops.fxsparse.linear_cross_entropy.default,
                              (h, w, None, labels, -100, False, mode, keep, 4))


@pytest.mark.parametrize("head_grad", [False, True], ids=["frozen-head", "trained-head"])
def test_triton_rows_kernel_in_interpreter(monkeypatch, head_grad):
    pytest.importorskip("triton")
    from fxsparse.codegen.autotune import interpreting

    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("FXSPARSE_KERNELS", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, _, labels = _inputs(6, 42, 123, torch.float32, head_grad=head_grad)
    hidden = hidden.detach().to(device).requires_grad_(True)
    weight = weight.detach().to(device).requires_grad_(head_grad)
    labels = labels.to(device)
    loss = ce.linear_cross_entropy(hidden, weight, None, labels, chunk_rows=4)
    loss.backward()
    ref_loss, ref_h, ref_w, _ = _reference(hidden.cpu(), weight.cpu(), None, labels.cpu(), "mean", 1.0)
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(hidden.grad.cpu().double(), ref_h, rtol=rtol, atol=atol)
    if head_grad:
        torch.testing.assert_close(weight.grad.cpu().double(), ref_w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("head_grad", [False, True], ids=["frozen-head", "trained-head"])
def test_confident_wrong_predictions_keep_an_exact_loss(head_grad):
    # logits 100s apart: the target's softmax probability underflows float32, the loss must not be inf
    hidden, weight, _, labels = _inputs(12, 8, 37, torch.float32, head_grad=head_grad)
    with torch.no_grad():
        hidden.mul_(60.0)
    loss = ce.linear_cross_entropy(hidden, weight, None, labels, chunk_rows=5)
    loss.backward()
    ref_loss, ref_h, ref_w, _ = _reference(hidden, weight, None, labels, "mean", 1.0)
    assert ref_loss > 50
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad.double(), ref_h, rtol=1e-5, atol=1e-5)
    if head_grad:
        torch.testing.assert_close(weight.grad.double(), ref_w, rtol=1e-5, atol=1e-4)
