"""Benchmark: training speed and memory against fairseq, side by side on the same data.

fairseq is not a dependency of nmt-tie: install it in a virtualenv of its own (see
../shared/peers.md, or `python3 -m venv PEER && PEER/bin/pip install torch==2.13.0
fairseq-fixed==0.12.3.1`). This script gives it nmt-tie's prepared data (the same
SentencePiece pieces, the same joint vocabulary), trains the same model (pre-norm
Transformer 256/1024, 3+3 layers, 4 heads, three-way tied, dropout 0.1, label smoothing 0.1,
Adam, inverse-sqrt warm-up) for the same number of updates with about the same target
tokens per batch, then nmt-tie in fp32 and bf16, one job at a time, and prints target tokens
per second (fairseq's `wps`; nmt-tie's `tokens_per_s`: non-pad target tokens including EOS)
after the first `--skip` updates, and each process's peak resident memory. With `--rounds N`
the three jobs run N times in turn and each ratio is to its own round's fairseq job.

    python recipes/benchmarks/peers.py --data runs/multi30k/data-en-de --fairseq-venv PEER \
        [--updates 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RECIPE = Path(__file__).resolve().parents[1] / "multi30k" / "transformer-all.yaml"
FAIRSEQ_MODEL = shlex.split(
    "--arch transformer --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 "
    "--decoder-embed-dim 256 --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 "
    "--encoder-attention-heads 4 --decoder-attention-heads 4 --encoder-normalize-before "
    "--decoder-normalize-before --share-all-embeddings --dropout 0.1 --attention-dropout 0 "
    "--activation-dropout 0 --criterion label_smoothed_cross_entropy --label-smoothing 0.1 "
    "--optimizer adam --adam-betas (0.9,0.98) --lr 0.002 --lr-scheduler inverse_sqrt "
    "--warmup-updates 300 --warmup-init-lr 1e-7 --cpu --num-workers 0 --disable-validation"
)
# fairseq's --max-tokens bounds max(source, target) per sentence, nmt-tie's max_tokens the
# padded source + target: 2270 gives about nmt-tie's ~1,970 target tokens a batch at 4096.
FAIRSEQ_MAX_TOKENS = 2270


def write_pieces(data: Path, out: Path, splits: dict[str, str] | None = None) -> tuple[str, str]:
    """Prepared splits as space-separated pieces, written as `out/NAME.LANG` for each
    `{split: NAME}` (default: train and valid), and fairseq's dictionary of the vocabulary;
    returns the (source, target) languages."""
    pieces = (data / "vocab.txt").read_text(encoding="utf-8").split("\n")
    out.mkdir(parents=True, exist_ok=True)
    record = json.loads((data / "prepare.json").read_text())["options"]
    for split, name in (splits or {"train": "train", "valid": "valid"}).items():
        for lang in (record["src"], record["tgt"]):
            ids = np.load(data / f"{split}.{lang}.ids.npy", mmap_mode="r")
            offsets = np.load(data / f"{split}.{lang}.offsets.npy")
            with open(out / f"{name}.{lang}", "w", encoding="utf-8") as handle:
                for start, end in zip(offsets[:-1], offsets[1:], strict=True):
                    handle.write(" ".join(pieces[i] for i in ids[start:end]) + "\n")
    with open(out / "dict.txt", "w", encoding="utf-8") as handle:  # without the 4 specials
        handle.writelines(f"{piece} 1\n" for piece in pieces[4:] if piece)
    return record["src"], record["tgt"]


def timed(command: list[str], **kwargs) -> float:
    """Run; return the peak RSS (MB) of the process (its own, via wait4)."""
    process = subprocess.Popen(command, **kwargs)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"failed: {' '.join(command[:4])} ...")
    return usage.ru_maxrss / 1024


def fairseq(venv: Path, data: Path, work: Path, updates: int, skip: int, threads: int) -> dict:
    bin_dir = work / "fairseq-bin"
    record = json.loads((data / "prepare.json").read_text())["options"]
    src, tgt = record["src"], record["tgt"]
    if not (bin_dir / "dict.en.txt").exists():
        write_pieces(data, work / "pieces")
        subprocess.run(
            [str(venv / "bin" / "fairseq-preprocess"), "--source-lang", src, "--target-lang", tgt,
             "--trainpref", str(work / "pieces" / "train"), "--validpref", str(work / "pieces" / "valid"),
             "--destdir", str(bin_dir), "--joined-dictionary", "--srcdict", str(work / "pieces" / "dict.txt"),
             "--workers", "2"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    log = work / "fairseq.log"
    command = [str(venv / "bin" / "fairseq-train"), str(bin_dir), *FAIRSEQ_MODEL]
    command += ["--max-tokens", str(FAIRSEQ_MAX_TOKENS), "--max-update", str(updates), "--seed", "1"]
    command += ["--log-format", "json", "--log-interval", "10", "--save-dir", str(work / "fs-ckpt")]
    command += ["--no-save", "--no-epoch-checkpoints", "--no-last-checkpoints"]
    with open(log, "w") as handle:
        rss = timed(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    records = []
    for line in log.read_text().splitlines():
        if "train_inner" in line and "{" in line:
            entry = json.loads(line[line.index("{") :])
            if int(entry["num_updates"]) > skip:
                records.append(entry)
    return {
        "tokens_per_s": statistics.mean(float(r["wps"]) for r in records),
        "target_tokens_per_batch": statistics.mean(float(r["wpb"]) for r in records),
        "peak_rss_mb": rss,
    }


def nmt_tie(data: Path, work: Path, updates: int, skip: int, dtype: str, threads: int) -> dict:
    save_dir = work / f"nmt-tie-{dtype}"
    shutil.rmtree(save_dir, ignore_errors=True)  # a run left in --work would resume, not train
    command = [sys.executable, "-m", "nmt_tie", "train", str(RECIPE), f"data={data}", f"save_dir={save_dir}"]
    command += [f"dtype={dtype}", f"max_updates={updates}", "valid_every=1000000", "log_every=10"]
    command += ["warmup=300", f"threads={threads}", "seed=1"]
    rss = timed(command, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (save_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train" and r["update"] > skip]
    # bf16 runs in fp32 on a CPU without native bf16: the setup record says what ran
    used = next(r["dtype"] for r in records if r["type"] == "setup")
    # tokens_per_s is per logging window of 10 updates: the mean over windows, as fairseq's wps
    return {
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in train),
        "peak_rss_mb": rss,
        "dtype": used,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="nmt-tie prepared directory (joint BPE)")
    parser.add_argument("--fairseq-venv", type=Path, required=True)
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--skip", type=int, default=100, help="updates left out of the averages (warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="threads of each job (default 2)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the three jobs this many times in turn; each ratio is to the fairseq job of its own "
        "round (a shared machine's speed drifts by several percent over minutes), the table gives medians",
    )
    parser.add_argument(
        "--dtypes",
        default="fp32,bf16",
        help="nmt-tie's precisions (bf16 runs in fp32 on a CPU without native bf16: leave it out there)",
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nmt-tie-peers-"))

    def nmt_tie_job(dtype: str):
        return lambda: nmt_tie(args.data, work, args.updates, args.skip, dtype, args.threads)

    jobs = [
        (
            "fairseq fp32",
            lambda: fairseq(args.fairseq_venv, args.data, work, args.updates, args.skip, args.threads),
        ),
        *((f"nmt-tie {dtype}", nmt_tie_job(dtype)) for dtype in args.dtypes.split(",")),
    ]
    results: dict[str, list[dict]] = {name: [] for name, _ in jobs}
    for round_index in range(args.rounds):
        for name, run in jobs:
            start = time.perf_counter()
            result = run()
            result["wall_s"] = time.perf_counter() - start
            results[name].append(result)
            print(f"round {round_index + 1}", name, json.dumps(result), flush=True)
    base = [r["tokens_per_s"] for r in results["fairseq fp32"]]
    print(f"\n{'':<20}{'target tok/s':>14}{'vs fairseq':>12}{'peak RSS MB':>13}  ratio per round")
    for name, runs in results.items():
        ratios = [r["tokens_per_s"] / b for r, b in zip(runs, base, strict=True)]
        used = runs[0].get("dtype")
        if used and not name.endswith(used):
            name = f"{name}->{used}"
        print(
            f"{name:<20}{statistics.median(r['tokens_per_s'] for r in runs):>14,.0f}"
            f"{statistics.median(ratios):>11.2f}x{max(r['peak_rss_mb'] for r in runs):>13,.0f}  "
            + " ".join(f"{x:.3f}" for x in ratios)
        )


if __name__ == "__main__":
    main()
