"""Label-smoothed cross-entropy as one autograd function (fast on the CPU, lean on the GPU).

The textbook composition (log_softmax, gather, mean) allocates and sweeps the (tokens x
vocabulary) matrix about six times in the backward pass; this function computes the gradient
softmax - (1 - eps) * onehot - eps / V directly, in the forward pass from the exponentials the
loss needs anyway, and never materializes log-probabilities (the backward pass only scales it).
It works through the rows in chunks of at most 4M elements: on the CPU, glibc serves
allocations above 32 MB with fresh pages from mmap every time (page faults cost more than the
arithmetic here), smaller ones come from reused heap memory. On a GPU, where every chunk
costs a handful of kernel launches, chunks are sized for memory instead (1/8 G elements, so
a 4,000-token batch of a 90K vocabulary is 3 chunks, not 700). The loss equals
F.cross_entropy(..., label_smoothing=eps, reduction="sum"), and unlike that call it never
stores the log-probabilities for the backward pass: memory is the logits and their gradient
(the logits are no longer needed once the forward pass has made the gradient).
"""

from __future__ import annotations

import torch

CPU_CHUNK_ELEMENTS = 1 << 19  # 2 MB of fp32: served from reused heap memory
GPU_CHUNK_ELEMENTS = 1 << 27  # 512 MB of fp32: few kernel launches, bounded extra memory


def chunk_elements(device: torch.device) -> int:
    return CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS


def _row_chunks(rows: int, width: int, elements: int):
    step = max(1, elements // max(1, width))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, eps: float, elements: int, ignore_index: int | None):
        rows, vocab = logits.shape
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        if ignore_index is None:
            keep = torch.ones(rows, dtype=compute, device=logits.device)
        else:
            keep = (target != ignore_index).to(compute)
        # The gradient (softmax - (1 - eps) * onehot - eps / V per kept row) is made here, from
        # the exponentials the loss needs anyway, and kept for the backward pass instead of the
        # logits: one pass over the (rows x vocabulary) matrix fewer, and no second exp.
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        in_place = grad is not None and logits.dtype == compute
        # fp16 keeps the gradient times 2**15 until the backward pass brings the loss scaler's
        # factor: softmax entries down to ~2e-9 stay normal fp16 numbers (unscaled, those below
        # 6e-5 would lose precision and those below 6e-8 flush to zero). A power of two: exact.
        ctx.stored_scale = 2.0**15 if logits.dtype == torch.float16 else 1.0
        row_factor = keep * ctx.stored_scale  # ignored rows get a zero gradient
        log_norm = torch.empty(rows, dtype=compute, device=logits.device)
        mean_score = torch.empty(rows, dtype=compute, device=logits.device)
        for start, end in _row_chunks(rows, vocab, elements):
            # log-sum-exp as max + log(sum(exp(x - max))) in one buffer: torch.logsumexp took
            # twice as long on the CPU (same result, bit for bit). The buffer is a converted copy
            # (mixed bf16/fp32 arithmetic takes a slow path on the CPU), or the gradient's own
            # rows when the logits are already of the compute type.
            if in_place:
                scores = grad[start:end].copy_(logits[start:end])
            else:
                scores = logits[start:end].to(compute, copy=True)
            top = scores.amax(dim=-1, keepdim=True)
            mean_score[start:end] = scores.mean(dim=-1)
            total = scores.sub_(top).exp_().sum(dim=-1)
            log_norm[start:end] = total.log().add_(top.squeeze(1))
            if grad is None:
                continue
            factor = row_factor[start:end]
            scores.mul_((factor / total).unsqueeze(1))  # the softmax
            if eps > 0:
                scores.sub_((eps / vocab) * factor.unsqueeze(1))
            index = torch.arange(end - start, device=logits.device)
            scores[index, target[start:end]] -= (1 - eps) * factor
            if not in_place:
                grad[start:end] = scores
        target_score = logits.gather(1, target.unsqueeze(1)).squeeze(1).to(compute)
        row_nll, row_smooth = (log_norm - target_score) * keep, (log_norm - mean_score) * keep
        nll = row_nll.sum()
        loss = (1 - eps) * nll + eps * row_smooth.sum() if eps > 0 else nll.clone()
        ctx.save_for_backward(grad)  # freed after the backward pass unless the graph is retained
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # out of place: a retained graph may run backward again. A 0-dim fp32 factor keeps the
        # gradient's dtype and multiplies in fp32 on the CPU.
        return grad * (grad_loss / ctx.stored_scale), None, None, None, None


def label_smoothed_nll(
    logits: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    chunk: int | None = None,
    ignore_index: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed label-smoothed loss, summed NLL) over rows of logits (N, V) and targets (N,).

    `chunk`: elements of the (N, V) matrix handled at once; default by the logits' device.
    Rows whose target is `ignore_index` add nothing to either sum and get a zero gradient
    (training pads its rows to a bounded set of counts with them)."""
    elements = chunk or chunk_elements(logits.device)
    if logits.requires_grad and not torch.is_grad_enabled():
        logits = logits.detach()  # the forward pass makes the gradient only for autograd
    return _LabelSmoothedCrossEntropy.apply(logits, target, eps, elements, ignore_index)
