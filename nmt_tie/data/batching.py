"""Binarized parallel data and token-bucket batching with a resumable iteration state.

A batch holds at most `max_tokens` padded tokens, counting source and target:
`len(batch) * (longest source + longest target) <= max_tokens`. Sentences are sorted by
length (ties broken randomly by the seed) so that batches waste little padding; the order of
the batches is shuffled per epoch from `(seed, epoch)`, so a restored iterator reproduces the
exact same sequence of batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from nmt_tie.data.prepare import PreparedData
from nmt_tie.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt_tie.errors import UserError


@dataclass
class Batch:
    """Padded id tensors: source ends in EOS; target input starts with BOS, output ends in EOS.

    The positions of the real (non-padding) target tokens, flattened, and their count are
    computed on the CPU when the batch is built, so that training never has to ask the GPU
    for them (each such question is a host-device synchronization).
    """

    src: torch.Tensor  # (batch, src_len)
    tgt_in: torch.Tensor  # (batch, tgt_len)
    tgt_out: torch.Tensor  # (batch, tgt_len)
    indices: np.ndarray  # positions of the sentences in their split
    target_positions: torch.Tensor | None = None  # (tokens,) flat indices into (batch * tgt_len)
    targets: torch.Tensor | None = None  # (tokens,) the target ids at those positions
    target_tokens: int = -1  # number of non-padding target tokens

    def __post_init__(self) -> None:
        if self.target_positions is None:
            flat = self.tgt_out.reshape(-1)
            self.target_positions = torch.nonzero(flat != PAD_ID).squeeze(1)
            self.targets = flat[self.target_positions]
        if self.target_tokens < 0:
            self.target_tokens = len(self.target_positions)

    def __len__(self) -> int:
        return self.src.size(0)

    def with_rows_on_ladder(self) -> Batch:
        """The same batch with its selected target rows padded to the shape ladder
        (`ladder_up`): the output layer, the largest matrix product, then sees a bounded set
        of row counts instead of a new one nearly every batch. The extra rows select
        position 0 and have target PAD_ID, which the loss ignores; `target_tokens` stays the
        real count."""
        extra = ladder_up(self.target_tokens) - len(self.target_positions)
        if extra <= 0:
            return self
        return Batch(
            self.src,
            self.tgt_in,
            self.tgt_out,
            self.indices,
            torch.cat([self.target_positions, self.target_positions.new_zeros(extra)]),
            torch.cat([self.targets, self.targets.new_full((extra,), PAD_ID)]),
            self.target_tokens,
        )

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str) -> Batch:
        # Copies from pinned memory overlap with GPU work; from pageable memory they do not.
        nb = torch.device(device).type == "cuda" and self.src.is_pinned()
        return self._map(lambda t: t.to(device, non_blocking=nb))

    def _map(self, fn) -> Batch:
        return Batch(
            fn(self.src),
            fn(self.tgt_in),
            fn(self.tgt_out),
            self.indices,
            fn(self.target_positions),
            fn(self.targets),
            self.target_tokens,
        )


def ladder_up(n: int) -> int:
    """The smallest width of the shape ladder >= n: n itself up to 16, then eight widths per
    doubling (multiples of 2 up to 32, of 4 up to 64, ...). Padding a batch to it adds at
    most 1/8, about 3% on average, and bounds the number of distinct widths."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def ladder_down(n: int) -> int:
    """The largest value of the same ladder <= n (for the number of sentences in a batch)."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return n // step * step


def _ladder_up_array(n: np.ndarray) -> np.ndarray:
    """`ladder_up` of every element."""
    n = np.asarray(n, dtype=np.int64)
    step = np.left_shift(1, np.maximum(0, np.floor(np.log2(np.maximum(n, 1))).astype(np.int64) - 3))
    return np.where(n <= 16, n, -(-n // step) * step)


def pad_sequences(
    sequences: list[np.ndarray], prefix: int | None, suffix: int | None, ladder: bool = False
) -> torch.Tensor:
    """Stack id sequences into a (batch, width) tensor, padding with PAD_ID; the width is the
    longest sequence's, or with `ladder` the next width of the shape ladder."""
    extra = (prefix is not None) + (suffix is not None)
    width = max(len(s) for s in sequences) + extra
    width = ladder_up(width) if ladder else width
    out = np.full((len(sequences), width), PAD_ID, dtype=np.int64)
    for row, seq in enumerate(sequences):
        start = 0
        if prefix is not None:
            out[row, 0] = prefix
            start = 1
        out[row, start : start + len(seq)] = seq
        if suffix is not None:
            out[row, start + len(seq)] = suffix
    return torch.from_numpy(out)


class ParallelData:
    """One split of a prepared directory, memory-mapped."""

    def __init__(self, prepared: PreparedData, split: str):
        self.split = split
        self._src_ids, self._src_offsets = prepared.split_arrays(split, "src")
        self._tgt_ids, self._tgt_offsets = prepared.split_arrays(split, "tgt")
        # +1: the source gets EOS, the target gets BOS (input) or EOS (output).
        self.src_lengths = np.diff(self._src_offsets) + 1
        self.tgt_lengths = np.diff(self._tgt_offsets) + 1

    def __len__(self) -> int:
        return len(self.src_lengths)

    def source(self, i: int) -> np.ndarray:
        return self._src_ids[self._src_offsets[i] : self._src_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self._tgt_ids[self._tgt_offsets[i] : self._tgt_offsets[i + 1]]

    def collate(self, indices: np.ndarray, ladder: bool = False) -> Batch:
        """A padded batch; with `ladder`, widths and the count of selected target rows padded
        to the shape ladder (`ladder_up`)."""
        sources = [self.source(i) for i in indices]
        targets = [self.target(i) for i in indices]
        batch = Batch(
            src=pad_sequences(sources, None, EOS_ID, ladder),
            tgt_in=pad_sequences(targets, BOS_ID, None, ladder),
            tgt_out=pad_sequences(targets, None, EOS_ID, ladder),
            indices=np.asarray(indices),
        )
        return batch.with_rows_on_ladder() if ladder else batch


def token_buckets(
    src_lengths: np.ndarray,
    tgt_lengths: np.ndarray,
    max_tokens: int,
    order: np.ndarray,
    max_sentences: int | None = None,
    ladder: bool = False,
) -> list[np.ndarray]:
    """Cut `order` (already length-sorted) into batches of at most `max_tokens` padded tokens.

    With `ladder`, widths count as padded to the shape ladder and every batch holds a number
    of sentences on the ladder (the rest start the next batch): the batches then have few
    distinct shapes, which keeps memory flat where kernels are cached per shape (oneDNN in
    bf16, cuDNN) and lets compiled graphs be reused."""
    width = ladder_up if ladder else int
    if len(order):
        widths = _ladder_up_array if ladder else np.asarray
        longest = int((widths(src_lengths) + widths(tgt_lengths)).max())
        if longest > max_tokens:
            raise UserError(
                f"max_tokens={max_tokens} is smaller than the longest pair ({longest} source+target "
                "tokens, padded); raise max_tokens or re-run `nmt-tie prepare` with a smaller --max-len"
            )
    limit = max_sentences or len(order)
    batches = []
    start, total = 0, len(order)
    while start < total:
        end, max_src, max_tgt = start, 0, 0
        while end < total and end - start < limit:
            src = max(max_src, int(src_lengths[order[end]]))
            tgt = max(max_tgt, int(tgt_lengths[order[end]]))
            if (end - start + 1) * (width(src) + width(tgt)) > max_tokens:
                break
            max_src, max_tgt, end = src, tgt, end + 1
        size = ladder_down(end - start) if ladder else end - start
        batches.append(order[start : start + size])
        start += size
    return batches


class TokenBucketSampler:
    """Yields batches of sentence indices, epoch after epoch, from a saveable position.

    With several data-parallel workers (`num_shards`), every worker computes the same global
    batch list and, at each step, worker k takes batch `consumed + k` of it; the epoch ends
    when fewer than `num_shards` batches are left (those are dropped), so all workers make the
    same number of steps. The position is global (batches of the epoch consumed by all
    workers together), so a run saved with N workers resumes with any other number: the rest
    of the epoch is re-sharded and no sentence is seen twice.

    A run resumed with another per-worker batch (`max_tokens`, `max_sentences`: a global
    batch spread over another number of workers, or a batch lowered after running out of
    memory) cuts the sentences its epoch has not yet seen into batches of the new size: the
    saved state lists the earlier segments of the epoch (their batch sizes and how many of
    their batches were consumed), from which every worker rebuilds the same remainder.
    """

    def __init__(
        self,
        src_lengths: np.ndarray,
        tgt_lengths: np.ndarray,
        max_tokens: int,
        seed: int = 1,
        shuffle: bool = True,
        num_shards: int = 1,
        shard: int = 0,
        max_sentences: int | None = None,
        ladder: bool = False,
    ):
        self.ladder = ladder
        self.src_lengths = np.asarray(src_lengths)
        self.tgt_lengths = np.asarray(tgt_lengths)
        self.max_tokens = max_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.num_shards = num_shards
        self.shard = shard
        self.max_sentences = max_sentences
        self.epoch = 1
        self.consumed = 0  # batches of this epoch's global list taken by all workers together
        # Earlier segments of this epoch, cut with other batch sizes: [max_tokens,
        # max_sentences, batches consumed] each (empty unless the batch size changed mid-epoch).
        self.earlier: list[list[int]] = []
        self._cache: tuple[tuple, list[np.ndarray]] | None = None

    @property
    def batch_size(self) -> list[int]:
        return [self.max_tokens, self.max_sentences or 0]

    def _cut(self, epoch: int, segment: int, pool: np.ndarray, max_tokens: int, max_sentences: int):
        """The batches of the sentences `pool` in one segment of an epoch, in the order taken."""
        seeds = [self.seed, epoch] if segment == 0 else [self.seed, epoch, segment]
        rng = np.random.default_rng(seeds)
        order = pool[rng.permutation(len(pool))] if self.shuffle else pool
        # Stable sort by target then source length: the permutation breaks ties randomly.
        order = order[np.lexsort((self.src_lengths[order], self.tgt_lengths[order]))]
        batches = token_buckets(
            self.src_lengths, self.tgt_lengths, max_tokens, order, max_sentences or None, self.ladder
        )
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """Every worker's batches of one epoch (of its current segment), in the order taken."""
        earlier = self.earlier if epoch == self.epoch else []
        key = (epoch, tuple(map(tuple, earlier)))
        if self._cache and self._cache[0] == key:
            return self._cache[1]
        pool = np.arange(len(self.src_lengths))
        for segment, (max_tokens, max_sentences, consumed) in enumerate(earlier):
            taken = self._cut(epoch, segment, pool, max_tokens, max_sentences)[:consumed]
            if taken:
                pool = np.setdiff1d(pool, np.concatenate(taken), assume_unique=True)
        batches = self._cut(epoch, len(earlier), pool, *self.batch_size) if len(pool) else []
        if len(batches) < self.num_shards and not earlier:
            raise UserError(
                f"{len(batches)} batches cannot be shared by {self.num_shards} workers; "
                "lower max_tokens or use fewer workers"
            )
        self._cache = (key, batches)
        return batches

    def __len__(self) -> int:
        """Number of this worker's batches in the current epoch (every worker has as many)."""
        return len(self.global_batches(self.epoch)) // self.num_shards

    def next_batch(self) -> np.ndarray:
        """The next batch; the state then points past it (into the next epoch if it was last)."""
        batches = self.global_batches(self.epoch)
        batch = batches[self.consumed + self.shard]
        self.consumed += self.num_shards
        if self.consumed + self.num_shards > len(batches):
            self._next_epoch()
        return batch

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.consumed = 0
        self.earlier = []

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yield the rest of the current epoch."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,  # global: batches taken by all workers together
            "num_shards": self.num_shards,
            "seed": self.seed,
            "batch_size": self.batch_size,  # [max_tokens, max_sentences] of this segment's batches
            "earlier": [list(segment) for segment in self.earlier],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by any number of workers, with any batch size."""
        if state["seed"] != self.seed:
            raise UserError(
                f"the checkpoint's data order uses seed {state['seed']}, this run seed {self.seed}"
            )
        self.epoch = int(state["epoch"])
        if "consumed" in state:
            consumed = int(state["consumed"])
        else:  # checkpoints before nmt-tie 0.2 saved a position within one worker's shard
            consumed = int(state["position"]) * int(state.get("num_shards", self.num_shards))
        self.earlier = [list(segment) for segment in state.get("earlier", [])]
        saved_size = list(state.get("batch_size", self.batch_size))  # older checkpoints: the same
        if saved_size == self.batch_size:
            self.consumed = consumed
        else:  # the rest of the epoch is cut into batches of this run's size
            self.earlier.append([*saved_size, consumed])
            self.consumed = 0
        if self.consumed + self.num_shards > len(self.global_batches(self.epoch)):
            # Fewer batches are left in the epoch than this run has workers.
            self._next_epoch()
