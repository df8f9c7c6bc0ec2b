"""Benchmark: translation speed and memory.

For each checkpoint (a small Transformer and a small RNN from the Multi30k recipe), precision
(fp32, bf16) and search (greedy, beam 5), translates Multi30k test2016 (1,000 sentences) and
prints sentences/s and output tokens/s (subwords including EOS; best of two passes, as this
machine is shared). Then it runs `nmt-tie translate` on 100,000 lines read from a pipe and
reports its peak resident memory next to the peak for 10,000 lines, in fp32 and bf16.

    python recipes/benchmarks/translate_speed.py CHECKPOINT [CHECKPOINT ...] [--stream-lines 100000]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

from nmt_tie.data.locations import data_root
from nmt_tie.data.text import read_lines


def speed(checkpoint: Path, dtype: str, beam: int, lines: list[str]) -> dict:
    from nmt_tie.translate import SearchOptions, Translator

    translator = Translator.from_checkpoints([checkpoint], SearchOptions(beam=beam, lenpen=1.0), dtype=dtype)
    sources = translator.src.encode(lines)
    translator.translate_ids(sources[:50])  # warm-up
    best = None
    for _ in range(2):
        start = time.perf_counter()
        hypotheses = translator.translate_ids(sources)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, hypotheses)
    seconds, hypotheses = best
    tokens = sum(len(h[0].tokens) + 1 for h in hypotheses)
    arch = translator.ensemble.models[0].config.arch
    return {
        "arch": arch,
        "dtype": dtype,
        "beam": beam,
        "sent_s": len(lines) / seconds,
        "tok_s": tokens / seconds,
    }


def streaming_peak_rss(checkpoint: Path, lines: list[str], count: int, dtype: str) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of `nmt-tie translate` (greedy) on `count` piped lines."""
    command = [
        sys.executable,
        "-m",
        "nmt_tie",
        "translate",
        "-c",
        str(checkpoint),
        "--beam",
        "1",
        "--dtype",
        dtype,
        "-o",
        "/dev/null",
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, text=True)
    for i in range(count):
        process.stdin.write(lines[i % len(lines)] + "\n")
    process.stdin.close()
    _, _, usage = os.wait4(process.pid, 0)  # this child's own resource usage
    seconds = time.perf_counter() - start
    return usage.ru_maxrss / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--stream-lines", type=int, default=100_000)
    parser.add_argument("--stream-dtypes", default="fp32,bf16", help="'' to skip the memory test")
    parser.add_argument("--no-speed", action="store_true", help="only the memory test")
    args = parser.parse_args()
    multi30k = data_root() / "multi30k"
    test = list(read_lines(multi30k / "test_2016_flickr.en.gz"))
    if not args.no_speed:
        print(f"{'arch':<12}{'dtype':<6}{'search':<8}{'sent/s':>9}{'tok/s':>9}")
        for checkpoint, dtype, beam in itertools.product(args.checkpoints, ("fp32", "bf16"), (1, 5)):
            r = speed(checkpoint, dtype, beam, test)
            search = "greedy" if beam == 1 else f"beam {beam}"
            print(
                f"{r['arch']:<12}{r['dtype']:<6}{search:<8}{r['sent_s']:>9.1f}{r['tok_s']:>9.0f}",
                flush=True,
            )
    train = list(read_lines(multi30k / "train.en.gz"))
    for dtype in filter(None, args.stream_dtypes.split(",")):
        # bf16 grows more than fp32 before levelling off: oneDNN keeps kernels per matrix shape
        small, _ = streaming_peak_rss(args.checkpoints[0], train, args.stream_lines // 10, dtype)
        large, seconds = streaming_peak_rss(args.checkpoints[0], train, args.stream_lines, dtype)
        print(
            f"nmt-tie translate from a pipe (greedy, {dtype}): peak RSS {small:.0f} MB for "
            f"{args.stream_lines // 10:,} lines, {large:.0f} MB for {args.stream_lines:,} lines "
            f"({args.stream_lines / seconds:.0f} lines/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
