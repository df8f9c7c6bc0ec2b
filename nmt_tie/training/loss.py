"""Label-smoothed cross-entropy as one autograd function (fast on the CPU, lean on the GPU).

The textbook composition (log_softmax, gather, mean) allocates and sweeps the (tokens x
vocabulary) matrix about six times in the backward pass; this function computes the gradient
softmax - (1 - eps) * onehot - eps / V directly and never materializes log-probabilities.
It works through the rows in chunks of at most 4M elements: on the CPU, glibc serves
allocations above 32 MB with fresh pages from mmap every time (page faults cost more than the
arithmetic here), smaller ones come from reused heap memory. On a GPU, where every chunk
costs a handful of kernel launches, chunks are sized for memory instead (1/8 G elements, so
a 4,000-token batch of a 90K vocabulary is 3 chunks, not 700). The loss equals
F.cross_entropy(..., label_smoothing=eps, reduction="sum"), and unlike that call it never
stores the log-probabilities for the backward pass: memory is the logits and their gradient.
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
        log_norm = torch.empty(rows, dtype=compute, device=logits.device)
        mean_score = torch.empty(rows, dtype=compute, device=logits.device)
        for start, end in _row_chunks(rows, vocab, elements):
            # log-sum-exp as max + log(sum(exp(x - max))) in one buffer: torch.logsumexp took
            # twice as long on the CPU (same result, bit for bit). The buffer is a converted copy
            # because mixed bf16/fp32 arithmetic takes a slow path on the CPU.
            scores = logits[start:end].to(compute, copy=True)
            top = scores.amax(dim=-1, keepdim=True)
            mean_score[start:end] = scores.mean(dim=-1)
            log_norm[start:end] = scores.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))
        target_score = logits.gather(1, target.unsqueeze(1)).squeeze(1).to(compute)
        row_nll, row_smooth = log_norm - target_score, log_norm - mean_score
        if ignore_index is not None:
            keep = (target != ignore_index).to(compute)
            row_nll, row_smooth = row_nll * keep, row_smooth * keep
        nll = row_nll.sum()
        loss = (1 - eps) * nll + eps * row_smooth.sum() if eps > 0 else nll.clone()
        ctx.save_for_backward(logits, target, log_norm)
        ctx.eps = eps
        ctx.elements = elements
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        logits, target, log_norm = ctx.saved_tensors
        eps = ctx.eps
        rows, vocab = logits.shape
        grad = torch.empty_like(logits)
        # the incoming gradient and the ignored rows as one factor per row: one pass, not two
        row_scale = grad_loss.to(log_norm.dtype).expand(rows).unsqueeze(1)
        if ctx.ignore_index is not None:
            row_scale = row_scale * (target != ctx.ignore_index).unsqueeze(1)
        for start, end in _row_chunks(rows, vocab, ctx.elements):
            # softmax, in one buffer updated in place
            chunk = logits[start:end].to(log_norm.dtype, copy=True)
            chunk.sub_(log_norm[start:end].unsqueeze(1)).exp_()
            if eps > 0:
                chunk.sub_(eps / vocab)
            index = torch.arange(end - start, device=logits.device)
            chunk[index, target[start:end]] -= 1 - eps
            grad[start:end] = chunk.mul_(row_scale[start:end])
        return grad, None, None, None, None


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
    return _LabelSmoothedCrossEntropy.apply(logits, target, eps, elements, ignore_index)
