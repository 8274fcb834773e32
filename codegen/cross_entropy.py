"""Chunked LM head + cross-entropy: ``fxsparse::linear_cross_entropy`` never holds the full logits in float32.

``loss = cross_entropy(hidden @ weight.T + bias, labels)`` is computed ``chunk_rows`` tokens at a time: one
chunk's logits, its log-sum-exp and its loss rows, then the next. The ``tokens x vocab`` float32 logits
(for SmolLM2, 256 tokens x 49,152 = 48 MiB, the largest tensor autograd keeps in a training step) are
never materialised whole and never saved for backward. Three gradient modes (``grad_mode``):

- ``0`` (``GRAD_NONE``): loss only (inference, or nothing upstream needs a gradient);
- ``1`` (``GRAD_IN_FORWARD``): frozen ``weight``/``bias``. Each chunk's ``dlogits = softmax - onehot`` is
  formed while its logits are at hand and ``dhidden = dlogits @ weight`` is computed in forward; backward
  only scales that saved ``tokens x hidden`` tensor by the incoming gradient. Same GEMM count as eager
  (one forward, one ``dhidden``), nothing of vocabulary size saved;
- ``2`` (``GRAD_RECOMPUTE``): trainable ``weight`` (full fine-tuning, tied embeddings). Forward saves
  ``hidden`` and the per-token log-sum-exp; backward recomputes each chunk's logits and accumulates
  ``dhidden``, ``dweight`` and ``dbias`` chunk by chunk (one GEMM more than eager; precomputing ``dweight``
  in forward would instead keep a ``vocab x hidden`` tensor alive, larger than the logits when
  ``hidden > tokens``).

``reduction`` follows ``torch.nn.functional.cross_entropy``: ``mean`` over the tokens whose label is not
``ignore_index`` (``sum_reduction=False``) or their ``sum`` (``sum_reduction=True``, what transformers uses
with ``num_items_in_batch``; the division stays outside the op). ``keep_logits=True`` also returns the
full logits (in ``weight``'s dtype, as ``F.linear`` would) for callers that return them; they are an output,
not a saved tensor, and a gradient flowing into them is honoured.

On CUDA (``FXSPARSE_KERNELS=auto``/``triton``) each chunk's GEMMs stay with cuBLAS and one Triton kernel
per chunk does the row-wise work (online log-sum-exp, loss, ``dlogits`` written in place); on CPU the
same loop runs as plain torch.

>>> import torch
>>> h, w = torch.randn(6, 8), torch.randn(11, 8)
>>> y = torch.tensor([1, 4, -100, 10, 0, 3])
>>> loss = linear_cross_entropy(h, w, None, y)
>>> torch.allclose(loss, torch.nn.functional.cross_entropy(h @ w.T, y))
True
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fxsparse.codegen.autotune import Config, pick_config, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the library runs on CPU without triton
    triton = None
    tl = None

__all__ = [
    "GRAD_NONE",
    "GRAD_IN_FORWARD",
    "GRAD_RECOMPUTE",
    "auto_chunk_rows",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
]

GRAD_NONE, GRAD_IN_FORWARD, GRAD_RECOMPUTE = 0, 1, 2

# ---------------------------------------------------------------- tuning constants

# Logits elements per chunk. Measured on the 2-core development CPU (AMD EPYC, fp32, one thread, process
# CPU time, forward + backward of SmolLM2's head and loss: 256 tokens x 576 -> 49,152; eager 435 ms):
# chunks of 32 / 64 / 128 / 256 rows took 532 / 476 / 417 / 387 ms with the logits dropped, 468 / 441 /
# 410 / 429 ms with them returned (the GEMMs lose 15-20% at 64 rows; the softmax passes gain from a chunk
# that stays in cache). 128 rows (6.3M elements, 24 MiB of float32) keeps most of the GEMM speed at half
# the full logits' memory; on CUDA it leaves M >= 128 for the tensor cores.
_CHUNK_ELEMENTS = 1 << 23
_MIN_CHUNK_ROWS = 16
# Below this target probability, -log(p) from the softmax has lost digits (float32 subnormals start at
# 1.2e-38): those rare rows take their loss from a log-sum-exp of the row instead.
_TINY_PROBABILITY = 1e-30
# Triton row kernel: one program per token; BLOCK vocabulary entries per step. 4096 fp32 = 16 KiB of
# registers per program at 8 warps, the largest block that does not spill on an H100 (Liger uses the
# same order); the interpreter takes the first (smallest) candidate, so tests stay quick.
_BLOCKS = (1024, 2048, 4096)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype the softmax and loss run in: float64 for float64 heads (tests), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def auto_chunk_rows(n_rows: int, vocab: int) -> int:
    """Tokens per chunk: a power of two with about ``_CHUNK_ELEMENTS`` logits, at least 16, at most all.

    >>> auto_chunk_rows(256, 49152), auto_chunk_rows(10, 96)
    (128, 10)
    """
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // max(vocab, 1))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(n_rows, rows))


# ---------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _cross_entropy_rows_kernel(
        # pointers
        logits_ptr, grad_ptr, labels_ptr, loss_ptr, lse_ptr, scale_ptr,
        # sizes and strides
        n_cols, stride_logits, stride_grad, ignore_index,
        # meta-parameters
        BLOCK: tl.constexpr, HAS_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ):
        """One token's row: log-sum-exp (unless given), loss, and ``(softmax - onehot) * scale`` if asked."""
        row = tl.program_id(0).to(tl.int64)
        row_logits = logits_ptr + row * stride_logits
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        offsets = tl.arange(0, BLOCK)
        if HAS_LSE:
            lse = tl.load(lse_ptr + row)
        else:
            running_max = float("-inf")
            running_sum = 0.0
            for start in range(0, n_cols, BLOCK):
                cols = start + offsets
                x = tl.load(row_logits + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(running_max, tl.max(x, 0))
                running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
                running_max = new_max
            lse = running_max + tl.log(running_sum)
            tl.store(lse_ptr + row, lse)
        target = tl.load(row_logits + label, mask=valid, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        if WRITE_GRAD:
            row_scale = tl.where(valid, tl.load(scale_ptr).to(tl.float32), 0.0)
            row_grad = grad_ptr + row * stride_grad
            for start in range(0, n_cols, BLOCK):
                cols = start + offsets
                mask = cols < n_cols
                x = tl.load(row_logits + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * row_scale
                g = tl.where(cols == label, g - row_scale, g)
                tl.store(row_grad + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- candidate configs


def _configs() -> list[Config]:
    return [Config({"BLOCK": block}, num_warps=8 if block >= 4096 else 4, num_stages=1) for block in _BLOCKS]


# ---------------------------------------------------------------- plain-torch reference


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
    sum_reduction: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)`` on the full logits (for tests)."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum" if sum_reduction else "mean")


# ---------------------------------------------------------------- row work: torch and Triton


def _rows_torch(z, labels, ignore_index, lse=None, grad_scale=None, grad_out=None, buffer=None):
    """One chunk's row work in torch: ``(loss rows, lse, dlogits, row scale)``.

    ``dlogits`` is ``softmax - onehot`` *unscaled*: the caller multiplies the GEMM results by the row scale
    (``grad_scale`` on rows that count, 0 on ignored ones), which costs a ``tokens x width`` product
    instead of another pass over ``tokens x vocab``. Forward (no ``lse``): one softmax pass, written
    into ``buffer`` when given, gives the loss (``-log p[label]``; log-sum-exp rows for a probability
    that underflowed) and the log-sum-exp. Backward (``lse`` given): ``exp(z - lse)`` written into
    ``grad_out`` (which may be ``z`` itself: that step is elementwise). ``loss`` is None in backward.
    """
    zf = z.to(_acc(z.dtype))
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))[:, None]
    loss = None
    if lse is None:
        if buffer is not None and buffer.dtype == zf.dtype:
            probs = torch.ops.aten._softmax.out(zf, 1, False, out=buffer[: zf.shape[0]])
        else:
            probs = torch.softmax(zf, 1)
        p_target = probs.gather(1, safe).squeeze(1)
        z_target = zf.gather(1, safe).squeeze(1)
        nll = -torch.log(p_target)
        lse = z_target + nll
        tiny = p_target < _TINY_PROBABILITY
        if bool(tiny.any()):  # log(p) lost its precision (or is -inf): these rows from log-sum-exp
            rows = tiny.nonzero().squeeze(1)
            exact = torch.logsumexp(zf.index_select(0, rows), 1)
            lse[rows] = exact
            nll[rows] = exact - z_target[rows]
        loss = torch.where(valid, nll, torch.zeros_like(nll))
        if grad_scale is None:
            return loss, lse, None, None
    else:
        probs = grad_out if grad_out is not None and grad_out.dtype == zf.dtype else torch.empty_like(zf)
        torch.sub(zf, lse[:, None], out=probs).exp_()
    count = valid.to(probs.dtype)
    probs.scatter_add_(1, safe, -count[:, None])  # ignored rows keep p: their row scale is 0
    return loss, lse, probs, count * grad_scale


def _rows_triton(z, labels, ignore_index, lse=None, grad_scale=None, grad_out=None, buffer=None):
    rows, vocab = z.shape
    loss = torch.empty(rows, device=z.device, dtype=torch.float32)
    lse_out = lse if lse is not None else torch.empty(rows, device=z.device, dtype=torch.float32)
    write_grad = grad_scale is not None
    if write_grad and grad_out is None:
        grad_out = torch.empty(rows, vocab, device=z.device, dtype=torch.float32)
    grad_buf = grad_out if write_grad else z
    scale = grad_scale.reshape(1).to(torch.float32) if write_grad else loss
    labels = labels.contiguous()

    def launch(config: Config) -> None:
        # Tuning launches rewrite loss/lse/grad, all of which the real launch overwrites; in place
        # (grad_out is z) the tuning run is made on a copy so the logits are not consumed.
        _cross_entropy_rows_kernel[(rows,)](
            z, grad_buf, labels, loss, lse_out, scale,
            vocab, z.stride(0), grad_buf.stride(0), ignore_index,
            HAS_LSE=lse is not None, WRITE_GRAD=write_grad, **config.launch_kwargs(),
        )

    def tune_run(config: Config) -> None:
        nonlocal grad_buf
        real = grad_buf
        if write_grad and grad_buf.data_ptr() == z.data_ptr():
            grad_buf = torch.empty_like(z)
        try:
            launch(config)
        finally:
            grad_buf = real

    key = {"vocab_bucket": triton.next_power_of_2(vocab), "rows_bucket": triton.next_power_of_2(rows),
           "dtype": str(z.dtype), "grad_dtype": str(grad_buf.dtype), "has_lse": lse is not None,
           "write_grad": write_grad}
    config = pick_config("cross_entropy_rows", _cross_entropy_rows_kernel, key, _configs(), tune_run)
    launch(config)
    return loss, lse_out, (grad_out if write_grad else None), None  # the kernel applied the row scale


# ---------------------------------------------------------------- host launchers (the chunk loops)


def _check(hidden, weight, bias, labels, ignore_index):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be (tokens, hidden) and (vocab, hidden)")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must be ({hidden.shape[0]},)")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if not labels.is_cuda and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"linear_cross_entropy: a label is outside [0, {weight.shape[0]}) and is not "
                             f"ignore_index={ignore_index}")


def _chunk_logits(h_c, weight, bias, out=None):
    if bias is None:
        return torch.mm(h_c, weight.t(), out=out)
    if out is None:
        return torch.addmm(bias, h_c, weight.t())
    return torch.addmm(bias, h_c, weight.t(), out=out)


def _scaled(t: torch.Tensor, row_scale: torch.Tensor | None) -> torch.Tensor:
    """``t * row_scale[:, None]`` (``t`` itself when the row scale was already applied)."""
    return t if row_scale is None else t * row_scale.to(t.dtype)[:, None]


def _grad_scale(grad_loss, labels, ignore_index, sum_reduction, acc):
    """The gradient of the loss w.r.t. one valid row's loss: ``grad_loss`` (sum) or ``grad_loss / count``."""
    g = grad_loss.to(acc).reshape(())
    if sum_reduction:
        return g
    # All tokens ignored: eager's mean is 0/0 = nan but its gradient is zero; clamping keeps it zero here.
    return g / (labels != ignore_index).sum().clamp_min(1).to(acc)


def _forward(hidden, weight, bias, labels, ignore_index, sum_reduction, grad_mode, keep_logits, chunk_rows):
    rows_fn = _rows_triton if use_triton(hidden, weight) else _rows_torch
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk = chunk_rows if chunk_rows > 0 else auto_chunk_rows(n, vocab)
    dev, fp32 = hidden.device, _acc(weight.dtype)
    logits = torch.empty(n, vocab, device=dev, dtype=weight.dtype) if keep_logits else hidden.new_empty(0)
    losses = torch.empty(n, device=dev, dtype=fp32)
    lse = torch.empty(n, device=dev, dtype=fp32) if grad_mode == GRAD_RECOMPUTE else hidden.new_empty(0, dtype=fp32)
    grad_hidden = torch.empty_like(hidden) if grad_mode == GRAD_IN_FORWARD else hidden.new_empty(0)
    scale = _grad_scale(torch.ones((), device=dev), labels, ignore_index, sum_reduction, fp32) \
        if grad_mode == GRAD_IN_FORWARD else None
    if keep_logits:
        # The caller keeps the full logits anyway: one GEMM writes them (a chunked GEMM of 64-128 rows
        # measured 15-20% slower on the development CPU); only the loss work below goes by chunks.
        _chunk_logits(hidden, weight, bias, logits)
    # One chunk-sized buffer for the softmax, reused by every chunk (torch path; no page faults per chunk).
    buffer = torch.empty(min(chunk, n), vocab, device=dev, dtype=fp32) if rows_fn is _rows_torch else None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        h_c, y_c = hidden[start:stop], labels[start:stop]
        z = logits[start:stop] if keep_logits else _chunk_logits(h_c, weight, bias)
        # Without kept logits, the chunk's own buffer may take the gradient in place (Triton rows).
        grad_out = None if keep_logits or z.dtype != fp32 else z
        loss_c, lse_c, g, row_scale = rows_fn(z, y_c, ignore_index, grad_scale=scale, grad_out=grad_out,
                                              buffer=buffer)
        losses[start:stop] = loss_c
        if grad_mode == GRAD_RECOMPUTE:
            lse[start:stop] = lse_c
        if g is not None:
            # dlogits goes through the head in weight's dtype, as eager's linear backward does.
            grad_hidden[start:stop] = _scaled(g.to(weight.dtype) @ weight, row_scale)
    loss = losses.sum()
    if not sum_reduction:
        loss = loss / (labels != ignore_index).sum().to(fp32)
    return loss, logits, grad_hidden, lse


def _backward(grad_loss, grad_logits, hidden, weight, bias, labels, lse, grad_hidden_saved, ignore_index,
              sum_reduction, grad_mode, need_hidden, need_weight, need_bias, chunk_rows):
    rows_fn = _rows_triton if use_triton(weight) else _rows_torch
    # A gradient into the returned logits is usually the zeros autograd materialises for an unused
    # output: skip its GEMMs then (one read of the tensor), honour it otherwise.
    has_logit_grad = grad_logits.numel() > 0 and bool(grad_logits.any())
    vocab, width = weight.shape
    gh = gw = gb = None
    if grad_mode == GRAD_IN_FORWARD:
        if need_weight or need_bias:
            raise ValueError("linear_cross_entropy: grad_mode=1 (gradient in forward) needs a frozen weight and "
                             "bias; use grad_mode=2 (recompute) when they train")
        if need_hidden:
            gh = grad_hidden_saved * grad_loss.to(grad_hidden_saved.dtype)
            if has_logit_grad:
                gh = gh + (grad_logits.to(weight.dtype) @ weight).to(gh.dtype)
    elif grad_mode == GRAD_RECOMPUTE:
        n = hidden.shape[0]
        chunk = chunk_rows if chunk_rows > 0 else auto_chunk_rows(n, vocab)
        scale = _grad_scale(grad_loss, labels, ignore_index, sum_reduction, _acc(weight.dtype))
        gh = torch.empty_like(hidden) if need_hidden else None
        acc = _acc(weight.dtype)
        gw = torch.zeros(vocab, width, device=weight.device, dtype=acc) if need_weight else None
        gb = torch.zeros(vocab, device=weight.device, dtype=acc) if need_bias else None
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            h_c = hidden[start:stop]
            z = _chunk_logits(h_c, weight, bias)
            _, _, g, row_scale = rows_fn(z, labels[start:stop], ignore_index, lse=lse[start:stop], grad_scale=scale,
                                         grad_out=z if z.dtype == acc else None)
            h_acc = h_c.to(acc)
            h_scaled = _scaled(h_acc, row_scale)
            if gh is not None:
                gh[start:stop] = _scaled(g.to(weight.dtype) @ weight, row_scale).to(gh.dtype)
            if gw is not None:
                gw.addmm_(g.t(), h_scaled)
            if gb is not None:
                gb += g.sum(0) if row_scale is None else g.t() @ row_scale
            if has_logit_grad:  # the returned logits' own gradient: the plain linear backward
                g_logits = grad_logits[start:stop].to(acc)
                if gh is not None:
                    gh[start:stop] += (g_logits.to(weight.dtype) @ weight).to(gh.dtype)
                if gw is not None:
                    gw.addmm_(g_logits.t(), h_acc)
                if gb is not None:
                    gb += g_logits.sum(0)
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None else None
    else:
        raise ValueError("linear_cross_entropy: backward called with grad_mode=0 (no gradient was prepared)")
    # Outputs may not alias each other: one fresh empty tensor per missing gradient.
    return tuple(g if g is not None else weight.new_empty(0) for g in (gh, gw, gb))


# ---------------------------------------------------------------- torch.library registration


@torch.library.custom_op("fxsparse::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    sum_reduction: bool,
    grad_mode: int,
    keep_logits: bool,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits or empty, dhidden for grad_mode 1 or empty, log-sum-exp for grad_mode 2 or empty)."""
    _check(hidden, weight, bias, labels, ignore_index)
    return _forward(hidden, weight, bias, labels, ignore_index, sum_reduction, grad_mode, keep_logits, chunk_rows)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, sum_reduction, grad_mode, keep_logits, chunk_rows):
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc(weight.dtype)
    loss = hidden.new_empty((), dtype=acc)
    logits = hidden.new_empty((n, vocab), dtype=weight.dtype) if keep_logits else hidden.new_empty(0)
    grad_hidden = hidden.new_empty(hidden.shape) if grad_mode == GRAD_IN_FORWARD else hidden.new_empty(0)
    lse = hidden.new_empty((n,) if grad_mode == GRAD_RECOMPUTE else (0,), dtype=acc)
    return loss, logits, grad_hidden, lse


@torch.library.custom_op("fxsparse::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    grad_loss: torch.Tensor,
    grad_logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_hidden_saved: torch.Tensor,
    ignore_index: int,
    sum_reduction: bool,
    grad_mode: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias), each empty when not needed."""
    return _backward(grad_loss, grad_logits, hidden, weight, bias, labels, lse, grad_hidden_saved, ignore_index,
                     sum_reduction, grad_mode, need_hidden, need_weight, need_bias, chunk_rows)


@_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, grad_logits, hidden, weight, bias, labels, lse, grad_hidden_saved, ignore_index, sum_reduction,
      grad_mode, need_hidden, need_weight, need_bias, chunk_rows):
    like = grad_hidden_saved if grad_mode == GRAD_IN_FORWARD else hidden
    gh = like.new_empty(like.shape) if need_hidden else weight.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    gb = bias.new_empty(bias.shape) if need_bias and bias is not None else weight.new_empty(0)
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, sum_reduction, grad_mode, keep_logits, chunk_rows = inputs
    _, _, grad_hidden, lse = output
    ctx.options = (ignore_index, sum_reduction, grad_mode, keep_logits, chunk_rows)
    ctx.has_bias = bias is not None
    # GRAD_IN_FORWARD keeps only dhidden (and the frozen weight, for a gradient into kept logits);
    # GRAD_RECOMPUTE keeps hidden and the log-sum-exp. Neither keeps anything of vocabulary size.
    saved_hidden = hidden if grad_mode == GRAD_RECOMPUTE else hidden.new_empty(0)
    ctx.save_for_backward(saved_hidden, weight, bias, labels, lse, grad_hidden)


def _backward_formula(ctx, grad_loss, grad_logits, _grad_gh, _grad_lse):
    hidden, weight, bias, labels, lse, grad_hidden = ctx.saved_tensors
    ignore_index, sum_reduction, grad_mode, keep_logits, chunk_rows = ctx.options
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = ctx.has_bias and ctx.needs_input_grad[2]
    if grad_mode == GRAD_NONE:
        raise RuntimeError("fxsparse::linear_cross_entropy was called with grad_mode=0 but a gradient is needed")
    if grad_loss is None:
        grad_loss = torch.zeros((), device=weight.device, dtype=_acc(weight.dtype))
    if grad_logits is None or not keep_logits:
        grad_logits = weight.new_empty(0)
    gh, gw, gb = torch.ops.fxsparse.linear_cross_entropy_backward(
        grad_loss, grad_logits, hidden, weight, bias, labels, lse, grad_hidden, ignore_index, sum_reduction,
        grad_mode, need_hidden, need_weight, need_bias, chunk_rows)
    return (gh if need_hidden else None, gw if need_weight else None, gb if need_bias else None,
            None, None, None, None, None, None)


_linear_cross_entropy_op.register_autograd(_backward_formula, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    grad_mode: int | None = None,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """``cross_entropy(linear(hidden, weight, bias), labels)`` without the full logits (see the module doc).

    ``hidden`` is ``(tokens, width)``, ``labels`` ``(tokens,)``. ``grad_mode=None`` picks 0, 1 or 2 from
    which inputs require grad. Returns the loss in float32 (float64 for a float64 head).

    >>> h = torch.randn(5, 4, requires_grad=True)
    >>> linear_cross_entropy(h, torch.randn(7, 4), None, torch.tensor([0, 1, 2, 3, 6])).backward()
    >>> h.grad.shape
    torch.Size([5, 4])
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if grad_mode is None:
        grad_mode = pick_grad_mode(hidden.requires_grad, weight.requires_grad or
                                   (bias is not None and bias.requires_grad), torch.is_grad_enabled())
    outputs = torch.ops.fxsparse.linear_cross_entropy(hidden, weight, bias, labels, ignore_index,
                                                      reduction == "sum", grad_mode, False, chunk_rows)
    return outputs[0]


def pick_grad_mode(hidden_grad: bool, weight_grad: bool, grad_enabled: bool = True) -> int:
    """``GRAD_NONE`` without any gradient, ``GRAD_RECOMPUTE`` when the head trains, else ``GRAD_IN_FORWARD``.

    >>> pick_grad_mode(True, False), pick_grad_mode(True, True), pick_grad_mode(False, False)
    (1, 2, 0)
    """
    if not grad_enabled or not (hidden_grad or weight_grad):
        return GRAD_NONE
    return GRAD_RECOMPUTE if weight_grad else GRAD_IN_FORWARD


__all__ += ["pick_grad_mode"]
