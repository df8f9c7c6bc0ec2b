"""The batch said once, globally (issue 39): `global_batch_tokens` / `global_batch_sentences`
hold on any number of workers, also across a resume on another number; `max_tokens: auto`
picks the largest batch whose estimated memory fits a budget."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import prepare_small
from test_train import read_log, write_config

from nmt_tie.config import ModelConfig, TrainConfig
from nmt_tie.data.batching import ParallelData, TokenBucketSampler, ladder_up
from nmt_tie.data.prepare import PreparedData
from nmt_tie.errors import UserError
from nmt_tie.training.batch_plan import plan_batches
from nmt_tie.training.memory import GIB, peak_for_sentences

MODEL = ModelConfig(
    arch="transformer", emb_dim=32, ffn_dim=64, enc_layers=1, dec_layers=1, heads=2,
    src_vocab_size=500, tgt_vocab_size=500, shared_vocab=True,
)  # fmt: skip
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small_corpus) -> Path:
    return prepare_small(small_corpus, tmp_path_factory.mktemp("global") / "prep")


@pytest.fixture(scope="module")
def train_data(data_dir) -> ParallelData:
    return ParallelData(PreparedData(data_dir), "train")


def samplers_for(plan, data: ParallelData, seed: int = 3) -> list[TokenBucketSampler]:
    return [
        TokenBucketSampler(
            data.src_lengths,
            data.tgt_lengths,
            plan.max_tokens,
            seed=seed,
            num_shards=plan.workers,
            shard=k,
            max_sentences=plan.max_sentences or None,
            ladder=True,
        )  # fmt: skip
        for k in range(plan.workers)
    ]


def draw_updates(samplers, plan, data: ParallelData, updates: int) -> tuple[list[int], list[int], list]:
    """Target tokens and sentences of each update, and every sentence index drawn in epoch 1."""
    tokens, sentences, seen = [], [], []
    for _ in range(updates):
        batches = []
        for _ in range(plan.update_freq):
            for sampler in samplers:
                epoch = sampler.epoch
                batches.append(sampler.next_batch())
                seen.extend(batches[-1].tolist() if epoch == 1 else [])
        tokens.append(sum(int(data.tgt_lengths[b].sum()) for b in batches))
        sentences.append(sum(len(b) for b in batches))
    return tokens, sentences, seen


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_global_batch_tokens_is_met_on_any_number_of_workers(train_data, workers):
    cfg = TrainConfig(max_tokens=1200, global_batch_tokens=4000)
    plan = plan_batches(MODEL, cfg, train_data.src_lengths, train_data.tgt_lengths, workers, CPU)
    assert plan.workers * plan.update_freq * plan.max_tokens >= 4000  # enough room at all
    assert plan.max_tokens <= 1200  # never above the per-worker limit
    tokens, _, _ = draw_updates(samplers_for(plan, train_data), plan, train_data, 25)
    assert abs(np.mean(tokens) / 4000 - 1) < 0.10, (plan, np.mean(tokens))
    assert abs(plan.tokens_per_update / 4000 - 1) < 0.05  # what the log says


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_global_batch_sentences_is_met_on_any_number_of_workers(train_data, workers):
    cfg = TrainConfig(max_tokens=16000, max_sentences=40, global_batch_sentences=80)
    plan = plan_batches(MODEL, cfg, train_data.src_lengths, train_data.tgt_lengths, workers, CPU)
    assert plan.max_sentences <= 40
    _, sentences, _ = draw_updates(samplers_for(plan, train_data), plan, train_data, 20)
    assert abs(np.mean(sentences) / 80 - 1) < 0.15, (plan, sentences)


def test_a_global_batch_is_one_setting(train_data):
    lengths = (train_data.src_lengths, train_data.tgt_lengths)
    with pytest.raises(UserError, match="update_freq is derived from the global batch"):
        plan_batches(MODEL, TrainConfig(global_batch_tokens=4000, update_freq=2), *lengths, 1, CPU)
    with pytest.raises(UserError, match="not both"):
        plan_batches(
            MODEL, TrainConfig(global_batch_tokens=4000, global_batch_sentences=80), *lengths, 1, CPU
        )
    with pytest.raises(UserError, match="max_tokens: 'lots' is not a positive number or auto"):
        plan_batches(MODEL, TrainConfig(max_tokens="lots"), *lengths, 1, CPU)
    # without a global batch, nothing changes
    plan = plan_batches(MODEL, TrainConfig(max_tokens=1200, update_freq=3), *lengths, 2, CPU)
    assert (plan.max_tokens, plan.update_freq) == (1200, 3)


@pytest.mark.parametrize("before, after", [(2, 4), (4, 1), (1, 3)])
def test_a_run_resumed_on_another_number_of_workers_keeps_its_global_batch_and_sees_no_sentence_twice(
    train_data, before, after
):
    cfg = TrainConfig(max_tokens=1200, global_batch_tokens=5000)
    lengths = (train_data.src_lengths, train_data.tgt_lengths)
    first = plan_batches(MODEL, cfg, *lengths, before, CPU)
    second = plan_batches(MODEL, cfg, *lengths, after, CPU)
    assert first.max_tokens != second.max_tokens  # (5000 tokens: 500 a batch on 1-2 workers, 417 on 3-4)
    samplers = samplers_for(first, train_data)
    tokens_before, _, seen = draw_updates(samplers, first, train_data, 4)
    state = samplers[0].state_dict()
    assert all(s.state_dict() == state for s in samplers)
    resumed = samplers_for(second, train_data)
    for sampler in resumed:
        sampler.load_state_dict(state)
    assert resumed[0].earlier == [[first.max_tokens, 0, 4 * before * first.update_freq]]
    tokens_after = []
    while resumed[0].epoch == 1:
        tokens, _, drawn = draw_updates(resumed, second, train_data, 1)
        tokens_after += tokens
        seen += drawn
    assert len(seen) == len(set(seen)), "a sentence was trained on twice in one epoch"
    # only the last few batches (fewer than a worker each) go unused
    assert len(seen) > 0.9 * len(train_data)
    assert abs(np.mean(tokens_after[:-1]) / np.mean(tokens_before) - 1) < 0.15
    # the next epoch starts whole, in the new batch size
    assert resumed[0].earlier == [] and resumed[0].consumed % second.workers == 0
    # a second resume, with yet another size, replays the segments the same way on every worker
    state = resumed[0].state_dict()
    again = samplers_for(replace(first, workers=2), train_data)
    for sampler in again:
        sampler.load_state_dict(state)
    assert again[0].epoch == 2


def test_a_sampler_resumed_with_another_batch_size_mid_epoch_replays_the_same_remainder(train_data):
    base = TokenBucketSampler(train_data.src_lengths, train_data.tgt_lengths, 1200, seed=2, ladder=True)
    for _ in range(10):
        base.next_batch()
    state = base.state_dict()
    one = TokenBucketSampler(train_data.src_lengths, train_data.tgt_lengths, 700, seed=2, ladder=True)
    two = TokenBucketSampler(train_data.src_lengths, train_data.tgt_lengths, 700, seed=2, ladder=True)
    one.load_state_dict(state)
    for _ in range(3):
        one.next_batch()
    two.load_state_dict(one.state_dict())  # resumed again at the same size: the same position
    assert np.array_equal(one.next_batch(), two.next_batch())


# --- max_tokens: auto ----------------------------------------------------------------------------


def test_max_tokens_auto_takes_the_largest_ladder_batch_that_fits_the_budget(train_data):
    budget_gib = 0.05
    cfg = TrainConfig(max_tokens="auto", memory_budget=budget_gib)
    lengths = (train_data.src_lengths, train_data.tgt_lengths)
    plan = plan_batches(MODEL, cfg, *lengths, 1, CPU)
    longest = (ladder_up(int(lengths[0].max())), ladder_up(int(lengths[1].max())))
    sentences = plan.max_tokens // sum(longest)
    assert plan.max_tokens == sentences * sum(longest)

    def peak(n: int) -> int:
        return peak_for_sentences(MODEL, cfg, n, *longest, workers=1)

    assert peak(sentences) <= budget_gib * GIB
    next_on_ladder = ladder_up(sentences + 1)
    assert peak(next_on_ladder) > budget_gib * GIB
    assert (
        f"max_tokens auto: {plan.max_tokens:,} ({sentences} pairs of {longest[0]} + {longest[1]}"
        in plan.notes[0]
    )
    assert "memory_budget 0.05 GiB" in plan.notes[0]
    # a larger budget, a larger batch; two workers need DDP's gradient buckets as well
    assert plan_batches(MODEL, replace(cfg, memory_budget=0.1), *lengths, 1, CPU).max_tokens > plan.max_tokens
    assert plan_batches(MODEL, cfg, *lengths, 2, CPU).max_tokens <= plan.max_tokens


def test_max_tokens_auto_refuses_a_device_too_small_for_one_pair(train_data):
    cfg = TrainConfig(max_tokens="auto", memory_budget=0.001)
    with pytest.raises(UserError, match=r"max_tokens: auto: one pair of the longest length in the data \("):
        plan_batches(MODEL, cfg, train_data.src_lengths, train_data.tgt_lengths, 1, CPU)


def test_a_negative_memory_budget_is_refused_and_a_global_batch_below_one_batch_is_said(train_data):
    lengths = (train_data.src_lengths, train_data.tgt_lengths)
    with pytest.raises(UserError, match="memory_budget: -1 GiB; give a positive size, or 0 to measure"):
        plan_batches(MODEL, TrainConfig(max_tokens="auto", memory_budget=-1.0), *lengths, 1, CPU)
    plan = plan_batches(MODEL, TrainConfig(global_batch_tokens=5), *lengths, 2, CPU)
    (note,) = [n for n in plan.notes if "is below the smallest batch" in n]
    assert plan.update_freq == 1 and plan.tokens_per_update > 5 * 1.2
    assert f"an update has about {plan.tokens_per_update:,.0f} target tokens" in note
    plan = plan_batches(MODEL, TrainConfig(global_batch_tokens=2000), *lengths, 2, CPU)
    assert not [n for n in plan.notes if "is below the smallest batch" in n]


# --- real training, gloo workers ---------------------------------------------------------------------


def torchrun_train(config: Path, workers: int, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(workers),
    ]
    command += ["-m", "nmt_tie", "train", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_one_two_and_four_workers_train_with_the_configured_global_batch(tmp_path, data_dir):
    settings = {"max_tokens": 1200, "global_batch_tokens": 5000, "max_updates": 12, "log_every": 12}
    means = {}
    for workers in (1, 2, 4):
        run = tmp_path / f"w{workers}"
        config = write_config(tmp_path / f"{workers}.yaml", data_dir, run, valid_every=1000, **settings)
        result = torchrun_train(config, workers)
        assert result.returncode == 0, result.stdout + result.stderr
        setup = next(r for r in read_log(run) if r["type"] == "setup")
        assert setup["workers"] == workers and setup["max_tokens"] <= 1200
        assert f"global_batch_tokens 5,000 over {workers} worker" in result.stderr
        assert result.stderr.count("batch per update:") == 1  # rank 0 says it
        (train,) = [r for r in read_log(run) if r["type"] == "train"]
        means[workers] = train["tokens_per_update"]  # the mean of 12 updates
    assert max(means.values()) / min(means.values()) < 1.10, means
    assert all(abs(m / 5000 - 1) < 0.15 for m in means.values()), means
    # resumed on 3 workers: the same global batch, another accumulation
    config = tmp_path / "2.yaml"
    result = torchrun_train(config, 3, "max_updates=24")
    assert result.returncode == 0, result.stdout + result.stderr
    setups = [r for r in read_log(tmp_path / "w2") if r["type"] == "setup"]
    assert [s["workers"] for s in setups] == [2, 3]
    assert setups[0]["update_freq"] != setups[1]["update_freq"]
    last = [r for r in read_log(tmp_path / "w2") if r["type"] == "train"][-1]
    assert last["update"] == 24 and abs(last["tokens_per_update"] / 5000 - 1) < 0.15
