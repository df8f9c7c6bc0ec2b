"""Benchmark: training throughput of a small Transformer and a small RNN on Multi30k En-De.

For each model and precision (fp32, bf16 autocast) it runs real `Trainer` updates on real
batches (max_tokens 4096, joint vocabulary 8000) and prints target tokens/s, updates/s, peak
resident memory and model FLOP utilization (MFU): the matrix-multiply FLOPs of an update,
counted by torch.utils.flop_counter, per second, divided by this machine's measured peak for
that precision (a 2048x2048 matrix product). Each configuration runs in its own process so
that peak memory is its own. This shared machine's speed varies from minute to minute, so
each configuration runs three rounds and the fastest counts (for the peak too).

    python recipes/benchmarks/train_speed.py [--updates 20] [--models transformer,rnn]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = 3
MODELS = {
    "transformer": dict(arch="transformer", emb_dim=256, ffn_dim=1024, enc_layers=3, dec_layers=3, heads=4),
    "rnn": dict(arch="rnn", emb_dim=256, hidden_dim=256),
}


def matmul_peak(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * size**3 / best


def measure(model: str, dtype: str, updates: int, data: str) -> dict:
    """Runs in a child process: build a Trainer, time `updates` real updates."""
    from torch.utils.flop_counter import FlopCounterMode

    from nmt_tie.config import ModelConfig, TrainConfig
    from nmt_tie.training.trainer import Trainer
    from nmt_tie.training.translation import TranslationTask

    with tempfile.TemporaryDirectory() as tmp:
        model_cfg = ModelConfig(tie="all", dropout=0.1, **MODELS[model])
        train_cfg = TrainConfig(
            data=data,
            save_dir=tmp,
            dtype=dtype,
            max_tokens=4096,
            max_updates=10**6,
            warmup=4000,
            log_every=10**6,
            valid_every=10**6,
        )
        trainer = Trainer(TranslationTask, model_cfg, train_cfg, log=lambda m: None)
        trainer.started = time.perf_counter()
        for _ in range(3):  # warm-up
            trainer.train_step()
        counter = FlopCounterMode(display=False)
        with counter:
            trainer.train_step()
        flops_per_update = counter.get_total_flops()
        # This machine is shared: take the fastest of several rounds, for the model and the peak.
        rounds = []
        for _ in range(ROUNDS):
            times, tokens = [], []
            for _ in range(updates):
                start = time.perf_counter()
                _, _, n, _ = trainer.train_step()
                times.append(time.perf_counter() - start)
                tokens.append(n)
            rounds.append((sum(tokens) / sum(times), times, tokens))
    _, times, tokens = max(rounds, key=lambda r: r[0])
    seconds = sum(times)
    peak = matmul_peak(dtype)
    median = statistics.median(times)
    return {
        "model": model,
        "dtype": dtype,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "target_tokens_per_s": sum(tokens) / seconds,
        "updates_per_s": updates / seconds,
        "median_update_s": median,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gflops_per_update": flops_per_update / 1e9,
        "achieved_gflops": flops_per_update / median / 1e9,
        "peak_gflops": peak / 1e9,
        "mfu": flops_per_update / median / peak,
    }


def prepared_multi30k(root: Path) -> Path:
    from nmt_tie.data.locations import data_root
    from nmt_tie.data.prepare import PrepareOptions, prepare

    multi30k = data_root() / "multi30k"
    out = root / "multi30k-en-de-8000"
    prepare(
        PrepareOptions(
            src="en",
            tgt="de",
            train=str(multi30k / "train"),
            valid=str(multi30k / "val"),
            out=out,
            vocab_size=8000,
        ),
        log=lambda m: None,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--updates", type=int, default=20, help="updates per round")
    parser.add_argument("--models", default="transformer,rnn")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument(
        "--child", nargs=4, metavar=("MODEL", "DTYPE", "UPDATES", "DATA"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        model, dtype, updates, data = args.child
        print(json.dumps(measure(model, dtype, int(updates), data)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = prepared_multi30k(Path(tmp))
        results = []
        for model in args.models.split(","):
            for dtype in args.dtypes.split(","):
                command = [sys.executable, __file__, "--child", model, dtype, str(args.updates), str(data)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results.append(json.loads(output.strip().splitlines()[-1]))
    print(
        f"{'model':<12}{'dtype':<6}{'params':>10}{'tgt tok/s':>11}{'upd/s':>8}{'peak RSS MB':>13}"
        f"{'GFLOP/upd':>11}{'GFLOP/s':>9}{'peak':>7}{'MFU':>7}"
    )
    for r in results:
        print(
            f"{r['model']:<12}{r['dtype']:<6}{r['params']:>10,}{r['target_tokens_per_s']:>11,.0f}"
            f"{r['updates_per_s']:>8.2f}{r['peak_rss_mb']:>13,.0f}{r['gflops_per_update']:>11.1f}"
            f"{r['achieved_gflops']:>9.0f}{r['peak_gflops']:>7.0f}{r['mfu']:>7.1%}"
        )
    by_key = {(r["model"], r["dtype"]): r for r in results}
    for model in args.models.split(","):
        if (model, "fp32") in by_key and (model, "bf16") in by_key:
            speedup = (
                by_key[model, "bf16"]["target_tokens_per_s"] / by_key[model, "fp32"]["target_tokens_per_s"]
            )
            print(f"{model}: bf16 / fp32 throughput {speedup:.2f}x")


if __name__ == "__main__":
    main()
