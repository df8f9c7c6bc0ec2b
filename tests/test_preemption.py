"""Preemption and failed writes (issue 39): SIGTERM and SIGINT stop training after the update
in flight with last.pt written, one process or torchrun's workers, and the rerun ends exactly
where an uninterrupted run ends; a checkpoint that cannot be written is one line, and the
previous one survives."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import prepare_small
from test_train import assert_same_weights, final_weights, make_trainer, write_config

from nmt_tie import checkpoint as checkpoint_module
from nmt_tie.checkpoint import load_checkpoint, save_atomic
from nmt_tie.errors import UserError
from nmt_tie.training.metrics import read_log
from nmt_tie.training.preemption import TrainingStopped

SETTINGS = {"max_updates": 120, "valid_every": 40, "log_every": 1, "valid_max_sentences": 40}
DDP_SETTINGS = {**SETTINGS, "dropout": 0.0, "max_tokens": 400, "max_updates": 60, "valid_every": 20}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small_corpus) -> Path:
    return prepare_small(small_corpus, tmp_path_factory.mktemp("preempt") / "prep")


def train_command(config: Path, workers: int) -> list[str]:
    if workers == 1:
        return [sys.executable, "-m", "nmt_tie", "train", str(config)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, "--nproc_per_node", str(workers), "-m", "nmt_tie", "train", str(config)]


def start(config: Path, workers: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        train_command(config, workers),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        start_new_session=True,  # its own process group: Ctrl-C reaches the group, not pytest
    )


def logged_updates(run_dir: Path) -> list[int]:
    return [r["update"] for r in read_log(run_dir) if r["type"] == "train"]


def interrupt(config: Path, run_dir: Path, workers: int, signum: int, at_update: int) -> tuple:
    """Start training, send `signum` once update `at_update` is logged (to torchrun alone for
    SIGTERM, as a scheduler does; to the whole process group for SIGINT, as Ctrl-C does);
    return the exit status, the output and the seconds from the signal to the exit."""
    process = start(config, workers)
    deadline = time.time() + 240
    while not any(u >= at_update for u in logged_updates(run_dir)):
        assert process.poll() is None, process.communicate()[0]
        assert time.time() < deadline, "training did not reach the update"
        time.sleep(0.01)
    sent = time.time()
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    return process.returncode, output, time.time() - sent


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_dir) -> dict[int, dict]:
    """Final weights of uninterrupted runs, one process and two workers."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    weights = {}
    for workers, settings in [(1, SETTINGS), (2, DDP_SETTINGS)]:
        config = write_config(tmp / f"{workers}.yaml", data_dir, tmp / f"run{workers}", **settings)
        result = subprocess.run(train_command(config, workers), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        weights[workers] = final_weights(tmp / f"run{workers}")
    return weights


@pytest.mark.parametrize(
    "workers, signum",
    [(1, signal.SIGTERM), (1, signal.SIGINT), (2, signal.SIGTERM), (2, signal.SIGINT)],
    ids=["1-SIGTERM", "1-SIGINT", "2-SIGTERM", "2-SIGINT"],
)
def test_a_signal_saves_the_update_in_flight_and_the_rerun_ends_as_if_uninterrupted(
    tmp_path, data_dir, references, workers, signum
):
    settings = SETTINGS if workers == 1 else DDP_SETTINGS
    at_update = random.Random(f"{workers}-{signum}-{time.time()}").randrange(3, settings["max_updates"] - 10)
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", data_dir, run_dir, **settings)
    status, output, seconds = interrupt(config, run_dir, workers, signum, at_update)
    context = f"signalled at update {at_update}:\n{output}"
    saved = load_checkpoint(run_dir / "last.pt")["trainer"]["update"]
    assert at_update <= saved < settings["max_updates"], context
    # last.pt holds the last update logged: nothing trained is lost
    assert logged_updates(run_dir)[-1] == saved, context
    stopped = [r for r in read_log(run_dir) if r["type"] == "stopped"]
    assert stopped == [{"type": "stopped", "update": saved, "signal": signal.Signals(signum).name}], context
    name = signal.Signals(signum).name
    assert f"nmt-tie train: stopped: {name} at update {saved}: saved {run_dir}/last.pt" in output, context
    if workers == 1:
        assert status == 128 + signum, context  # what a shell reports for a process the signal ended
    else:
        assert status != 0, context  # torchrun reports its workers' failure its own way
        assert output.count("nmt-tie train: stopped:") == 1, context  # said once, by rank 0
    assert seconds < 60, context
    assert not list(run_dir.glob(".*.tmp-*"))
    rerun = subprocess.run(train_command(config, workers), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming {run_dir} from update {saved}" in rerun.stderr
    assert_same_weights(final_weights(run_dir), references[workers])


def test_a_signal_during_validation_abandons_it_and_the_rerun_validates_first(tmp_path, data_dir):
    settings = {"max_updates": 12, "valid_every": 4, "log_every": 1}
    reference = make_trainer(tmp_path, data_dir, "ref", **settings)
    reference.run()
    trainer = make_trainer(tmp_path, data_dir, "run", **settings)
    real_validate = trainer.task.validate

    def validate_and_get_signalled(model, run_dir):
        if trainer.update == 8:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, mid-validation
            raise AssertionError("the signal did not interrupt validation")
        return real_validate(model, run_dir)

    trainer.task.validate = validate_and_get_signalled
    with pytest.raises(TrainingStopped, match="SIGTERM at update 8: .*the validation it interrupted") as stop:
        trainer.run()
    assert stop.value.exit_status == 143
    # handlers are restored when training ends
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["trainer"]["update"] == 8 and payload["trainer"]["validation_pending"]
    resumed = make_trainer(tmp_path, data_dir, "run", **settings)
    resumed.run()
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "ref"))

    def validations(run: str) -> list[tuple]:
        return [(r["update"], r["bleu"], r["loss"]) for r in read_log(tmp_path / run) if r["type"] == "valid"]

    assert validations("run") == validations("ref")  # 4, 8 (redone first), 12
    best = load_checkpoint(tmp_path / "run" / "best.pt")["trainer"]
    assert best == load_checkpoint(tmp_path / "ref" / "best.pt")["trainer"]


def test_a_second_signal_while_saving_leaves_a_whole_checkpoint(tmp_path, data_dir, monkeypatch):
    trainer = make_trainer(tmp_path, data_dir, "run", max_updates=100, valid_every=50)
    real_save = checkpoint_module.torch.save

    def save_with_signals(obj, handle, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C in the middle of writing
        real_save(obj, handle, *args, **kwargs)

    def signal_at(update: int):
        def hook(t):
            if t.update == update:
                os.kill(os.getpid(), signal.SIGTERM)
                monkeypatch.setattr(checkpoint_module.torch, "save", save_with_signals)

        return hook

    trainer.after_update_hooks = [signal_at(7)]
    with pytest.raises(TrainingStopped, match="SIGTERM at update 8"):
        trainer.run()
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["update"] == 8
    assert not list((tmp_path / "run").glob(".*.tmp-*"))


# --- a checkpoint that cannot be written -----------------------------------------------------


class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, handle, room: int):
        self.handle, self.room, self.name = handle, room, handle.name

    def write(self, data) -> int:
        if self.room < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


def fill_disk_after(monkeypatch, room: int) -> None:
    def full_disk_open(path, mode):
        return FullDisk(open(path, mode), room)  # noqa: SIM115 (closed by FullDisk)

    monkeypatch.setattr(checkpoint_module, "open", full_disk_open, raising=False)


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"format": "nmt-tie/1", "n": 1}, path)
    before = path.read_bytes()
    fill_disk_after(monkeypatch, 300)
    with pytest.raises(UserError) as error:
        save_atomic({"format": "nmt-tie/1", "n": 2, "pad": b"x" * 10_000}, path)
    reason = "No space left on device; the previous last.pt is intact"
    assert str(error.value) == f"{path}: cannot write the checkpoint: {reason}"
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_training_on_a_full_disk_stops_with_one_line_and_status_2(tmp_path, data_dir, monkeypatch, capsys):
    from nmt_tie.cli import main

    config = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", max_updates=10, valid_every=5)
    assert main_status(main, [str(config)]) == 0
    before = load_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["update"]
    fill_disk_after(monkeypatch, 1000)
    capsys.readouterr()
    assert main_status(main, [str(config), "max_updates=20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("nmt-tie train: error: ")
    assert "last.pt: cannot write the checkpoint: No space left" in err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["trainer"]["update"] == before == 10
    assert not list((tmp_path / "run").glob(".*.tmp-*"))


def main_status(main, args: list[str]) -> int:
    try:
        main(["train", *args])
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_training_started_with_ctrl_c_ignored_answers_it(tmp_path, capsys):
    """bash hands a background command SIGINT ignored (the WMT recipes start training in the
    background to pass signals on): `train` takes Ctrl-C back before anything else."""
    from conftest import run_cli

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code, _, err = run_cli(capsys, "train", str(tmp_path / "missing.yaml"))
        assert code == 2 and "config file not found" in err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
