"""GPU smoke test: the first thing to run on a machine with a GPU (under 5 minutes on one).

For the small Multi30k Transformer and RNN (three-way tied) in each precision asked for
(default bf16 and fp16 with loss scaling) it: trains with `nmt-tie train` in a child
process, kills it with SIGKILL halfway, reruns the same command (which must resume from
last.pt and finish), checks that the tied matrix is still one tensor in best.pt, translates
the first sentences of test2016 with beam search, and prints updates/s, target tokens/s and
peak GPU memory. Exit status 1 if any check fails.

    recipes/benchmarks/gpu_smoke.sh                 # = python recipes/benchmarks/gpu_smoke.py
    python recipes/benchmarks/gpu_smoke.py --updates 200 --dtypes bf16,fp16 --archs transformer,rnn
    python recipes/benchmarks/gpu_smoke.py --archs transformer --compile   # compiled training and
                                                       # decoding (against eager), graphs counted

On the CPU (`--device cpu`, few updates) it tests itself: tests/test_gpu_readiness.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = {
    "transformer": {"arch": "transformer", "emb_dim": 256, "ffn_dim": 1024, "enc_layers": 3, "dec_layers": 3,
                    "heads": 4, "lr": 0.002, "optimizer": "adam"},
    "rnn": {"arch": "rnn", "emb_dim": 256, "hidden_dim": 512, "lr": 0.001, "optimizer": "adam",
            "clip_norm": 1.0},
}  # fmt: skip


def log_records(run: Path, kind: str) -> list[dict]:
    path = run / "log.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return [r for r in records if r.get("type") == kind]


def train_command(run: Path, data: Path, arch: str, dtype: str, args) -> list[str]:
    settings = {
        **MODELS[arch],
        "tie": "all",
        "data": str(data),
        "save_dir": str(run),
        "device": args.device,
        "dtype": dtype,
        "max_tokens": args.max_tokens,
        "compile": args.compile,
        "max_updates": args.updates,
        "warmup": max(1, args.updates // 4),
        "valid_every": max(1, args.updates // 4),
        "valid_max_sentences": 100,
        "log_every": max(1, args.updates // 8),
        "save_every_minutes": 0.05,  # last.pt every 3 s: the kill loses little
    }
    config = run.with_suffix(".yaml")
    config.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    return [sys.executable, "-m", "nmt_tie", "train", str(config)]


def smoke(arch: str, dtype: str, data: Path, out: Path, args) -> dict:
    run = out / f"{arch}-{dtype}"
    command = train_command(run, data, arch, dtype, args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    kill_after = args.updates // 2
    while first.poll() is None:
        if any(r["update"] >= kill_after for r in log_records(run, "train")) and (run / "last.pt").exists():
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    first.wait()
    if first.returncode != -signal.SIGKILL:
        output = first.stderr.read()[-2000:]
        raise SystemExit(f"{run}: training ended before the kill ({first.returncode}): {output}")
    second = subprocess.run(command, capture_output=True, text=True, env=env)
    if second.returncode != 0 or "resuming" not in second.stderr:
        raise SystemExit(f"{run}: the rerun did not resume and finish:\n{second.stderr[-3000:]}")
    seconds = time.perf_counter() - started

    import torch

    from nmt_tie.checkpoint import load_checkpoint, load_model
    from nmt_tie.translate import SearchOptions, Translator

    payload = load_checkpoint(run / "last.pt")
    if payload["trainer"]["update"] != args.updates:
        raise SystemExit(f"{run}: last.pt is at update {payload['trainer']['update']}, not {args.updates}")
    model = load_model(load_checkpoint(run / "best.pt"), args.device)
    tied = all(
        model.embeddings.weight(role) is model.embeddings.weight("output")
        for role in ("encoder_input", "decoder_input")
    )
    if not tied:
        raise SystemExit(f"{run}: the three-way tied matrix is no longer one tensor")
    sources = Path(args.translate_from).read_text(encoding="utf-8").splitlines()[: args.sentences]
    options = SearchOptions(beam=5)
    translator = Translator.from_checkpoints([run / "best.pt"], options, device=args.device, dtype=dtype)
    begin = time.perf_counter()
    hypotheses = translator.translate(sources)
    translate_s = time.perf_counter() - begin
    if len(hypotheses) != len(sources):
        raise SystemExit(f"{run}: {len(hypotheses)} translations for {len(sources)} sentences")
    compiled = {}
    if args.compile:  # decoding through compiled steps (`translate --compile`) too
        translator = Translator.from_checkpoints(
            [run / "best.pt"], options, device=args.device, dtype=dtype, compile=True
        )
        begin = time.perf_counter()
        translator.translate(sources)  # compiles
        compiled["translate_compile_s"] = round(time.perf_counter() - begin, 1)
        begin = time.perf_counter()
        compiled_hypotheses = translator.translate(sources)
        compiled["translate_compiled_s"] = round(time.perf_counter() - begin, 2)
        same = sum(a[0][0] == b[0][0] for a, b in zip(compiled_hypotheses, hypotheses, strict=True))
        compiled["same_as_eager"] = same / len(sources)  # best hypotheses (text, score) by text
    train = [r for r in log_records(run, "train") if r["update"] > kill_after]
    setup = log_records(run, "setup")[-1]
    return {
        "model": arch,
        "dtype": setup["dtype"],
        "resumed_from": next(r["update"] for r in log_records(run, "setup")[1:]),
        "updates_per_s": max(r["updates_per_s"] for r in train),
        "tokens_per_s": max(r["tokens_per_s"] for r in train),
        "gpu_peak_gib": max((r.get("gpu_peak_gib", 0.0) for r in train), default=0.0),
        "valid_bleu": log_records(run, "valid")[-1]["bleu"],
        "compiled_graphs": train[-1].get("compiled_graphs", 0),
        "translate_s": round(translate_s, 2),
        "wall_s": round(seconds, 1),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        **compiled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/gpu-smoke", help="run directories (emptied first)")
    parser.add_argument("--prepared", help="a prepared data directory (default: prepare Multi30k En-De)")
    parser.add_argument("--translate-from", help="raw source sentences (default: Multi30k test2016 En)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--archs", default="transformer,rnn")
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument(
        "--compile", action="store_true", help="train with compile: true, and translate with --compile too"
    )
    parser.add_argument("--sentences", type=int, default=100)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from nmt_tie.data.locations import data_root

    out = Path(args.out)
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    if args.prepared:
        data = Path(args.prepared)
    else:
        multi30k = data_root() / "multi30k"
        data = out / "data"
        subprocess.run(
            [sys.executable, "-m", "nmt_tie", "prepare", "--src", "en", "--tgt", "de",
             "--train", str(multi30k / "train"), "--valid", str(multi30k / "val"),
             "--out", str(data), "--vocab-size", "8000"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    if not args.translate_from:
        test = out / "test2016.en"
        gz = data_root() / "multi30k" / "test_2016_flickr.en.gz"
        subprocess.run(f"zcat {gz} > {test}", shell=True, check=True)
        args.translate_from = str(test)
    results = []
    for arch in args.archs.split(","):
        for dtype in args.dtypes.split(","):
            result = smoke(arch, dtype, data, out, args)
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"\n{'model':<12}{'dtype':<6}{'resumed at':>11}{'upd/s':>8}{'tok/s':>10}{'GPU GiB':>9}"
          f"{'BLEU':>7}{f'{args.sentences} sent. s':>14}")  # fmt: skip
    for r in results:
        print(f"{r['model']:<12}{r['dtype']:<6}{r['resumed_from']:>11}{r['updates_per_s']:>8.2f}"
              f"{r['tokens_per_s']:>10,.0f}{r['gpu_peak_gib']:>9.2f}{r['valid_bleu']:>7.2f}"
              f"{r['translate_s']:>14.2f}")  # fmt: skip
    print(f"device: {results[0]['device']}; every run was killed, resumed, stayed tied and translated: OK")


if __name__ == "__main__":
    main()
