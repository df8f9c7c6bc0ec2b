"""Benchmark: translation speed, memory, quality and size, PyTorch and CTranslate2 exports.

For each checkpoint, translates Multi30k test2016 (1,000 sentences) with every engine asked
for and prints one row each: output pieces/s (subwords including EOS, as fairseq counts;
best of two passes after a warm-up), sentences/s, the peak resident memory of the process
that did it (each row runs in a fresh process), sacreBLEU against the references, the
hypothesis/reference length ratio, the share of sentences translated exactly as nmt-tie's
own fp32 search does, and the bytes on disk of what was loaded.

Engines (--engines):
- `pytorch-fp32`, `pytorch-bf16`: `nmt-tie translate` on the checkpoint; `pytorch-fp32-compile`,
  `pytorch-bf16-compile` the same with `--compile` (only when named: compiling takes a minute
  or two, in the warm-up pass, and the row says how many graphs it made);
- `export-float32`, `export-int8`: `nmt-tie translate -c DIR` on a CTranslate2 export
  (made here with `nmt-tie export`), tokenization and detokenization included;
- `ct2-float32`, `ct2-int8`: the same exports called directly with pre-tokenized pieces
  (`ctranslate2.Translator.translate_batch`), to show what nmt-tie's wrapper costs.

Then `nmt-tie translate` on 100,000 lines from a pipe, peak RSS next to 10,000 lines.
With `--device cuda` every engine runs on the GPU and the rows add its peak memory.

    python recipes/benchmarks/translate_speed.py CHECKPOINT [...] [--beams 1,5] [--stream-lines 100000]
    python recipes/benchmarks/translate_speed.py CHECKPOINT --device cuda --engines pytorch-fp32,pytorch-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nmt_tie.data.locations import data_root
from nmt_tie.data.text import read_lines

TEST = "test_2016_flickr"
ENGINES = ("pytorch-fp32", "pytorch-bf16", "export-float32", "export-int8", "ct2-float32", "ct2-int8")
COMPILED = ("pytorch-fp32-compile", "pytorch-bf16-compile")  # asked for by name: minutes of compiling


def _best_of_two(run):
    run(slice(0, 50))  # warm-up
    best = None
    for _ in range(2):
        start = time.perf_counter()
        result = run(slice(None))
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, result)
    return best


def measure(
    engine: str,
    model: str,
    beam: int,
    lines: list[str],
    max_tokens: int = 4096,
    threads: int = 0,
    device: str = "cpu",
) -> dict:
    """Translate `lines`; (seconds, output pieces incl. EOS, detokenized hypotheses, peak GPU
    memory of PyTorch rows on a GPU). Export rows never import PyTorch, as `nmt-tie translate
    -c DIR` (their peak RSS is theirs)."""
    from nmt_tie.translate import SearchOptions, Translator

    options = SearchOptions(beam=beam, lenpen=1.0, max_tokens=max_tokens)
    if engine.startswith("pytorch"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        translator = Translator.from_checkpoints(
            [Path(model)],
            options,
            device=device,
            dtype=engine.split("-")[1],
            warn=lambda m: None,
            compile=engine.endswith("-compile"),
        )
    else:
        from nmt_tie.deploy import EXPORT_MAX_TOKENS, ExportedTranslator

        options.max_tokens = EXPORT_MAX_TOKENS  # as `nmt-tie translate` on an export
        translator = ExportedTranslator(model, options, device=device, threads=threads)
    sources = translator.src.encode(lines)
    if engine.startswith("ct2"):
        pieces = [translator.src.pieces(ids) for ids in sources]

        def run(part):
            return translator.engine.translate_batch(
                pieces[part],
                beam_size=beam,
                length_penalty=1.0 if beam > 1 else 0.0,
                max_batch_size=options.max_tokens,
                batch_type="tokens",
                max_decoding_length=int((max(map(len, sources)) + 1) * options.max_len_a + options.max_len_b),
            )

        seconds, results = _best_of_two(run)
        index = translator.tgt.vocab.index
        ids = [[index[p] for p in r.hypotheses[0]] for r in results]
    else:

        def run(part):
            return translator.translate_ids(sources[part])

        seconds, results = _best_of_two(run)
        ids = [h[0].tokens if h else [] for h in results]
    hypotheses = [translator.tgt.decode(t) for t in ids]
    gpu_mb = None
    if engine.startswith("pytorch") and device.startswith("cuda"):
        gpu_mb = torch.cuda.max_memory_allocated() / 2**20
    from nmt_tie.devices import compiled_graph_count

    return {
        "graphs": compiled_graph_count() if engine.endswith("-compile") else None,
        "seconds": seconds,
        # bf16 runs in fp32 on a CPU without native bf16 (devices.effective_dtype)
        "dtype": getattr(translator, "dtype", None),
        "pieces": sum(len(t) + 1 for t in ids),
        "hypotheses": hypotheses,
        "gpu_peak_mb": gpu_mb,
    }


def run_row(engine: str, model: str, beam: int, max_tokens: int, threads: int, device: str) -> dict:
    """One row in a fresh process: its own peak RSS."""
    spec = json.dumps(
        {
            "engine": engine,
            "model": model,
            "beam": beam,
            "max_tokens": max_tokens,
            "threads": threads,
            "device": device,
        }
    )
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        process = subprocess.Popen([sys.executable, __file__, "--row", spec, "--row-out", out.name])
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            raise SystemExit(f"{engine} on {model} failed")
        result = json.loads(Path(out.name).read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def label(engine: str, row: dict) -> str:
    """The engine, and the precision that ran where it is not the one asked for."""
    used = row.get("dtype")
    return engine if not used or engine.split("-")[1] == used else f"{engine}->{used}"


def gpu_column(megabytes: float | None) -> str:
    return f"{megabytes:>8.0f}" if megabytes is not None else f"{'-':>8}"


def disk_bytes(model: str) -> int:
    path = Path(model)
    if path.is_dir():
        return (path / "model.bin").stat().st_size
    return path.stat().st_size


def streaming_peak_rss(
    checkpoint: Path, lines: list[str], count: int, dtype: str, device: str = "cpu"
) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of `nmt-tie translate` (greedy) on `count` piped lines."""
    command = [sys.executable, "-m", "nmt_tie", "translate", "-c", str(checkpoint), "--beam", "1"]
    command += ["--dtype", dtype, "--device", device, "-o", "/dev/null"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, text=True)
    for i in range(count):
        process.stdin.write(lines[i % len(lines)] + "\n")
    process.stdin.close()
    _, _, usage = os.wait4(process.pid, 0)  # this child's own resource usage
    seconds = time.perf_counter() - start
    return usage.ru_maxrss / 1024, seconds


def exported(checkpoint: Path, quantization: str, directory: Path) -> Path:
    from nmt_tie.deploy import export_ctranslate2

    out = directory / f"{checkpoint.parent.name}-{checkpoint.stem}-{quantization}"
    export_ctranslate2(checkpoint, out, quantization, force=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help=f"comma-separated: {', '.join(ENGINES + COMPILED)}"
    )
    parser.add_argument("--beams", default="5", help="comma-separated beam sizes (1 = greedy)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="source tokens a batch (PyTorch rows)")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads of every engine (0: PyTorch's default)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (every engine)")
    parser.add_argument("--exports", type=Path, help="where to write the exports (default: a temporary dir)")
    parser.add_argument("--stream-lines", type=int, default=100_000)
    parser.add_argument("--stream-dtypes", default="fp32,bf16", help="'' to skip the memory test")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    multi30k = data_root() / "multi30k"
    lines = list(read_lines(multi30k / f"{TEST}.en.gz"))
    if args.row:
        row = json.loads(args.row)
        Path(args.row_out).write_text(
            json.dumps(
                measure(lines=lines, **row)  # the row's keys are measure's arguments
            )
        )
        return

    import sacrebleu

    references = list(read_lines(multi30k / f"{TEST}.de.gz"))
    engines = args.engines.split(",")
    export_dir = args.exports or Path(tempfile.mkdtemp(prefix="nmt-tie-exports-"))
    on_gpu = args.device.startswith("cuda")
    header = (
        f"{'model':<28}{'engine':<27}{'search':<8}{'pieces/s':>9}{'sent/s':>8}{'RSS MB':>8}"
        f"{'BLEU':>7}{'ratio':>7}{'same':>7}{'MB on disk':>11}" + (f"{'GPU MB':>8}" if on_gpu else "")
    )
    print(header, flush=True)
    for checkpoint in args.checkpoints:
        name = checkpoint.parent.name[-27:]
        models = {}
        for engine in engines:
            kind, _, precision = engine.partition("-")
            if kind == "pytorch":
                models[engine] = str(checkpoint)
            else:
                models[engine] = str(exported(checkpoint, precision, export_dir))
        for beam in map(int, args.beams.split(",")):
            reference_hyps = None
            for engine in engines:
                row = run_row(engine, models[engine], beam, args.max_tokens, args.threads, args.device)
                hyps = row["hypotheses"]
                if reference_hyps is None and engine == "pytorch-fp32":
                    reference_hyps = hyps
                bleu = sacrebleu.corpus_bleu(hyps, [references])
                same = (
                    "-"
                    if reference_hyps is None
                    else f"{sum(map(str.__eq__, hyps, reference_hyps)) / len(hyps):.1%}"
                )
                search = "greedy" if beam == 1 else f"beam {beam}"
                print(
                    f"{name:<28}{label(engine, row):<27}{search:<8}{row['pieces'] / row['seconds']:>9.0f}"
                    f"{len(lines) / row['seconds']:>8.1f}{row['peak_rss_mb']:>8.0f}{bleu.score:>7.2f}"
                    f"{bleu.sys_len / bleu.ref_len:>7.3f}{same:>7}{disk_bytes(models[engine]) / 1e6:>11.1f}"
                    + (gpu_column(row["gpu_peak_mb"]) if on_gpu else ""),
                    flush=True,
                )
                if row["graphs"] is not None:  # the warm-up pass compiles; the timed ones should not
                    print(f"{'':<28}({row['graphs']} graphs compiled)", flush=True)
    train = list(read_lines(multi30k / "train.en.gz"))
    for dtype in filter(None, args.stream_dtypes.split(",")):
        if not args.checkpoints:
            break
        # bf16 grows more than fp32 before levelling off: oneDNN keeps kernels per matrix shape
        small, _ = streaming_peak_rss(args.checkpoints[0], train, args.stream_lines // 10, dtype, args.device)
        large, seconds = streaming_peak_rss(args.checkpoints[0], train, args.stream_lines, dtype, args.device)
        print(
            f"nmt-tie translate from a pipe (greedy, {dtype}): peak RSS {small:.0f} MB for "
            f"{args.stream_lines // 10:,} lines, {large:.0f} MB for {args.stream_lines:,} lines "
            f"({args.stream_lines / seconds:.0f} lines/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
