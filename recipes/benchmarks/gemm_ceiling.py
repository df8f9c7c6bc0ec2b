"""Benchmark: how fast a Transformer's own matrix products run, against the peak product.

Training's MFU (train_speed.py) compares useful FLOPs with the best of large square products.
This script times, at a model's real shapes, each linear layer's forward product and its two
backward products (input and weight gradients), alternated with a 4096 x 4096 x 4096 product,
and prints their rate: the ceiling training could reach if it did nothing but these products.
The gap between that ceiling and train_speed.py's MFU is the time spent outside them
(attention, normalization, dropout, casts, the loss, the optimizer).

    python recipes/benchmarks/gemm_ceiling.py                          # transformer-base shape, bf16
    python recipes/benchmarks/gemm_ceiling.py --dim 256 --ffn 1024 --layers 3 --dtype fp32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def seconds_per_product(a: torch.Tensor, b: torch.Tensor, calls: int) -> float:
    """Seconds of one `a @ b`: best of three rounds of `calls` products, after a warm-up."""
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def linear_layers(dim: int, ffn: int, layers: int, vocab: int) -> dict[str, tuple[int, int, int]]:
    """name: (input size, output size, how many per update) of an encoder-decoder Transformer
    with `layers` layers on each side and a tied output layer over `vocab` pieces."""
    return {
        "self-attention qkv": (dim, 3 * dim, 2 * layers),
        "attention output": (dim, dim, 3 * layers),  # encoder self, decoder self and cross
        "cross-attention q": (dim, dim, layers),
        "cross-attention kv": (dim, 2 * dim, layers),
        "feed-forward in": (dim, ffn, 2 * layers),
        "feed-forward out": (ffn, dim, 2 * layers),
        "output layer": (dim, vocab, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6, help="encoder layers = decoder layers")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument(
        "--rows", type=int, default=1900, help="tokens per side of a batch (4096 padded tokens)"
    )
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    square = torch.randn(4096, 4096, dtype=dtype)
    peaks, total_flop, total_seconds = [], 0.0, 0.0
    print(f"{'linear layer':<20}{'forward':>9}{'input grad':>12}{'weight grad':>13}   GFLOP/s ({args.dtype})")
    for name, (fan_in, fan_out, count) in linear_layers(args.dim, args.ffn, args.layers, args.vocab).items():
        x = torch.randn(args.rows, fan_in, dtype=dtype)
        weight = torch.randn(fan_out, fan_in, dtype=dtype)
        grad_out = torch.randn(args.rows, fan_out, dtype=dtype)
        flop = 2 * args.rows * fan_in * fan_out
        calls = max(1, int(2e9 / flop))
        times = [
            seconds_per_product(x, weight.T, calls),  # forward
            seconds_per_product(grad_out, weight, calls),  # gradient of the input
            seconds_per_product(grad_out.T, x, calls),  # gradient of the weight
        ]
        peaks.append(2 * 4096**3 / seconds_per_product(square, square, 2) / 1e9)
        rates = [flop / t / 1e9 for t in times]
        print(f"{name:<20}{rates[0]:>9.0f}{rates[1]:>12.0f}{rates[2]:>13.0f}", flush=True)
        total_flop += 3 * flop * count
        total_seconds += sum(times) * count
    peak = statistics.median(peaks)
    rate = total_flop / total_seconds / 1e9
    print(
        f"all linear layers: {total_flop / 1e9:.0f} GFLOP per update in {total_seconds * 1e3:.0f} ms, "
        f"{rate:.0f} GFLOP/s = {rate / peak:.0%} of the 4096^3 product ({peak:.0f} GFLOP/s, median of "
        f"{len(peaks)} interleaved)"
    )


if __name__ == "__main__":
    main()
