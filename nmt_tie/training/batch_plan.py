"""How an update's batch is made: workers x per-worker batch x accumulated batches.

A user says the batch once, globally (`global_batch_tokens: 25000` target tokens per update,
or `global_batch_sentences: 80`), and gets it on any number of GPUs and nodes: the plan
derives the accumulation from the number of workers and the largest per-worker batch
allowed (`max_tokens`, or `auto`: what fits the GPU's memory), then shrinks the per-worker
batch so that workers x batch x accumulation comes to the global batch. Batch sizes are
measured on the training data itself (token buckets over a sample of its lengths), since
how full a `max_tokens` batch is depends on the lengths of its sentences.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from nmt_tie.config import ModelConfig, TrainConfig
from nmt_tie.data.batching import ladder_down, ladder_up, token_buckets
from nmt_tie.errors import UserError
from nmt_tie.training.memory import GIB, peak_for_sentences

# Batch sizes are measured on at most this many training pairs (all of Multi30k; a sample of WMT).
SAMPLE_PAIRS = 200_000
GPU_MEMORY_SHARE = 0.9  # of the free memory: room for the allocator's fragmentation, cuBLAS, NCCL
CPU_MEMORY_SHARE = 0.5  # of the available memory


@dataclass
class BatchPlan:
    workers: int
    max_tokens: int  # per worker: padded source + target tokens of one batch
    max_sentences: int  # per worker; 0: no cap
    update_freq: int  # batches accumulated per update
    tokens_per_batch: float  # mean target tokens of one worker's batch, measured on the data
    sentences_per_batch: float
    notes: list[str] = field(default_factory=list)  # how it was chosen

    @property
    def tokens_per_update(self) -> float:
        return self.workers * self.update_freq * self.tokens_per_batch

    @property
    def sentences_per_update(self) -> float:
        return self.workers * self.update_freq * self.sentences_per_batch

    def describe(self) -> str:
        workers = plural(self.workers, "worker")
        sentences = f", max_sentences {self.max_sentences}" if self.max_sentences else ""
        return (
            f"batch per update: {self.tokens_per_update:,.0f} target tokens, "
            f"{self.sentences_per_update:,.0f} sentences (means on the data) = {workers} x "
            f"{self.tokens_per_batch:,.0f} tokens (max_tokens {self.max_tokens:,}{sentences}) "
            f"x {self.update_freq} accumulated"
        )

    def record(self) -> dict:
        """For the `setup` record of log.jsonl."""
        return {
            "max_tokens": self.max_tokens,
            "max_sentences": self.max_sentences,
            "update_freq": self.update_freq,
            "tokens_per_update": round(self.tokens_per_update, 1),
            "sentences_per_update": round(self.sentences_per_update, 1),
            "batch_notes": self.notes,
        }


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('ch') else 's'}"


def batch_means(src_lengths, tgt_lengths, max_tokens: int, max_sentences: int, ladder: bool) -> tuple:
    """Mean target tokens and sentences of a batch cut from these pairs (a fixed sample of up
    to SAMPLE_PAIRS of them, sorted as the sampler sorts them)."""
    n = len(src_lengths)
    rng = np.random.default_rng(0)
    sample = rng.choice(n, SAMPLE_PAIRS, replace=False) if n > SAMPLE_PAIRS else np.arange(n)
    order = sample[np.lexsort((src_lengths[sample], tgt_lengths[sample]))]
    batches = token_buckets(src_lengths, tgt_lengths, max_tokens, order, max_sentences or None, ladder)
    return float(tgt_lengths[sample].sum()) / len(batches), len(sample) / len(batches)


def batch_for_tokens(wanted: float, smallest: int, largest: int, tokens_of: Callable[[int], float]) -> int:
    """The max_tokens in [smallest, largest] whose batches hold closest to `wanted` target
    tokens on average: bisection, since batch fill grows with max_tokens but not in proportion
    (on a small corpus a whole epoch can be one batch)."""
    low, high = smallest, largest
    while high - low > max(1, low // 500):
        middle = (low + high) // 2
        if tokens_of(middle) > wanted:
            high = middle
        else:
            low = middle
    return min((low, high), key=lambda m: abs(tokens_of(m) - wanted))


def memory_budget(cfg: TrainConfig, device: torch.device) -> tuple[int, str]:
    """Bytes one worker's training may use for `max_tokens: auto`, and where the figure is from."""
    if cfg.memory_budget > 0:
        return int(cfg.memory_budget * GIB), f"memory_budget {cfg.memory_budget:g} GiB"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        share = f"{GPU_MEMORY_SHARE:.0%} of the {free / GIB:.1f} GiB free on {device}"
        return int(GPU_MEMORY_SHARE * free), share
    if device.type == "cpu":
        available = available_memory()
        return int(CPU_MEMORY_SHARE * available), f"half of the {available / GIB:.1f} GiB available"
    raise UserError(f"max_tokens: auto on {device}: set memory_budget (GiB per worker)")


def available_memory() -> int:
    """MemAvailable (what can be allocated without swapping), else the free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_max_tokens(
    model_cfg: ModelConfig, cfg: TrainConfig, longest: tuple[int, int], workers: int, device: torch.device
) -> tuple[int, str]:
    """The largest per-worker batch on the shape ladder whose worst case (every pair as long
    as the longest source and target of the data) is estimated to fit the memory budget."""
    budget, source = memory_budget(cfg, device)
    src_len, tgt_len = longest

    def peak(sentences: int) -> int:
        return peak_for_sentences(model_cfg, cfg, sentences, src_len, tgt_len, workers)

    one, two = peak(1), peak(2)
    if one > budget:
        raise UserError(
            f"max_tokens: auto: one pair of the longest length in the data ({src_len} + {tgt_len} pieces) "
            f"needs an estimated {one / GIB:.1f} GiB to train, more than {source} ({budget / GIB:.1f} GiB); "
            "use a device with more memory, a smaller model, or `nmt-tie prepare --max-len` shorter"
        )
    per_pair = max(1, two - one)  # memory is linear in the number of pairs at fixed lengths
    sentences = ladder_down(max(1, int((budget - (one - per_pair)) // per_pair)))
    estimated = peak(sentences)
    while sentences > 1 and estimated > budget:
        sentences = ladder_down(sentences - 1)
        estimated = peak(sentences)
    max_tokens = sentences * (src_len + tgt_len)
    note = (
        f"max_tokens auto: {max_tokens:,} ({sentences} pairs of {src_len} + {tgt_len} pieces, the longest "
        f"in the data; estimated peak {estimated / GIB:.2f} GiB of {budget / GIB:.2f}: {source})"
    )
    return max_tokens, note


def plan_batches(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    src_lengths: np.ndarray,
    tgt_lengths: np.ndarray,
    workers: int,
    device: torch.device,
    agree: Callable[[int], int] = lambda value: value,
) -> BatchPlan:
    """The per-worker batch and accumulation for `cfg` on this data and number of workers.

    `agree` makes every worker use the same value (the smallest: every worker computes the
    same global list of batches, and each must fit its own GPU)."""
    if cfg.global_batch_tokens and cfg.global_batch_sentences:
        raise UserError("set global_batch_tokens or global_batch_sentences, not both")
    if (cfg.global_batch_tokens or cfg.global_batch_sentences) and cfg.update_freq != 1:
        raise UserError(
            "update_freq is derived from the global batch (global_batch_tokens / global_batch_sentences); "
            "leave it at 1"
        )
    if min(cfg.global_batch_tokens, cfg.global_batch_sentences, cfg.update_freq - 1) < 0:
        raise UserError("global_batch_tokens and global_batch_sentences must be >= 0, update_freq >= 1")
    if cfg.memory_budget < 0:
        raise UserError(f"memory_budget: {cfg.memory_budget:g} GiB; give a positive size, or 0 to measure")
    src_lengths, tgt_lengths = np.asarray(src_lengths), np.asarray(tgt_lengths)
    widen = ladder_up if cfg.shape_ladder else int
    longest = (widen(int(src_lengths.max())), widen(int(tgt_lengths.max())))
    notes = []
    if cfg.max_tokens == "auto":
        cap, note = auto_max_tokens(model_cfg, cfg, longest, workers, device)
        cap = agree(cap)
        notes.append(note)
    elif isinstance(cfg.max_tokens, int) and cfg.max_tokens > 0:
        cap = cfg.max_tokens
    else:
        raise UserError(f"max_tokens: {cfg.max_tokens!r} is not a positive number or auto")

    def means(max_tokens: int, max_sentences: int) -> tuple[float, float]:
        return batch_means(src_lengths, tgt_lengths, max_tokens, max_sentences, cfg.shape_ladder)

    max_tokens, max_sentences, update_freq = cap, cfg.max_sentences, cfg.update_freq
    if cfg.global_batch_tokens:
        wanted = cfg.global_batch_tokens
        full = means(cap, max_sentences)[0]
        update_freq = math.ceil(wanted / (workers * full))
        per_batch = wanted / (workers * update_freq)  # target tokens of one worker's batch
        if per_batch < full:  # the largest batch would overshoot: find the smaller one that fits
            max_tokens = batch_for_tokens(per_batch, sum(longest), cap, lambda m: means(m, max_sentences)[0])
        notes.append(
            f"global_batch_tokens {wanted:,} over {plural(workers, 'worker')}: "
            f"{plural(update_freq, 'batch')} of about {per_batch:,.0f} target tokens per worker and update "
            f"(max_tokens {cap:,} holds {full:,.0f})"
        )
    elif cfg.global_batch_sentences:
        wanted = cfg.global_batch_sentences
        per_worker_cap = cfg.max_sentences or wanted
        update_freq = math.ceil(wanted / (workers * per_worker_cap))
        max_sentences = max(1, round(wanted / (workers * update_freq)))
        notes.append(
            f"global_batch_sentences {wanted:,} over {plural(workers, 'worker')}: "
            f"{plural(update_freq, 'batch')} of at most {max_sentences} sentences per worker and update"
        )
    tokens, sentences = means(max_tokens, max_sentences)
    per_update = tokens * workers * update_freq
    if cfg.global_batch_tokens and per_update > 1.2 * cfg.global_batch_tokens:
        notes.append(
            f"global_batch_tokens {cfg.global_batch_tokens:,} is below the smallest batch this data allows "
            f"(max_tokens {max_tokens:,}): an update has about {per_update:,.0f} target tokens"
        )
    unbounded = means(sum(longest) * max_sentences, max_sentences)[1] if max_sentences else sentences
    if cfg.global_batch_sentences and sentences < 0.9 * unbounded:
        notes.append(
            f"max_tokens {max_tokens:,} holds fewer sentences than that in batches of long ones "
            f"({sentences:.1f} on average): raise max_tokens (or use auto) for the full batch"
        )
    return BatchPlan(workers, max_tokens, max_sentences, update_freq, tokens, sentences, notes)
