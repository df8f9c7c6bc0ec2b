"""Greedy and batched beam search over one model or an ensemble.

Beam search works on all sentences and all beams at once: the encoder runs once and its
output stays one per sentence (the `beam` hypotheses of a sentence are adjacent rows, and the
decoders' attention lets them share it), the decoder advances one token per step from its
cache (no recomputation of the prefix), and
finished hypotheses are kept per sentence in fixed-size tensors, merged by score with
`topk`; no Python loop over sentences runs inside a step. A sentence is done once `beam`
hypotheses have ended (as in fairseq); finished sentences leave the batch, and the search
stops when none is left. Sentences leave in steps that keep the number of rows on the shape
ladder, so that decoding sees a bounded set of tensor shapes.

Scores are sums of log-probabilities; beam search ranks finished hypotheses by a length-
normalized score, the length counting EOS:
- `average` (the default, as fairseq): score / length ** lenpen; lenpen 1.0 ranks by the mean
  log-probability per token (on Multi30k test2016, a three-way tied Transformer after 1,000
  updates: length ratio 0.93 instead of GNMT 1.0's 0.91, +0.5 BLEU; after 2,000 updates,
  0.97-1.01 for every model tried);
- `gnmt` (Wu et al. 2016): score / ((5 + length) / 6) ** lenpen. Its correction grows more
  slowly than the length, so it prefers short outputs unless lenpen is well above 1.
"""

from __future__ import annotations

import math

import torch

from nmt_tie.data.batching import ladder_up
from nmt_tie.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt_tie.hypotheses import Hypothesis
from nmt_tie.model.seq2seq import EncoderDecoder


class Ensemble:
    """Several models decoding in step; their log-probabilities are averaged.

    One model is the common case and costs nothing extra.
    """

    def __init__(self, models: list[EncoderDecoder]):
        self.models = models
        self._scores: list[torch.Tensor | None] = [None] * len(models)

    def encode(self, src: torch.Tensor) -> list[dict]:
        return [model.encode(src) for model in self.models]

    def step(self, encs: list[dict], prev: torch.Tensor, caches: list | None):
        """Log-probabilities (rows, vocabulary) of the next token, fp32, and the new caches.

        The scores are written into a buffer kept from step to step and batch to batch (rows
        only shrink within a search; the next step overwrites them): a fresh tensor every
        step is fresh memory, whose page faults cost fp32 beam search on a CPU about 4%."""
        caches = caches or [None] * len(self.models)
        rows = prev.size(0)
        log_probs, new_caches = [], []
        for i, (model, enc, cache) in enumerate(zip(self.models, encs, caches, strict=True)):
            kept = self._scores[i]
            out = kept[:rows] if kept is not None and kept.size(0) >= rows else None
            logits, cache = model.decode_step(enc, prev, cache, out=out)
            logits = logits.float()  # no copy when written into `out`
            if out is None and model.fills_out:
                self._scores[i] = logits
            log_probs.append(torch.log_softmax(logits, dim=-1, out=logits))
            new_caches.append(cache)
        mean = log_probs[0] if len(log_probs) == 1 else torch.stack(log_probs).mean(0)
        mean[:, PAD_ID] = -math.inf
        mean[:, BOS_ID] = -math.inf
        return mean, new_caches

    @staticmethod
    def reorder(states: list, index: torch.Tensor) -> list:
        return [EncoderDecoder.reorder(state, index) for state in states]


def max_lengths(src: torch.Tensor, a: float, b: int) -> torch.Tensor:
    """Per-sentence output length limit a * source length + b (at least 1)."""
    src_len = (src != PAD_ID).sum(1)
    return (src_len.float() * a + b).long().clamp(min=1)


@torch.no_grad()
def greedy_search(ensemble: Ensemble, src: torch.Tensor, max_len: torch.Tensor) -> list[Hypothesis]:
    """The most probable next token, step by step. Finished sentences leave the batch in
    ladder steps, as in `beam_search` (on test2016, keeping them cost twice the rows)."""
    device = src.device
    batch = src.size(0)
    width = int(max_len.max()) + 1
    tokens = torch.full((batch, width), PAD_ID, dtype=torch.long, device=device)
    scores = torch.zeros(batch, device=device)
    active = torch.arange(batch, device=device)  # the sentences still in the batch
    limits = max_len
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    prev = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
    encs, caches = ensemble.encode(src), None
    for t in range(width):
        log_probs, caches = ensemble.step(encs, prev, caches)
        _only_eos_at_limit(log_probs, limits <= t)
        best = log_probs.argmax(-1).masked_fill(finished, PAD_ID)
        gained = log_probs.gather(1, best.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0)
        scores[active] += gained
        tokens[active, t] = best
        finished |= best == EOS_ID
        alive = int((~finished).sum())
        if alive == 0:
            break
        prev = best
        still = _sentences_staying(finished, alive)
        if still is not None:
            active, limits, finished, prev = active[still], limits[still], finished[still], prev[still]
            encs = Ensemble.reorder(encs, still)
            caches = Ensemble.reorder(caches, still)
    rows = zip(tokens.tolist(), scores.tolist(), strict=True)
    return [Hypothesis(_strip(row), score) for row, score in rows]


def _strip(tokens: list[int]) -> list[int]:
    out = []
    for token in tokens:
        if token in (EOS_ID, PAD_ID):
            break
        out.append(token)
    return out


def _only_eos_at_limit(log_probs: torch.Tensor, at_limit: torch.Tensor) -> None:
    """Rows that reached their length limit may only end: every other token gets -inf."""
    if at_limit.any():
        vocab_ids = torch.arange(log_probs.size(1), device=log_probs.device)
        log_probs[at_limit] = log_probs[at_limit].masked_fill(vocab_ids != EOS_ID, -math.inf)


def _sentences_staying(done: torch.Tensor, alive: int) -> torch.Tensor | None:
    """Which sentences stay when finished ones leave the batch, or None when all stay.

    Only as many leave as keep the number of sentences on the shape ladder (done ones fill
    the rest): the decoder then sees few distinct row counts (oneDNN keeps kernels per
    shape). The unfinished sentences come first, then done ones, each group in batch order.
    """
    kept = ladder_up(alive)
    if kept >= done.numel():
        return None
    return done.to(torch.int8).argsort(stable=True)[:kept].sort().values


CANDIDATE_CHUNK = 64


def best_candidates(
    log_probs: torch.Tensor, scores: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best continuations of each sentence: the largest scores[s, b] + log_probs[s * beam
    + b, token] over its beam x vocabulary candidates, and their indices b * vocab + token.

    A top-k over every candidate reads each of them element by element (5% of fp32 beam
    search's time here, more in bf16); so the vocabulary is cut into chunks of 64 and only
    the k chunks with the largest maxima are searched: each of the k best candidates lies in
    one of them (a chunk whose maximum is below the k-th best holds nothing above it). The
    scores are the sums a full top-k would rank, added in the same order (fp32)."""
    n, beam = scores.shape
    vocab = log_probs.size(1)
    chunks = vocab // CANDIDATE_CHUNK
    if beam * chunks < 4 * k:  # a small vocabulary: the plain top-k is as cheap
        # log_probs is not needed again: the candidates' scores are summed into it in place
        candidates = log_probs.view(n, beam, vocab).add_(scores.unsqueeze(2))
        return candidates.view(n, beam * vocab).topk(k, dim=1)
    main = chunks * CANDIDATE_CHUNK
    by_chunk = log_probs[:, :main].view(n * beam, chunks, CANDIDATE_CHUNK)
    chunk_best = by_chunk.amax(dim=2).view(n, beam, chunks).add_(scores.unsqueeze(2))
    picked = chunk_best.view(n, beam * chunks).topk(k, dim=1).indices  # (n, k) beam * chunks + chunk
    beam_of, chunk_of = picked // chunks, picked % chunks
    rows = torch.arange(n, device=scores.device).unsqueeze(1) * beam + beam_of
    values = by_chunk[rows, chunk_of] + scores.gather(1, beam_of).unsqueeze(2)  # (n, k, chunk)
    offsets = torch.arange(CANDIDATE_CHUNK, device=scores.device)
    index = (beam_of * vocab + chunk_of * CANDIDATE_CHUNK).unsqueeze(2) + offsets
    values, index = values.view(n, -1), index.view(n, -1)
    if main < vocab:  # the last, shorter chunk is always a candidate
        rest = log_probs[:, main:].view(n, beam, vocab - main) + scores.unsqueeze(2)
        beam_starts = torch.arange(beam, device=scores.device).unsqueeze(1) * vocab
        rest_index = beam_starts + torch.arange(main, vocab, device=scores.device)
        values = torch.cat([values, rest.view(n, -1)], dim=1)
        index = torch.cat([index, rest_index.view(1, -1).expand(n, -1)], dim=1)
    top_scores, where = values.topk(k, dim=1)
    return top_scores, index.gather(1, where)


LENGTH_NORMS = ("average", "gnmt")


def length_penalty(length: torch.Tensor | float, alpha: float, norm: str = "average"):
    """What a finished hypothesis's summed log-probability is divided by."""
    if norm == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if norm == "average":
        return float(length) ** alpha
    raise ValueError(f"length normalization {norm!r} is not one of {', '.join(LENGTH_NORMS)}")


@torch.no_grad()
def beam_search(
    ensemble: Ensemble,
    src: torch.Tensor,
    max_len: torch.Tensor,
    beam: int = 5,
    lenpen: float = 1.0,
    nbest: int = 1,
    length_norm: str = "average",
) -> list[list[Hypothesis]]:
    """The `nbest` best hypotheses per sentence, best first."""
    device = src.device
    batch = src.size(0)
    nbest = min(nbest, beam)
    width = int(max_len.max()) + 1  # room for the longest hypothesis and its EOS
    # Finished hypotheses of every sentence, best first.
    fin_scores = torch.full((batch, beam), -math.inf, device=device)
    fin_tokens = torch.full((batch, beam, width), PAD_ID, dtype=torch.long, device=device)
    fin_count = torch.zeros(batch, dtype=torch.long, device=device)

    # Every sentence starts with `beam` copies; only the first is alive, so that the first
    # step does not pick the same token `beam` times. That step decodes one row per sentence
    # (its copies would compute the same scores) and hands them to every copy.
    active = torch.arange(batch, device=device)
    # one encoder output per sentence: decoders let the beams of a sentence share it
    encs = ensemble.encode(src)
    limits = max_len.index_select(0, active)
    scores = torch.full((batch, beam), -math.inf, device=device)
    scores[:, 0] = 0.0
    tokens = torch.zeros(batch * beam, 0, dtype=torch.long, device=device)
    prev = torch.full((batch * beam,), BOS_ID, dtype=torch.long, device=device)
    caches = None
    for t in range(width):
        n = active.numel()
        if t == 0:
            log_probs, caches = ensemble.step(encs, prev[::beam], caches)
            log_probs = log_probs.repeat_interleave(beam, dim=0)
        else:
            log_probs, caches = ensemble.step(encs, prev, caches)
        vocab = log_probs.size(1)
        _only_eos_at_limit(log_probs, (limits <= t).repeat_interleave(beam))

        top_scores, top_index = best_candidates(log_probs, scores, 2 * beam)
        from_beam = top_index // vocab
        token = top_index % vocab
        finite = top_scores > -math.inf
        is_eos = token == EOS_ID
        rank = torch.arange(2 * beam, device=device)

        # 1. Hypotheses ending here (EOS among the best `beam` candidates) join the finished.
        ending = is_eos & finite & (rank < beam)
        row_base = (torch.arange(n, device=device) * beam).unsqueeze(1)
        prefixes = tokens.index_select(0, (row_base + from_beam).view(-1)).view(n, 2 * beam, t)
        ended = torch.full((n, 2 * beam, width), PAD_ID, dtype=torch.long, device=device)
        ended[:, :, :t] = prefixes
        ended[:, :, t] = EOS_ID
        normalized = top_scores / length_penalty(t + 1, lenpen, length_norm)
        # Sentences already done (kept only to fill the batch, see 3.) take no more hypotheses.
        was_done = (fin_count.index_select(0, active) >= beam).unsqueeze(1)
        normalized = normalized.masked_fill(~ending | was_done, -math.inf)
        merged_scores = torch.cat([fin_scores.index_select(0, active), normalized], dim=1)
        merged_tokens = torch.cat([fin_tokens.index_select(0, active), ended], dim=1)
        best_scores, best = merged_scores.topk(beam, dim=1)
        fin_scores[active] = best_scores
        fin_tokens[active] = merged_tokens.gather(1, best.unsqueeze(2).expand(-1, -1, width))
        fin_count[active] += ending.sum(1)

        # 2. The best `beam` candidates that did not end continue (there are always enough:
        #    each beam has one EOS candidate at most).
        order = torch.where(~is_eos & finite, rank, rank + 2 * beam)
        keep = order.argsort(dim=1)[:, :beam]
        scores = top_scores.gather(1, keep)
        rows = (row_base + from_beam.gather(1, keep)).view(-1)
        prev = token.gather(1, keep).view(-1)
        tokens = torch.cat([tokens.index_select(0, rows), prev.unsqueeze(1)], dim=1)
        # The caches' rows for the next step (one row a sentence after the first step), gathered
        # once below: after sentences leave, and not at all after the last step.
        cache_rows = rows // beam if t == 0 else rows

        # 3. Sentences with `beam` finished hypotheses leave the batch, in ladder steps.
        done = fin_count.index_select(0, active) >= beam
        alive = int((~done).sum())
        if alive == 0:
            break
        still = _sentences_staying(done, alive)
        if still is not None:
            staying = (still.unsqueeze(1) * beam + torch.arange(beam, device=device)).view(-1)
            active, limits, scores = active[still], limits[still], scores[still]
            tokens, prev = tokens.index_select(0, staying), prev.index_select(0, staying)
            encs = Ensemble.reorder(encs, still)
            cache_rows = cache_rows.index_select(0, staying)
        caches = Ensemble.reorder(caches, cache_rows)

    results = []
    for row_scores, row_tokens in zip(fin_scores.tolist(), fin_tokens.tolist(), strict=True):
        hyps = [
            Hypothesis(_strip(toks), score)
            for score, toks in zip(row_scores[:nbest], row_tokens[:nbest], strict=True)
            if score > -math.inf
        ]
        results.append(hyps)
    return results
