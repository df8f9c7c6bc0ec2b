"""`nmt-tie train`: exact resume after kills, DDP equivalence, stopping, logs, bad configs."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import prepare_small

from nmt_tie.checkpoint import load_checkpoint, load_model
from nmt_tie.cli import main
from nmt_tie.config import load_config
from nmt_tie.data.prepare import PrepareOptions, prepare
from nmt_tie.errors import UserError
from nmt_tie.training.metrics import read_log
from nmt_tie.training.trainer import Trainer, TrainingDiverged
from nmt_tie.training.translation import TranslationTask

TINY = {
    "arch": "transformer",
    "tie": "all",
    "emb_dim": 32,
    "ffn_dim": 64,
    "enc_layers": 1,
    "dec_layers": 1,
    "heads": 2,
    "dropout": 0.1,
    "max_tokens": 600,
    "lr": 0.002,
    "warmup": 10,
    "max_updates": 20,
    "valid_every": 5,
    "log_every": 5,
    "valid_max_sentences": 20,
    "threads": 1,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small_corpus) -> Path:
    out = tmp_path_factory.mktemp("train") / "prep"
    prepare_small(small_corpus, out)
    return out


def write_config(path: Path, data_dir: Path, save_dir: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump({**TINY, "data": str(data_dir), "save_dir": str(save_dir), **overrides}))
    return path


def make_trainer(tmp_path: Path, data_dir: Path, name: str, **overrides) -> Trainer:
    config = write_config(tmp_path / f"{name}.yaml", data_dir, tmp_path / name, **overrides)
    model_cfg, train_cfg = load_config(config)
    return Trainer(TranslationTask, model_cfg, train_cfg, log=lambda m: None)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]


def assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


class Killed(Exception):
    pass


def kill_at(update: int):
    def hook(trainer: Trainer) -> None:
        if trainer.update == update:
            raise Killed

    return hook


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    make_trainer(tmp, data_dir, "run").run()
    return final_weights(tmp / "run")


def test_resume_after_a_kill_between_updates_gives_the_same_weights(tmp_path, data_dir, uninterrupted):
    trainer = make_trainer(tmp_path, data_dir, "run")
    trainer.after_update_hooks = [kill_at(13)]
    with pytest.raises(Killed):
        trainer.run()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["update"] == 10
    resumed = make_trainer(tmp_path, data_dir, "run")
    assert resumed.update == 10
    resumed.run()
    assert_same_weights(final_weights(tmp_path / "run"), uninterrupted)
    # The log holds each update once, as if nothing had happened.
    records = [r for r in read_log(tmp_path / "run") if r["type"] == "train"]
    assert [r["update"] for r in records] == [5, 10, 15, 20]


def test_resume_after_a_kill_during_a_save(tmp_path, data_dir, uninterrupted, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, handle, *args, **kwargs):
        calls["n"] += ".last.pt" in handle.name
        if calls["n"] == 3:  # the save of last.pt at update 15: write half a file, then die
            real_save(obj, handle, *args, **kwargs)
            handle.seek(0)
            handle.truncate(handle.tell() // 2 or 100)
            raise Killed
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        make_trainer(tmp_path, data_dir, "run").run()
    monkeypatch.setattr(torch, "save", real_save)
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["update"] == 10
    make_trainer(tmp_path, data_dir, "run").run()
    assert_same_weights(final_weights(tmp_path / "run"), uninterrupted)


def run_cli_process(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "nmt_tie", "train", str(config), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def test_resume_after_kill_9(tmp_path, data_dir):
    settings = {"max_updates": 40, "valid_every": 4, "log_every": 2}
    reference = write_config(tmp_path / "ref.yaml", data_dir, tmp_path / "ref", **settings)
    assert run_cli_process(reference).wait(timeout=300) == 0
    config = write_config(tmp_path / "kill.yaml", data_dir, tmp_path / "kill", **settings)
    process = run_cli_process(config)
    log = tmp_path / "kill" / "log.jsonl"
    deadline = time.time() + 200
    while time.time() < deadline:
        if log.exists() and any(r.get("update", 0) >= 14 for r in read_log(tmp_path / "kill")):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    resumed = run_cli_process(config)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resuming" in output
    assert_same_weights(final_weights(tmp_path / "kill"), final_weights(tmp_path / "ref"))


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, data_dir):
    settings = {"dropout": 0.0, "max_updates": 6, "valid_every": 3, "max_tokens": 400}
    single = write_config(tmp_path / "single.yaml", data_dir, tmp_path / "single", update_freq=2, **settings)
    assert run_cli_process(single).wait(timeout=300) == 0
    ddp = write_config(tmp_path / "ddp.yaml", data_dir, tmp_path / "ddp", **settings)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "nmt_tie",
        "train",
        str(ddp),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_weights(final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single"), exact=False)
    model = load_model(load_checkpoint(tmp_path / "ddp" / "last.pt"))
    assert model.embeddings.weight("encoder_input") is model.embeddings.weight("output")
    # Only rank 0 wrote: one log, one set of checkpoints.
    assert len([r for r in read_log(tmp_path / "ddp") if r["type"] == "valid"]) == 2


def test_early_stopping_stops_after_patience(tmp_path, data_dir):
    trainer = make_trainer(
        tmp_path, data_dir, "run", lr=0.0, patience=2, max_updates=100, valid_metric="loss"
    )
    summary = trainer.run()
    assert summary["update"] == 15
    assert "patience" in summary["reason"]
    valid = [r for r in read_log(tmp_path / "run") if r["type"] == "valid"]
    assert [r["update"] for r in valid] == [5, 10, 15]


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path, data_dir, monkeypatch
):
    real_loss = TranslationTask.loss
    calls = {"n": 0}

    def exploding_loss(self, model, batch):
        calls["n"] += 1
        loss, nll, tokens = real_loss(self, model, batch)
        return (loss * math.nan, nll, tokens) if calls["n"] >= 8 else (loss, nll, tokens)

    monkeypatch.setattr(TranslationTask, "loss", exploding_loss)
    with pytest.raises(TrainingDiverged, match="diverged at update 8.*last.pt"):
        make_trainer(tmp_path, data_dir, "run").run()
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["trainer"]["update"] == 5
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


def test_numbered_checkpoints_are_kept_every_save_every_updates_between_validations(tmp_path, data_dir):
    """save_every does not wait for a validation (a short run validated once at its end, as the
    demo, still gets checkpoints to average), and keep_last prunes them."""
    make_trainer(tmp_path, data_dir, "run", max_updates=20, valid_every=1000, save_every=4, keep_last=3).run()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint_*.pt")) == [
        "checkpoint_12.pt",
        "checkpoint_16.pt",
        "checkpoint_20.pt",
    ]
    assert [r["update"] for r in read_log(run) if r["type"] == "valid"] == [20]
    assert load_checkpoint(run / "checkpoint_12.pt")["trainer"]["update"] == 12
    assert "optimizer" not in load_checkpoint(run / "checkpoint_12.pt")  # weights only


def test_run_directory_holds_config_logs_tensorboard_and_checkpoints(tmp_path, data_dir):
    make_trainer(tmp_path, data_dir, "run", save_every=5, keep_last=2).run()
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["tie"] == "all"
    assert {"last.pt", "best.pt", "checkpoint_15.pt", "checkpoint_20.pt"} <= {p.name for p in run.iterdir()}
    assert not (run / "checkpoint_5.pt").exists()  # keep_last=2
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = read_log(run)
    train = [r for r in records if r["type"] == "train"]
    valid = [r for r in records if r["type"] == "valid"]
    for key in ("update", "epoch", "loss", "nll", "ppl", "lr", "tokens_per_s", "updates_per_s", "elapsed"):
        assert key in train[0]
    for key in ("update", "loss", "ppl", "bleu", "chrf", "best"):
        assert key in valid[0]
    assert [r["update"] for r in valid] == [5, 10, 15, 20]
    assert len((run / "valid.hyp").read_text().splitlines()) == 20


@pytest.mark.parametrize("cpu_attention", ["bf16", "fp32", None])
def test_bf16_autocast_trains_on_the_cpu(tmp_path, data_dir, cpu_attention, monkeypatch, native_cpu_bf16):
    from nmt_tie.model import transformer

    monkeypatch.setattr(transformer, "_cpu_bf16_attention", "bf16")  # restored after the test
    chosen = {} if cpu_attention is None else {"cpu_attention": cpu_attention}
    trainer = make_trainer(tmp_path, data_dir, "run", dtype="bf16", max_updates=10, **chosen)
    assert trainer.precision == "bf16"
    # training's default is fp32 attention (flat memory), decoding's bf16 products
    assert transformer._cpu_bf16_attention == (cpu_attention or "fp32")
    summary = trainer.run()
    assert summary["update"] == 10
    assert all(
        math.isfinite(r["loss"]) for r in read_log(tmp_path / "run") if r["type"] in ("train", "valid")
    )


def test_bad_config_keys_and_values(tmp_path, data_dir, capsys):
    config = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run")
    with pytest.raises(UserError, match="unknown key 'max_update'; did you mean 'max_updates'"):
        load_config(config, ["max_update=5"])
    with pytest.raises(UserError, match="max_updates: 'many' is not a valid int"):
        load_config(config, ["max_updates=many"])
    (tmp_path / "bad.yaml").write_text("tye: all\n")
    with pytest.raises(UserError, match="bad.yaml: unknown key 'tye'; did you mean 'tie'"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(config), "optimiser=adam"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'optimizer'" in err


def test_a_run_directory_of_another_model_is_not_overwritten(tmp_path, data_dir):
    make_trainer(tmp_path, data_dir, "run", max_updates=5).run()
    with pytest.raises(UserError, match="another model .*emb_dim"):
        make_trainer(tmp_path, data_dir, "run", emb_dim=64)


def test_a_run_resumes_only_on_the_data_it_was_trained_on(tmp_path, data_dir, small_corpus):
    make_trainer(tmp_path, data_dir, "run", max_updates=2, valid_every=0).run()
    # the same shape (vocabulary of 500 pieces) from other text: its ids mean other pieces
    other_text = tmp_path / "other_text"
    other_text.mkdir()
    for name in ("train.en", "train.de", "valid.en", "valid.de"):
        lines = (small_corpus / name).read_text().splitlines()
        (other_text / name).write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    other_vocab = prepare_small(other_text, tmp_path / "other-vocab")
    with pytest.raises(
        UserError, match="run/last.pt was trained on other data: its vocabulary and training data"
    ):
        make_trainer(tmp_path, other_vocab, "run", max_updates=4)
    # the same vocabulary, fewer training pairs (another length filter)
    shorter = prepare_small(small_corpus, tmp_path / "shorter", max_len=12)
    assert (shorter / "spm.model").read_bytes() == (data_dir / "spm.model").read_bytes()
    with pytest.raises(UserError, match="its training data differ"):
        make_trainer(tmp_path, shorter, "run", max_updates=4)
    # the same data moved elsewhere resumes
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    trainer = make_trainer(tmp_path, moved, "run", max_updates=4)
    assert trainer.update == 2
    trainer.run()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["update"] == 4


@pytest.mark.slow
def test_a_small_transformer_learns_multi30k(tmp_path, multi30k):
    data = tmp_path / "prep"
    prepare(
        PrepareOptions(
            src="en",
            tgt="de",
            train=str(multi30k / "train"),
            valid=str(multi30k / "val"),
            out=data,
            vocab_size=2000,
        ),
        log=lambda m: None,
    )
    settings = dict(
        emb_dim=64,
        ffn_dim=256,
        enc_layers=2,
        dec_layers=2,
        heads=4,
        max_tokens=3000,
        lr=0.003,
        warmup=50,
        max_updates=150,
        valid_every=25,
        valid_max_sentences=100,
        threads=0,
        dtype="bf16",
    )
    make_trainer(tmp_path, data, "run", **settings).run()
    valid = [r for r in read_log(tmp_path / "run") if r["type"] == "valid"]
    assert valid[-1]["ppl"] < valid[0]["ppl"] / 3, valid
    assert valid[-1]["ppl"] < 150, valid


def test_rows_padded_with_pad_targets_change_neither_loss_nor_gradient():
    """Training pads the output layer's rows to the shape ladder with PAD targets."""
    from torch.nn import functional as F

    from nmt_tie.data.tokenizer import PAD_ID
    from nmt_tie.training.loss import label_smoothed_nll

    torch.manual_seed(0)
    logits = torch.randn(37, 50, dtype=torch.float64)
    target = torch.randint(PAD_ID + 1, 50, (37,))
    padded_target = torch.cat([target, torch.full((11,), PAD_ID)])
    real = logits.clone().requires_grad_()
    padded = torch.cat([logits, torch.randn(11, 50, dtype=torch.float64)]).requires_grad_()
    loss, nll = label_smoothed_nll(real, target, 0.1)
    padded_loss, padded_nll = label_smoothed_nll(padded, padded_target, 0.1, chunk=100, ignore_index=PAD_ID)
    (loss + padded_loss).backward()
    torch.testing.assert_close(padded_loss, loss)
    torch.testing.assert_close(padded_nll, nll)
    torch.testing.assert_close(padded.grad[:37], real.grad)
    assert (padded.grad[37:] == 0).all()
    smoothed = dict(label_smoothing=0.1, ignore_index=PAD_ID, reduction="sum")
    reference = F.cross_entropy(padded.detach(), padded_target, **smoothed)
    torch.testing.assert_close(padded_loss.detach(), reference)
    # the gradient as well, scaled as the trainer scales it (1 / tokens)
    ours, theirs = padded.detach().clone().requires_grad_(), padded.detach().clone().requires_grad_()
    (label_smoothed_nll(ours, padded_target, 0.1, chunk=100, ignore_index=PAD_ID)[0] * 0.25).backward()
    (F.cross_entropy(theirs, padded_target, **smoothed) * 0.25).backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_loss_gradient_made_in_the_forward_pass_holds_for_bf16_retained_graphs_and_no_grad():
    """The loss makes its gradient in the forward pass and keeps it for the backward pass:
    bf16 logits get the fp32 reference's gradient to bf16 precision, a retained graph gives
    the same gradient twice, and without autograd nothing is made but the loss."""
    from torch.nn import functional as F

    from nmt_tie.data.tokenizer import PAD_ID
    from nmt_tie.training.loss import label_smoothed_nll

    torch.manual_seed(0)
    logits = torch.randn(300, 120) * 3
    target = torch.randint(PAD_ID + 1, 120, (300,))
    target[::7] = PAD_ID
    smoothed = dict(label_smoothing=0.1, ignore_index=PAD_ID, reduction="sum")
    reference = logits.clone().requires_grad_()
    (F.cross_entropy(reference, target, **smoothed) / 250).backward()
    half = logits.to(torch.bfloat16).requires_grad_()
    loss, _ = label_smoothed_nll(half, target, 0.1, chunk=1000, ignore_index=PAD_ID)
    (loss / 250).backward()
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(half.grad.float(), reference.grad, rtol=0.02, atol=2e-5)
    assert (half.grad[::7] == 0).all()
    retained = logits.clone().requires_grad_()
    loss, _ = label_smoothed_nll(retained, target, 0.1, ignore_index=PAD_ID)
    loss.backward(retain_graph=True)
    first = retained.grad.clone()
    loss.backward()
    torch.testing.assert_close(retained.grad, 2 * first)
    with torch.no_grad():
        loss, nll = label_smoothed_nll(retained, target, 0.1, ignore_index=PAD_ID)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, **smoothed))


def test_fp16_loss_gradient_keeps_small_probabilities_until_the_loss_scale_arrives():
    """fp16 training scales the loss (GradScaler) so that small gradients survive fp16; the
    loss's gradient is made before that factor is known, so it is kept pre-scaled: entries of
    probability 1e-7-1e-4 come out as precise as the fp32 reference allows."""
    from torch.nn import functional as F

    from nmt_tie.training.loss import label_smoothed_nll

    torch.manual_seed(1)
    logits = (torch.randn(64, 3000) * 4).half()
    target = torch.randint(0, 3000, (64,))
    reference = logits.float().requires_grad_()
    (F.cross_entropy(reference, target, label_smoothing=0.1, reduction="sum") * 1024).backward()
    half = logits.clone().requires_grad_()
    (label_smoothed_nll(half, target, 0.1)[0] * 1024).backward()
    small = (reference.grad.abs() > 1e-4) & (reference.grad.abs() < 0.1)  # probabilities 1e-7-1e-4
    assert small.sum() > 10_000
    torch.testing.assert_close(half.grad.float()[small], reference.grad[small], rtol=2e-3, atol=0)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_free_heap_pages_go_back_to_the_system():
    """Training and decoding on a CPU trim glibc's heap: memory freed between live blocks
    (what batches of many shapes leave behind) stops counting as resident."""
    from nmt_tie.devices import _glibc, release_free_memory, resident_mb

    if _glibc() is None:
        pytest.skip("not glibc")

    torch.ones(1 << 20).sum()  # freed at once: glibc then serves blocks this size from its heap
    blocks = [torch.ones((1 << 18) + i) for i in range(200)]  # about 1 MB each, touched
    kept = blocks[1::2]  # every other block stays alive: the freed ones lie between them
    del blocks
    before = resident_mb()
    release_free_memory(torch.device("cpu"))
    assert before - resident_mb() > 50
    assert len(kept) == 100


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_heap_is_trimmed_when_memory_grew_not_otherwise():
    """The trainer's HeapTrimmer trims only after resident memory grew past its margin
    since the level after the last trim: steady memory costs no trims (each makes the next
    updates page their tensors in again), grown memory is given back."""
    from nmt_tie.devices import HeapTrimmer, _glibc, resident_mb

    if _glibc() is None:
        pytest.skip("not glibc")
    trimmer = HeapTrimmer(torch.device("cpu"), margin_mb=32)
    assert trimmer.active
    assert not trimmer.check()  # the first check only measures the level
    steady = [torch.ones(1 << 18) for _ in range(20)]  # 20 MB: within the margin
    assert not trimmer.check()
    torch.ones(1 << 20).sum()  # glibc then serves blocks of this size from its heap
    blocks = [torch.ones((1 << 18) + i) for i in range(200)]  # about 1 MB each, touched
    kept = blocks[1::2]  # freed blocks lie between live ones: only a trim gives them back
    del blocks
    before = resident_mb()
    assert trimmer.check()
    assert before - resident_mb() > 50
    assert trimmer.level is None and not trimmer.check()  # measures the new level
    assert len(kept) == 100 and len(steady) == 20
    assert not HeapTrimmer(torch.device("meta")).check()  # not a CPU: never trims


def test_training_reuses_the_pages_of_large_tensors():
    """glibc maps blocks above 32 MB fresh from the kernel and unmaps them when freed: every
    update's logits and their gradient would be page-faulted in anew. The trainer has them
    served from the heap instead, where freed pages are reused (once the heap has room for
    PyTorch's aligned blocks: after a few updates)."""
    import resource

    from nmt_tie.devices import _glibc, keep_large_tensors_in_heap

    if _glibc() is None:
        pytest.skip("not glibc")
    keep_large_tensors_in_heap(torch.device("cpu"))
    elements = 64 * 2**20 // 4  # 64 MB: 16,384 pages of 4 KB
    faults = []
    for _update in range(10):  # two large tensors live at once, as logits and their gradient
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        logits, grad = torch.empty(elements).fill_(1.0), torch.empty(elements).fill_(2.0)
        del logits, grad
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert sum(faults[-3:]) < 3_000, faults  # fresh pages every time would be 98,304


def test_adam_is_fused_on_the_cpu_and_steps_like_the_reference():
    """One fused kernel over all parameters (much faster than PyTorch's loop on the CPU), and
    the same steps as the reference implementation: resuming a checkpoint of either works."""
    from nmt_tie.config import TrainConfig
    from nmt_tie.training.optim import build_optimizer

    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (8000, 16)]
    weights = [torch.randn(s) for s in shapes]
    fused_params = [w.clone().requires_grad_() for w in weights]
    reference_params = [w.clone().requires_grad_() for w in weights]
    cfg = TrainConfig(optimizer="adam", lr=1e-2, betas=[0.9, 0.98], eps=1e-8)
    fused = build_optimizer(fused_params, cfg)
    assert fused.defaults["fused"] is True
    reference = torch.optim.Adam(reference_params, lr=1e-2, betas=(0.9, 0.98), eps=1e-8, foreach=False)
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for params, optimizer in ((fused_params, fused), (reference_params, reference)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(fused_params, reference_params, strict=True):
        torch.testing.assert_close(a, b)
    reference.load_state_dict(fused.state_dict())  # and back: the state formats agree
    fused.load_state_dict(reference.state_dict())


def test_compiled_training_gives_the_eager_losses_and_stops_recompiling(tmp_path, data_dir):
    """`compile: true`: the same losses as eager updates (no dropout: the compiled kernels draw
    their masks differently), and after the first shapes no new graphs however the batch
    shapes vary (dynamic sizes, not one graph per shape)."""
    from nmt_tie.devices import compiled_graph_count

    torch._dynamo.reset()
    before = compiled_graph_count()  # reset() keeps the counters of graphs compiled earlier
    settings = {"dropout": 0.0, "dtype": "fp32", "max_tokens": 300}
    eager = make_trainer(tmp_path, data_dir, "eager", **settings)
    compiled = make_trainer(tmp_path, data_dir, "compiled", compile=True, **settings)
    shapes = set()
    next_batch = compiled.task.next_batch

    def recording_next_batch():
        batch = next_batch()
        shapes.add((tuple(batch.src.shape), tuple(batch.tgt_in.shape)))
        return batch

    compiled.task.next_batch = recording_next_batch
    for update in range(8):  # the same seed: both trainers see the same batches
        eager_loss = eager.train_step()[0]
        compiled_loss = compiled.train_step()[0]
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-4), update
        if update == 2:
            graphs_when_warm = compiled_graph_count() - before
    assert len(shapes) >= 5
    assert 1 <= compiled_graph_count() - before == graphs_when_warm <= 4
    eager.close()
    compiled.close()


def test_the_linear_schedule_warms_up_then_decays_to_zero_at_the_budget():
    from nmt_tie.config import TrainConfig
    from nmt_tie.training.optim import LRSchedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = LRSchedule(optimizer, TrainConfig(schedule="linear", lr=1.0, warmup=4, max_updates=10))
    rates = []
    for update in range(10):
        schedule.set_update(update)
        rates.append(schedule.lr)
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert rates == pytest.approx(expected)
    for budget in (0, 4):  # no budget, or one inside the warm-up: nothing to decay towards
        with pytest.raises(UserError, match="linear decays to 0 at max_updates"):
            LRSchedule(optimizer, TrainConfig(schedule="linear", lr=1.0, warmup=4, max_updates=budget))
