"""What a WMT run needs: GPU memory per batch and vocabulary, checkpoint sizes, updates/s.

For each WMT recipe config and tying mode it builds the model at the recipe's vocabulary
size and a worst-case batch (every sentence as long as the longest allowed) and reports:

- parameters and the bytes of last.pt (weights + optimizer state) and of best.pt / a
  numbered checkpoint (weights only), from the parameter count;
- on the meta device (the default, any machine): an estimate of peak GPU memory
  (`nmt_tie.training.memory`, what `max_tokens: auto` uses), counted as weights + gradients +
  optimizer state + every tensor autograd saves for the backward pass (hooked, at the
  recipe's precision) + the logits' gradient;
- what `max_tokens: auto` would choose on a GPU of `--gpu-gib` free memory (sentences of the
  longest length per GPU batch);
- on a GPU (`--device cuda`): the measured peak (torch.cuda.max_memory_allocated) and
  updates/s of real updates on random ids, beside the estimate, which calibrates it.

The recipes say `max_tokens: auto`; the batch measured here is `--max-tokens` (4,096 for the
Transformer and 16,000 with at most 80 sentences for the RNN, their per-GPU batches before
auto: the figures in the recipe READMEs).

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
from nmt_tie.devices import DTYPES, autocast_context  # noqa: E402
from nmt_tie.model.seq2seq import build_model  # noqa: E402
from nmt_tie.training.batch_plan import auto_max_tokens  # noqa: E402
from nmt_tie.training.memory import GIB, estimate_peak  # noqa: E402
from nmt_tie.training.memory import worst_batch as batch_of  # noqa: E402
from nmt_tie.training.optim import build_optimizer  # noqa: E402
from nmt_tie.training.translation import sequence_loss  # noqa: E402

# recipe directory -> (config prefix, joint vocabulary of its run.sh, longest pair in pieces)
RECIPES = {
    "wmt15_en_de": ("rnn", 90000, 80),
    "wmt14_en_fr": ("rnn", 90000, 80),
    "wmt14_en_de_transformer": ("transformer", 32000, 128),
}
BATCH_BEFORE_AUTO = {"rnn": 16000, "transformer": 4096}


def worst_batch(train_cfg, length: int, device: str, vocab: int):
    """The largest batch `max_tokens` (and max_sentences) allow, every sentence `length` pieces long."""
    sentences = train_cfg.max_tokens // (2 * length)
    if train_cfg.max_sentences:
        sentences = min(sentences, train_cfg.max_sentences)
    return batch_of(sentences, length, length, vocab, device)


def estimate(model_cfg, train_cfg, batch) -> dict:
    return estimate_peak(model_cfg, train_cfg, batch)


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
    parser.add_argument("--max-tokens", type=int, help="per-GPU batch (default: 4096 Transformer, 16000 RNN)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="free GPU memory for the auto column")
    args = parser.parse_args()
    header = (
        f"{'recipe':<25}{'tie':<6}{'dtype':<6}{'batch':>9}{'params':>13}{'last.pt GB':>11}{'best.pt GB':>11}"
        f"{'est. GiB':>9}{'auto batch':>12}"
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
            batch_tokens = args.max_tokens or BATCH_BEFORE_AUTO[arch]
            auto_cfg = replace(train_cfg, memory_budget=args.gpu_gib * 0.9)
            train_cfg = replace(train_cfg, max_tokens=batch_tokens)
            if train_cfg.dtype not in DTYPES:
                raise SystemExit(f"unknown dtype {train_cfg.dtype}")
            model_cfg = replace(model_cfg, src_vocab_size=vocab, tgt_vocab_size=vocab, shared_vocab=True)
            batch = worst_batch(train_cfg, length, "meta", vocab)
            result = estimate(model_cfg, train_cfg, batch)
            params = result["params"]
            shape = f"{len(batch)}x{length}"
            auto_tokens, _ = auto_max_tokens(model_cfg, auto_cfg, (length, length), 1, torch.device("meta"))
            line = (
                f"{recipe:<25}{tie:<6}{train_cfg.dtype:<6}{shape:>9}{params:>13,}"
                f"{4 * params * (1 + result['states']) / 1e9:>11.2f}{4 * params / 1e9:>11.2f}"
                f"{result['peak'] / GIB:>9.1f}{f'{auto_tokens // (2 * length)}x{length}':>12}"
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
        "last.pt holds weights and optimizer state, best.pt and numbered checkpoints the weights; "
        f"auto batch: what max_tokens: auto chooses on one GPU with {args.gpu_gib:g} GiB free."
    )


if __name__ == "__main__":
    main()
