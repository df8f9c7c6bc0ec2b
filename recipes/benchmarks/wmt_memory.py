"""What a WMT run needs: GPU memory per batch and vocabulary, checkpoint sizes, updates/s.

For each WMT recipe config and tying mode it builds the model at the recipe's vocabulary
size and a worst-case batch of the recipe's shape (every sentence as long as the longest
allowed) and reports:

- parameters and the bytes of last.pt (weights + optimizer state) and of best.pt / a
  numbered checkpoint (weights only), from the parameter count;
- on the meta device (the default, any machine): an estimate of peak GPU memory, counted as
  weights + gradients + optimizer state + every tensor autograd saves for the backward pass
  (hooked, at the recipe's precision) + the logits' gradient;
- on a GPU (`--device cuda`): the measured peak (torch.cuda.max_memory_allocated) and
  updates/s of real updates on random ids, beside the estimate, which calibrates it.

    python recipes/benchmarks/wmt_memory.py                      # estimates, no GPU needed
    python recipes/benchmarks/wmt_memory.py --device cuda         # measured on this GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from nmt_tie.config import load_config  # noqa: E402
from nmt_tie.data.batching import Batch  # noqa: E402
from nmt_tie.devices import DTYPES, autocast_context  # noqa: E402
from nmt_tie.model.seq2seq import build_model  # noqa: E402
from nmt_tie.report import count_unique  # noqa: E402
from nmt_tie.training.optim import build_optimizer  # noqa: E402
from nmt_tie.training.translation import sequence_loss  # noqa: E402

# recipe directory -> (config prefix, joint vocabulary of its run.sh, longest pair in pieces)
RECIPES = {
    "wmt15_en_de": ("rnn", 90000, 80),
    "wmt14_en_fr": ("rnn", 90000, 80),
    "wmt14_en_de_transformer": ("transformer", 32000, 128),
}
GIB = 2**30
OPTIMIZER_STATE = {"adam": 2, "adadelta": 2, "sgd": 0}  # fp32 tensors per parameter


def worst_batch(train_cfg, length: int, device: str, vocab: int) -> Batch:
    """The largest batch the recipe's batching allows, every sentence `length` pieces long."""
    sentences = train_cfg.max_tokens // (2 * length)
    if train_cfg.max_sentences:
        sentences = min(sentences, train_cfg.max_sentences)
    ids = torch.randint(4, vocab, (sentences, length), device=device)
    return Batch(ids, ids, ids, None, torch.arange(ids.numel(), device=device), ids.reshape(-1), ids.numel())


def estimate(model_cfg, train_cfg, batch: Batch) -> dict:
    """Peak memory on the meta device: nothing is allocated, every size is counted. Autocast
    does not run on the meta device: a low-precision run is estimated with the whole model in
    that precision (autocast keeps norms and softmax in fp32: the measured column says how
    close this comes)."""
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
    weights = 4 * params * (1 + 1 + states) + (2 * params if low_precision else 0)  # + bf16 weight copies
    logits_grad = batch.target_tokens * model_cfg.tgt_vocab_size * 4
    return {"params": params, "peak": weights + sum(saved.values()) + logits_grad, "states": states}


def measure(model_cfg, train_cfg, length: int, updates: int = 10) -> dict:
    """Peak memory and speed of real updates on this GPU."""
    device = torch.device("cuda")
    model = build_model(model_cfg).to(device)
    optimizer = build_optimizer(model.parameters(), train_cfg)
    batch = worst_batch(train_cfg, length, "cuda", model_cfg.tgt_vocab_size)
    autocast = autocast_context(device, train_cfg.dtype)
    torch.cuda.reset_peak_memory_stats()
    seconds = 0.0
    for step in range(updates + 1):
        if step == 1:  # the first update allocates the optimizer state and warms up
            torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast:
            loss, _, tokens = sequence_loss(model, batch, train_cfg.label_smoothing)
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / updates
    return {"measured_peak": torch.cuda.max_memory_allocated(), "updates_per_s": 1 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="meta", choices=["meta", "cuda"])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--ties", default="none,all")
    parser.add_argument("--dtype", default="", help="override the recipes' dtype (fp32, bf16, fp16)")
    args = parser.parse_args()
    header = (
        f"{'recipe':<25}{'tie':<6}{'dtype':<6}{'batch':>9}{'params':>13}{'last.pt GB':>11}{'best.pt GB':>11}"
        f"{'est. GiB':>9}"
    )
    if args.device == "cuda":
        header += f"{'meas. GiB':>10}{'upd/s':>7}{'tok/s':>9}"
    print(header)
    for recipe in args.recipes.split(","):
        arch, vocab, length = RECIPES[recipe]
        for tie in args.ties.split(","):
            model_cfg, train_cfg = load_config(REPO / "recipes" / recipe / f"{arch}-{tie}.yaml")
            if args.dtype:
                train_cfg = replace(train_cfg, dtype=args.dtype)
            if train_cfg.dtype not in DTYPES:
                raise SystemExit(f"unknown dtype {train_cfg.dtype}")
            model_cfg = replace(model_cfg, src_vocab_size=vocab, tgt_vocab_size=vocab, shared_vocab=True)
            batch = worst_batch(train_cfg, length, "meta", vocab)
            result = estimate(model_cfg, train_cfg, batch)
            params = result["params"]
            shape = f"{len(batch)}x{length}"
            line = (
                f"{recipe:<25}{tie:<6}{train_cfg.dtype:<6}{shape:>9}{params:>13,}"
                f"{4 * params * (1 + result['states']) / 1e9:>11.2f}{4 * params / 1e9:>11.2f}"
                f"{result['peak'] / GIB:>9.1f}"
            )
            if args.device == "cuda":
                measured = measure(model_cfg, train_cfg, length)
                torch.cuda.empty_cache()
                line += (
                    f"{measured['measured_peak'] / GIB:>10.1f}{measured['updates_per_s']:>7.2f}"
                    f"{measured['updates_per_s'] * batch.target_tokens:>9,.0f}"
                )
            print(line, flush=True)
    print(
        "\nbatch: sentences x pieces, every sentence as long as the longest allowed (the worst case); "
        "last.pt holds weights and optimizer state, best.pt and numbered checkpoints the weights."
    )


if __name__ == "__main__":
    main()
