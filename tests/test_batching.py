"""Token-bucket batching: the token bound, seeded shuffling, exact resume, sharding."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import prepare_small

from nmt_tie.data.batching import ParallelData, TokenBucketSampler, ladder_down, ladder_up
from nmt_tie.data.prepare import PreparedData
from nmt_tie.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt_tie.errors import UserError


@pytest.fixture(scope="module")
def train_data(tmp_path_factory, small_corpus) -> ParallelData:
    out = prepare_small(small_corpus, tmp_path_factory.mktemp("batching") / "prep", vocab_size=1000)
    return ParallelData(PreparedData(out), "train")


def sampler(data: ParallelData, **kwargs) -> TokenBucketSampler:
    return TokenBucketSampler(data.src_lengths, data.tgt_lengths, **{"max_tokens": 1000, **kwargs})


def test_batches_never_exceed_max_tokens_and_cover_every_sentence_once(train_data):
    for max_tokens in (200, 1000, 4096):
        s = sampler(train_data, max_tokens=max_tokens)
        batches = list(s)
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(len(train_data)))
        for indices in batches:
            batch = train_data.collate(indices)
            padded = batch.src.numel() + batch.tgt_in.numel()
            assert padded <= max_tokens
        # Length bucketing keeps padding low.
        real = train_data.src_lengths.sum() + train_data.tgt_lengths.sum()
        padded_total = sum(
            len(b) * (train_data.src_lengths[b].max() + train_data.tgt_lengths[b].max()) for b in batches
        )
        assert real / padded_total > 0.8


def test_collate_adds_bos_and_eos_and_pads(train_data):
    batch = train_data.collate(np.array([0, 1, 2]))
    for row, i in enumerate([0, 1, 2]):
        src, tgt = train_data.source(i), train_data.target(i)
        assert batch.src[row, : len(src)].tolist() == src.tolist()
        assert batch.src[row, len(src)] == EOS_ID
        assert (batch.src[row, len(src) + 1 :] == PAD_ID).all()
        assert batch.tgt_in[row, 0] == BOS_ID
        assert batch.tgt_in[row, 1 : len(tgt) + 1].tolist() == tgt.tolist()
        assert batch.tgt_out[row, len(tgt)] == EOS_ID
    assert batch.target_tokens == sum(len(train_data.target(i)) + 1 for i in range(3))


def test_shuffling_is_deterministic_by_seed_and_differs_between_epochs(train_data):
    a, b, c = sampler(train_data, seed=1), sampler(train_data, seed=1), sampler(train_data, seed=2)
    epoch1 = [x.tolist() for x in a]
    assert epoch1 == [x.tolist() for x in b]
    assert epoch1 != [x.tolist() for x in c]
    epoch2 = [x.tolist() for x in a]
    assert epoch1 != epoch2 and a.epoch == 3


def test_restoring_the_iterator_mid_epoch_resumes_at_the_next_batch(train_data):
    reference = sampler(train_data, seed=7)
    full = [x.tolist() for x in reference] + [x.tolist() for x in reference]
    interrupted = sampler(train_data, seed=7)
    consumed = []
    for i, batch in enumerate(interrupted):
        consumed.append(batch.tolist())
        if i == 9:
            break
    state = interrupted.state_dict()
    resumed = sampler(train_data, seed=7)
    resumed.load_state_dict(state)
    rest = [x.tolist() for x in resumed] + [x.tolist() for x in resumed]
    assert consumed + rest == full
    with pytest.raises(UserError, match="seed"):
        sampler(train_data, seed=8).load_state_dict(state)


def test_shards_split_an_epoch_evenly_and_disjointly(train_data):
    whole = sampler(train_data, seed=3)
    shards = [sampler(train_data, seed=3, num_shards=2, shard=r) for r in (0, 1)]
    batches = [list(s) for s in shards]
    assert len(batches[0]) == len(batches[1])
    assert len(batches[0]) * 2 >= len(whole) - 1
    union = [tuple(x) for x in batches[0] + batches[1]]
    assert len(set(union)) == len(union)


def test_a_sentence_longer_than_max_tokens_is_a_clear_error(train_data):
    with pytest.raises(UserError, match="max_tokens=20 is smaller than the longest pair"):
        list(sampler(train_data, max_tokens=20))


def test_the_shape_ladder_keeps_every_token_bounds_shapes_and_costs_little_padding(train_data):
    plain = list(sampler(train_data, max_tokens=1000, seed=5))
    laddered = list(sampler(train_data, max_tokens=1000, seed=5, ladder=True))
    assert sorted(np.concatenate(laddered).tolist()) == list(range(len(train_data)))
    shapes = {False: set(), True: set()}
    padded = {False: 0, True: 0}
    for ladder, batches in ((False, plain), (True, laddered)):
        for indices in batches:
            batch = train_data.collate(indices, ladder)
            assert batch.src.numel() + batch.tgt_in.numel() <= 1000
            shapes[ladder].add((*batch.src.shape, batch.tgt_in.size(1)))
            padded[ladder] += batch.src.numel() + batch.tgt_in.numel()
            if ladder:
                assert len(indices) == ladder_down(len(indices))
                assert batch.src.size(1) == ladder_up(batch.src.size(1))
                for row, i in enumerate(indices):  # the sentence, whole and in place, then padding
                    src, tgt = train_data.source(i), train_data.target(i)
                    assert batch.src[row, : len(src)].tolist() == src.tolist()
                    assert (
                        batch.src[row, len(src)] == EOS_ID
                        and (batch.src[row, len(src) + 1 :] == PAD_ID).all()
                    )
                    assert batch.tgt_out[row, : len(tgt) + 1].tolist() == [*tgt.tolist(), EOS_ID]
                # the output layer's rows: every real target once, in order, then ignored rows
                real = batch.tgt_out.reshape(-1)[batch.tgt_out.reshape(-1) != PAD_ID]
                assert batch.targets.numel() == ladder_up(batch.target_tokens)
                assert batch.targets[: batch.target_tokens].tolist() == real.tolist()
                assert (batch.targets[batch.target_tokens :] == PAD_ID).all()
                flat = batch.tgt_out.reshape(-1)[batch.target_positions[: batch.target_tokens]]
                assert flat.tolist() == real.tolist()
    assert len(shapes[True]) < 0.7 * len(shapes[False]), (len(shapes[True]), len(shapes[False]))
    assert padded[True] / padded[False] < 1.06  # extra padded tokens, all batches together


def test_ladder_values():
    assert [ladder_up(n) for n in (1, 16, 17, 18, 31, 33, 65, 100)] == [1, 16, 18, 18, 32, 36, 72, 104]
    assert [ladder_down(n) for n in (16, 17, 31, 33, 71, 100)] == [16, 16, 30, 32, 64, 96]
