"""What a CPU can prove about the GPU and multi-GPU paths (issue 13): resume loads on the CPU,
re-sharding on another worker count, rank 0's clock, checkpoints broadcast to nodes without
shared storage, one training per run directory, fp16 with loss scaling, few host-device
synchronizations, device selection, precision in effect."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_script, prepare_small
from test_train import assert_same_weights, final_weights, make_trainer, read_log, write_config

from nmt_tie import devices
from nmt_tie.checkpoint import average_checkpoints, load_checkpoint
from nmt_tie.data.batching import ParallelData, TokenBucketSampler
from nmt_tie.data.prepare import PreparedData
from nmt_tie.errors import UserError
from nmt_tie.training import distributed
from nmt_tie.training import trainer as trainer_module
from nmt_tie.training.loss import GPU_CHUNK_ELEMENTS, _row_chunks, chunk_elements, label_smoothed_nll
from nmt_tie.training.runlock import RunDirLock


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small_corpus) -> Path:
    return prepare_small(small_corpus, tmp_path_factory.mktemp("gpu") / "prep")


# --- 1. resume loads on the CPU --------------------------------------------------------------


def test_resume_loads_the_checkpoint_on_the_cpu_whatever_the_device(tmp_path, data_dir, monkeypatch):
    make_trainer(tmp_path, data_dir, "run", max_updates=5).run()
    seen = []
    real_load = trainer_module.load_checkpoint

    def spy(path, map_location="cpu"):
        seen.append(map_location)
        return real_load(path, map_location=map_location)

    monkeypatch.setattr(trainer_module, "load_checkpoint", spy)
    # The meta device stands in for a GPU: a checkpoint loaded onto it has no CPU tensors, and
    # the random-number generators accept only CPU byte tensors.
    resumed = make_trainer(tmp_path, data_dir, "run", max_updates=10, device="meta")
    resumed.close()
    assert [str(m) for m in seen] == ["cpu"]
    assert resumed.update == 5
    # Adam's step counts: CPU tensors for the default implementation (on a GPU they would make
    # every step synchronize); the fused one keeps them with the parameters, its kernel reads
    # them there. The checkpoint's optimizer settings (fused here, written on the CPU) hold.
    steps = [state["step"] for state in resumed.optimizer.state.values()]
    assert resumed.optimizer.param_groups[0]["fused"]
    assert steps and all(step.device.type == "meta" for step in steps)
    assert all(p.device.type == "meta" for p in resumed.model.parameters())


# --- 2. resume on another number of workers --------------------------------------------------


@pytest.fixture(scope="module")
def train_data(data_dir) -> ParallelData:
    return ParallelData(PreparedData(data_dir), "train")


def shard_samplers(data: ParallelData, shards: int) -> list[TokenBucketSampler]:
    return [
        TokenBucketSampler(data.src_lengths, data.tgt_lengths, 600, seed=4, num_shards=shards, shard=k)
        for k in range(shards)
    ]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 4), (4, 3), (3, 2)])
def test_a_resumed_epoch_is_resharded_and_sees_no_sentence_twice(train_data, before, after):
    samplers = shard_samplers(train_data, before)
    n_global = len(samplers[0].global_batches(1))
    seen = []
    for _ in range(5):  # 5 steps of every worker
        for s in samplers:
            seen.extend(s.next_batch().tolist())
    states = [s.state_dict() for s in samplers]
    assert all(state == states[0] for state in states)  # one global position, every rank
    resumed = shard_samplers(train_data, after)
    for s in resumed:
        s.load_state_dict(states[0])
    while resumed[0].epoch == 1:
        for s in resumed:
            seen.extend(s.next_batch().tolist())
    assert all(s.epoch == 2 and s.consumed == 0 for s in resumed)
    assert len(seen) == len(set(seen)), "a sentence was trained on twice in one epoch"
    # Only the last few batches (fewer than the workers) go unused.
    used = 5 * before + (n_global - 5 * before) // after * after
    assert n_global - used < after
    assert len(seen) == sum(len(b) for b in samplers[0].global_batches(1)[:used])


def test_a_checkpoint_of_the_old_sampler_format_still_resumes(train_data):
    (sampler,) = shard_samplers(train_data, 1)
    sampler.load_state_dict({"epoch": 1, "position": 7, "seed": 4})
    assert sampler.consumed == 7


def torchrun(script: Path, *args: str, nproc: int, env: dict | None = None, timeout: int = 240):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        [*command, str(script), *args], capture_output=True, text=True, timeout=timeout, env=run_env
    )
    return result


@pytest.fixture
def worker_script(tmp_path) -> Path:
    """`nmt-tie train` under torchrun, with per-rank test hooks: a fast clock on rank 1
    (CLOCK_RATE_RANK1) and a run directory rank 1 cannot see (SAVE_DIR_RANK1)."""
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            from nmt_tie.cli import main
            args = sys.argv[1:]
            if os.environ["RANK"] == "1":
                rate = float(os.environ.get("CLOCK_RATE_RANK1", "1"))
                real = time.perf_counter
                origin = real()
                time.perf_counter = lambda: origin + rate * (real() - origin)
                if os.environ.get("SAVE_DIR_RANK1"):
                    args.append("save_dir=" + os.environ["SAVE_DIR_RANK1"])
            main(args)
            """
        )
    )
    return script


def test_two_workers_resume_with_one_and_then_with_two_again(tmp_path, data_dir, worker_script):
    settings = {"dropout": 0.0, "max_tokens": 400, "valid_every": 4, "valid_max_sentences": 10}
    config = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", **settings)
    for nproc, updates in [(2, 4), (1, 8), (2, 12)]:
        result = torchrun(worker_script, "train", str(config), f"max_updates={updates}", nproc=nproc)
        assert result.returncode == 0, result.stdout + result.stderr
        assert load_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["update"] == updates
    setups = [r for r in read_log(tmp_path / "run") if r["type"] == "setup"]
    assert [r["workers"] for r in setups] == [2, 1, 2]


# --- 4. rank 0's clock decides ---------------------------------------------------------------


def test_max_time_with_a_skewed_clock_on_one_rank_stops_all_ranks_together(tmp_path, data_dir, worker_script):
    # Rank 1's clock runs 30 times fast: on its own it would stop 29 updates' worth early and
    # wait in a validation collective while rank 0 waits in a training one.
    config = write_config(
        tmp_path / "c.yaml", data_dir, tmp_path / "run", max_updates=0, max_time=0.1, valid_every=1000
    )
    result = torchrun(
        worker_script, "train", str(config), nproc=2, env={"CLOCK_RATE_RANK1": "30"}, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reached max_time" in result.stderr


# --- 9. nodes without shared storage ---------------------------------------------------------


def test_a_rank_that_cannot_see_the_checkpoint_resumes_from_rank_0s(tmp_path, data_dir, worker_script):
    settings = {"dropout": 0.0, "max_tokens": 400, "valid_every": 4, "valid_max_sentences": 10}
    reference = write_config(tmp_path / "ref.yaml", data_dir, tmp_path / "ref", max_updates=8, **settings)
    assert torchrun(worker_script, "train", str(reference), nproc=2).returncode == 0
    config = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", **settings)
    assert torchrun(worker_script, "train", str(config), "max_updates=4", nproc=2).returncode == 0
    # Another node: rank 1 sees an empty directory where rank 0 sees last.pt.
    elsewhere = {"SAVE_DIR_RANK1": str(tmp_path / "node2")}
    result = torchrun(worker_script, "train", str(config), "max_updates=8", nproc=2, env=elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "ref"), exact=False)


# --- 3. the loss on a GPU: few chunks, the same value ----------------------------------------


def test_gpu_sized_chunks_give_the_same_loss_and_gradient_as_cpu_chunks():
    torch.manual_seed(0)
    logits = torch.randn(300, 5000, dtype=torch.float64)
    target = torch.randint(0, 5000, (300,))
    results = []
    for chunk in (chunk_elements(torch.device("cpu")), chunk_elements(torch.device("cuda"))):
        x = logits.clone().requires_grad_()
        loss, nll = label_smoothed_nll(x, target, 0.1, chunk=chunk)
        loss.backward()
        results.append((loss.detach(), nll, x.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    reference = F.cross_entropy(logits, target, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(results[0][0], reference)
    # A WMT-sized RNN batch (4,000 target tokens, 90K vocabulary): 3 chunks on a GPU, not 700.
    assert len(list(_row_chunks(4000, 90000, GPU_CHUNK_ELEMENTS))) == 3
    assert len(list(_row_chunks(4000, 90000, chunk_elements(torch.device("cpu"))))) > 500


# --- 5. host-device synchronizations ---------------------------------------------------------


def test_an_update_synchronizes_with_the_device_once(tmp_path, data_dir, monkeypatch):
    trainer = make_trainer(tmp_path, data_dir, "run", clip_norm=1.0, update_freq=2)
    trainer.train_step()  # warm-up
    calls = []
    counting = {"on": True}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if counting["on"]:
                calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = trainer.optimizer.step

    def optimizer_step(*args, **kwargs):
        # Adam reads its step counts, which stay on the CPU (test 1): no synchronization.
        counting["on"] = False
        try:
            return step(*args, **kwargs)
        finally:
            counting["on"] = True

    monkeypatch.setattr(trainer.optimizer, "step", optimizer_step)
    for _ in range(3):
        trainer.train_step()
    monkeypatch.undo()
    trainer.close()
    assert len(calls) <= 3, calls  # one per update


# --- 6. validation in its own precision ------------------------------------------------------


def test_validation_runs_in_valid_dtype_not_in_the_training_autocast(
    tmp_path, data_dir, monkeypatch, native_cpu_bf16
):
    trainer = make_trainer(tmp_path, data_dir, "run", dtype="bf16", max_updates=2, valid_every=2)
    seen = []
    real_validate, real_step = trainer.task.validate, trainer.train_step

    def validate(model, run_dir):
        seen.append(("valid", torch.is_autocast_enabled("cpu")))
        return real_validate(model, run_dir)

    def train_step():
        with trainer.autocast:
            seen.append(("train", torch.is_autocast_enabled("cpu")))
        return real_step()

    monkeypatch.setattr(trainer.task, "validate", validate)
    monkeypatch.setattr(trainer, "train_step", train_step)
    trainer.run()
    assert seen == [("train", True), ("train", True), ("valid", False)]
    setup = next(r for r in read_log(tmp_path / "run") if r["type"] == "setup")
    assert setup["dtype"] == "bf16" and setup["valid_dtype"] == "fp32"


def test_wmt_eval_scores_in_fp32_unless_told():
    script = (Path(__file__).parents[1] / "recipes" / "wmt.sh").read_text()
    assert "--dtype bf16" not in script
    assert '--dtype "$EVAL_DTYPE"' in script and "EVAL_DTYPE=${EVAL_DTYPE:-fp32}" in script


def test_bf16_becomes_fp16_on_a_gpu_without_fast_bf16(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert devices.effective_dtype(gpu, "bf16") == "fp16"
    assert "no fast bf16" in devices.describe_precision(gpu, "bf16", "fp16", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert devices.effective_dtype(gpu, "bf16") == "bf16"


def test_bf16_becomes_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert devices.effective_dtype(cpu, "bf16") == "fp32"
    assert devices.effective_dtype(cpu, "fp16") == "fp16"  # asked for by name: slow, but asked
    line = devices.describe_precision(cpu, "bf16", "fp32", True)
    assert line == "precision: fp32 on cpu (asked for bf16: this CPU has no AVX512-BF16 or AMX)"
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert devices.effective_dtype(cpu, "bf16") == "bf16"


def test_the_cpu_bf16_probe_answers_from_the_cpu_flags():
    devices.cpu_has_fast_bf16.cache_clear()
    answer = devices.cpu_has_fast_bf16()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if platform.machine() == "x86_64" and flags:
        native = any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
        assert answer == native


# --- 7. GPU selection ------------------------------------------------------------------------


def test_gpu_choice_by_local_rank_and_with_one_visible_gpu_per_process():
    assert distributed.gpu_for_local_rank(3, 8) == 3
    assert distributed.gpu_for_local_rank(3, 1) == 0  # the scheduler made one GPU visible
    with pytest.raises(UserError, match="LOCAL_RANK 4 has no GPU of its own: 2 are visible"):
        distributed.gpu_for_local_rank(4, 2)


def test_the_gpu_is_set_before_the_process_group_is_created(monkeypatch):
    events = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(("set_device", device)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        distributed.dist, "init_process_group", lambda backend, **kw: events.append((backend, kw))
    )
    info, device = distributed.init_distributed(torch.device("cuda"))
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    assert device == torch.device("cuda", 0)
    assert events == [("set_device", device), ("nccl", {"device_id": device})]


# --- 8. TF32 ---------------------------------------------------------------------------------


def test_tf32_is_switched_on_for_cuda_fp32_and_said(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        devices.set_tf32(torch.device("cpu"), True)
        assert torch.get_float32_matmul_precision() == "highest"
        devices.set_tf32(torch.device("cuda"), True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
    line = devices.describe_precision(torch.device("cuda", 0), "fp32", "fp32", True)
    assert line == "precision: fp32 with TF32 matrix products on cuda:0"


# --- 10. time-based checkpoints, weights-only numbered checkpoints ----------------------------


def test_save_every_minutes_writes_last_pt_between_validations(tmp_path, data_dir):
    trainer = make_trainer(
        tmp_path, data_dir, "run", max_updates=6, valid_every=100, save_every_minutes=1e-6, save_every=3
    )
    trainer.run()
    saves = [r["update"] for r in read_log(tmp_path / "run") if r["type"] == "save"]
    assert saves == [1, 2, 3, 4, 5]  # update 6 is the final validation's save
    numbered = load_checkpoint(tmp_path / "run" / "checkpoint_3.pt")
    assert "optimizer" not in numbered and "task" not in numbered
    assert numbered["trainer"]["update"] == 3
    last = tmp_path / "run" / "last.pt"
    assert (
        tmp_path / "run" / "checkpoint_6.pt"
    ).stat().st_size < 0.7 * last.stat().st_size  # no Adam moments
    averaged = average_checkpoints(
        [tmp_path / "run" / "checkpoint_3.pt", tmp_path / "run" / "checkpoint_6.pt"]
    )
    assert averaged["model"].keys() == numbered["model"].keys()


# --- 11. one training per run directory ------------------------------------------------------


def test_a_second_training_on_a_busy_run_directory_is_refused(tmp_path, data_dir):
    first = make_trainer(tmp_path, data_dir, "run", max_updates=2)
    with pytest.raises(UserError, match=rf"run is in use by another training \(pid {os.getpid()} on "):
        make_trainer(tmp_path, data_dir, "run", max_updates=2)
    first.run()  # releases the directory when it ends
    make_trainer(tmp_path, data_dir, "run", max_updates=4).run()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from nmt_tie.training.runlock import RunDirLock; "
            f"lock = RunDirLock({str(tmp_path)!r}); lock.acquire(); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid} on"):
        RunDirLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert lock.held
    lock.release()


# --- fp16 with loss scaling, on the CPU ------------------------------------------------------


def test_fp16_with_loss_scaling_trains_saves_and_resumes(tmp_path, data_dir):
    trainer = make_trainer(tmp_path, data_dir, "run", dtype="fp16", max_updates=3, valid_every=3)
    batch = trainer.task.train_data.collate(np.arange(8))
    with trainer.autocast:
        logits = trainer.model(batch.src, batch.tgt_in, batch.target_positions)
        loss, _ = label_smoothed_nll(logits, batch.targets, 0.1)
    assert logits.dtype == torch.float16 and loss.dtype == torch.float32
    trainer.run()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainer.model.parameters())
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["scaler"]
    assert 0 < saved["scale"] < float("inf")
    resumed = make_trainer(tmp_path, data_dir, "run", dtype="fp16", max_updates=5, valid_every=5)
    assert resumed.scaler.state_dict() == saved
    resumed.run()
    records = [r for r in read_log(tmp_path / "run") if r["type"] == "train"]
    assert records and all(np.isfinite(r["loss"]) for r in records)


# --- prefetching keeps exact resume -------------------------------------------------------------


def test_prefetched_batches_are_not_counted_as_trained_on(tmp_path, data_dir):
    reference = make_trainer(tmp_path, data_dir, "ref", max_updates=10, valid_every=5)
    reference.run()

    def prefetching(name: str, **overrides):
        trainer = make_trainer(tmp_path, data_dir, name, valid_every=5, **overrides)
        trainer.task.prefetch = True  # as on a GPU
        trainer.task._loader = ThreadPoolExecutor(1)
        return trainer

    prefetching("run", max_updates=5).run()
    state = load_checkpoint(tmp_path / "run" / "last.pt")["task"]["sampler"]
    assert state["consumed"] == 5
    prefetching("run", max_updates=10).run()
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "ref"))


# --- the GPU smoke script and the WMT memory table ---------------------------------------------

BENCHMARKS = Path(__file__).parents[1] / "recipes" / "benchmarks"


def test_the_gpu_smoke_script_checks_itself_on_the_cpu(tmp_path, data_dir, small_corpus):
    command = [
        sys.executable, str(BENCHMARKS / "gpu_smoke.py"), "--device", "cpu", "--updates", "12",
        "--dtypes", "bf16", "--archs", "transformer", "--out", str(tmp_path / "smoke"),
        "--prepared", str(data_dir), "--translate-from", str(small_corpus / "valid.en"),
        "--max-tokens", "600", "--sentences", "5",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "killed, resumed, stayed tied and translated: OK" in result.stdout
    run = tmp_path / "smoke" / "transformer-bf16"
    setups = [r for r in read_log(run) if r["type"] == "setup"]
    assert len(setups) == 2 and setups[1]["update"] > 0  # the second process resumed


def test_wmt_memory_table_on_the_meta_device():
    command = [
        sys.executable,
        str(BENCHMARKS / "wmt_memory.py"),
        "--recipes",
        "wmt15_en_de",
        "--ties",
        "none,all",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("wmt15_en_de")]
    # The paper's 168M / 80M models (at a 90K joint vocabulary), last.pt with Adadelta's two
    # state tensors: 3 x 4 bytes per parameter.
    assert [row[1] for row in rows] == ["none", "all"]
    assert [row[4] for row in rows] == ["167,358,501", "77,358,501"]
    assert float(rows[0][5]) == pytest.approx(167_358_501 * 12 / 1e9, abs=0.01)
    assert float(rows[1][7]) < float(rows[0][7])  # the tied model needs less memory


def test_gemm_ceiling_times_the_transformers_own_linear_layers():
    """The products gemm_ceiling.py times are exactly the Transformer's linear layers (shapes and
    counts) plus its output layer, so its ceiling is that of this model's training."""
    from collections import Counter

    from nmt_tie.config import ModelConfig
    from nmt_tie.model.seq2seq import build_model

    gemm_ceiling = load_script(BENCHMARKS / "gemm_ceiling.py")
    dim, ffn, layers, vocab = 32, 96, 3, 70
    config = ModelConfig(
        arch="transformer", tie="all", emb_dim=dim, ffn_dim=ffn, enc_layers=layers, dec_layers=layers,
        heads=4, src_vocab_size=vocab, tgt_vocab_size=vocab, shared_vocab=True,
    )  # fmt: skip
    model = build_model(config)
    actual = Counter(
        (m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    actual[(dim, vocab)] += 1  # the output layer: the tied embedding matrix, not an nn.Linear
    timed = Counter()
    for fan_in, fan_out, count in gemm_ceiling.linear_layers(dim, ffn, layers, vocab).values():
        timed[(fan_in, fan_out)] += count
    assert timed == actual


def test_the_wmt_speed_script_measures_the_recipes_as_configured_on_the_cpu(tmp_path):
    """The GPU cost script (issue 39), checked on the CPU with tiny models: the recipe's global
    batch (25,000 target tokens), one worker of 8 as planned there, and its projections."""
    command = [
        sys.executable, str(BENCHMARKS / "wmt_speed.py"), "--device", "cpu", "--tiny", "--updates", "1",
        "--jobs", "wmt14_en_de_transformer:all:eager:1,wmt15_en_de:all:eager:8", "--data-dir", str(tmp_path),
        "--profile",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    transformer, rnn = rows
    planned = int(transformer["batch"].split(" target tokens")[0].split(": ")[1].replace(",", ""))
    assert "1 worker x" in transformer["batch"] and abs(planned / 25000 - 1) < 0.1  # the data's mean
    # one of 8 workers of the RNN: 10 of the 80 sentences of an update
    assert "max_sentences 10)" in rnn["batch"] and rnn["as_one_of"] == 8
    for row in rows:
        assert row["target_tokens_per_s"] > 0 and 0 < row["mfu"] < 1
        # the full budget at this speed: updates x global batch / tokens per second (x workers)
        speed = row["target_tokens_per_s"] * row["as_one_of"]
        assert row["hours"] == pytest.approx(row["budget_updates"] * row["global_tokens"] / speed / 3600)
    assert transformer["global_tokens"] == 25000 and transformer["budget_updates"] == 100_000
    assert rnn["budget_updates"] == 300_000
    assert "hours: the recipe's max_updates x its global batch" in result.stdout
    # --profile: the eager one-GPU job's operators by their own time (not the 1-of-8 job's)
    profiled = result.stdout.split("wmt14_en_de_transformer all eager, two updates profiled:")
    assert len(profiled) == 2 and "wmt15_en_de all eager, two updates" not in result.stdout
    assert "Self CPU time total" in profiled[1] and "aten::" in profiled[1]
