"""Training memory, estimated before anything is allocated: for `max_tokens: auto` and
`recipes/benchmarks/wmt_memory.py`.

The model is built on the meta device (no memory, every size known) and one training forward
pass is run on a worst-case batch, with a hook counting every tensor autograd saves for the
backward pass. Peak memory is then weights + gradients + optimizer state (+ low-precision
weight copies, + DDP's gradient buckets) + the saved tensors + the logits' gradient. On one
H100 in bf16 this came within 10% of the measured peak, above it (README, Training on GPUs).
"""

from __future__ import annotations

import torch

from nmt_tie.config import ModelConfig, TrainConfig
from nmt_tie.data.batching import Batch
from nmt_tie.devices import DTYPES

GIB = 2**30
OPTIMIZER_STATE = {"adam": 2, "adadelta": 2, "sgd": 0}  # fp32 tensors per parameter


def worst_batch(sentences: int, src_len: int, tgt_len: int, vocab: int, device: str = "meta") -> Batch:
    """`sentences` pairs of `src_len` source and `tgt_len` target ids (no padding)."""
    src = torch.randint(4, vocab, (sentences, src_len), device=device)
    tgt = torch.randint(4, vocab, (sentences, tgt_len), device=device)
    positions = torch.arange(tgt.numel(), device=device)
    return Batch(src, tgt, tgt, None, positions, tgt.reshape(-1), tgt.numel())


def estimate_peak(model_cfg: ModelConfig, train_cfg: TrainConfig, batch: Batch, workers: int = 1) -> dict:
    """Peak training memory in bytes for `batch`, and the parameter count.

    Autocast does not run on the meta device: a low-precision run is estimated with the whole
    model in that precision (autocast keeps norms and softmax in fp32)."""
    from nmt_tie.model.seq2seq import build_model
    from nmt_tie.report import count_unique
    from nmt_tie.training.translation import sequence_loss

    with torch.device("meta"):
        model = build_model(model_cfg)
    params = count_unique(model)
    model.to(DTYPES[train_cfg.dtype])
    weights_storage = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes: views of one tensor are counted once

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights_storage:  # weights are counted once, below
            saved[storage._cdata] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sequence_loss(model, batch, train_cfg.label_smoothing)
    states = OPTIMIZER_STATE[train_cfg.optimizer]
    low_precision = train_cfg.dtype != "fp32"
    per_param = 4 * (1 + 1 + states) + (2 if low_precision else 0) + (4 if workers > 1 else 0)
    logits_grad = batch.target_tokens * model_cfg.tgt_vocab_size * 4
    peak = per_param * params + sum(saved.values()) + logits_grad
    return {"params": params, "peak": peak, "states": states}


def peak_for_sentences(
    model_cfg: ModelConfig, train_cfg: TrainConfig, sentences: int, src_len: int, tgt_len: int, workers: int
) -> int:
    batch = worst_batch(sentences, src_len, tgt_len, model_cfg.tgt_vocab_size)
    return estimate_peak(model_cfg, train_cfg, batch, workers)["peak"]
