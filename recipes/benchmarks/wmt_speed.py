"""What a WMT run will cost, measured before starting it (about 8 minutes on one GPU).

Trains each WMT recipe as it is configured (its global batch, `max_tokens: auto`, its model and
precision, at its vocabulary size) for a few dozen updates on WMT-like sentence lengths and
prints, per recipe and tying mode, eager and compiled:

- target tokens/s (non-pad target tokens incl. EOS, as fairseq's wps), updates/s, the batch
  per update and how it was made (workers x per-GPU batch x accumulation);
- MFU: the matrix-multiply FLOPs of an update (torch.utils.flop_counter) per second, divided by
  this GPU's measured bf16 peak (the best of several 8192 x 8192 products);
- peak GPU memory (torch.cuda.max_memory_allocated);
- the hours of the recipe's full budget (`max_updates` x the global batch) on 1 GPU, and on 8:
  one worker of 8 is measured as it would run there (its per-GPU batch and accumulation, from
  the same batch plan), times 8, without the gradient all-reduce (not measurable on one GPU).

The lengths are those of real news text: newstest2009-2012 En-De from ../shared/data/wmt
(or NMT_TIE_DATA), prepared with a joint BPE of 8,000 pieces (these 11,000 sentences are too
few to learn 32,000) and the recipe's length limit; the models get the recipe's vocabulary
size (32,000 or 90,000): the output layer, the loss, the embedding gradients and the optimizer
work on every row whatever ids the batches hold, so the cost is that of the full vocabulary.

With `--fairseq-venv DIR` (fairseq-fixed installed there, ../shared/peers.md) the same
Transformer-base (post-norm, shared embeddings, the same pieces padded to the same vocabulary
size, bf16 on a GPU) also trains in fairseq at about the same target tokens per update, and the
ratio of target tokens/s is printed.

    python recipes/benchmarks/wmt_speed.py --device cuda [--fairseq-venv PEER]
    python recipes/benchmarks/wmt_speed.py --device cpu --tiny      # the script checks itself
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

# recipe -> (config prefix, vocabulary size of its run.sh, its --max-len)
RECIPES = {
    "wmt14_en_de_transformer": ("transformer", 32000, 250),
    "wmt15_en_de": ("rnn", 90000, 80),
}
# (recipe, tie, compiled, workers the run is measured as one of)
DEFAULT_JOBS = [
    ("wmt14_en_de_transformer", "none", False, 1),
    ("wmt14_en_de_transformer", "all", False, 1),
    ("wmt14_en_de_transformer", "all", True, 1),
    ("wmt14_en_de_transformer", "all", False, 8),
    ("wmt15_en_de", "none", False, 1),
    ("wmt15_en_de", "all", False, 1),
    ("wmt15_en_de", "all", False, 8),
]
TINY = {  # --tiny: the script's own check on a CPU, in seconds
    "transformer": "emb_dim=32 ffn_dim=64 enc_layers=1 dec_layers=1 heads=2",
    "rnn": "emb_dim=32 hidden_dim=32",
}
WARMUP_UPDATES = 3  # with compile: the first shape's graph, then the dynamic-shape one
FAIRSEQ_BASE = (
    "--arch transformer --share-all-embeddings --dropout 0.1 --attention-dropout 0 --activation-dropout 0 "
    "--criterion label_smoothed_cross_entropy --label-smoothing 0.1 --optimizer adam --adam-betas (0.9,0.98) "
    "--lr 0.0007 --lr-scheduler inverse_sqrt --warmup-updates 4000 --num-workers 2 --disable-validation"
)


FAIRSEQ_TINY = [
    *("--encoder-layers", "1", "--decoder-layers", "1"),
    *("--encoder-embed-dim", "32", "--decoder-embed-dim", "32"),
    *("--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64"),
    *("--encoder-attention-heads", "2", "--decoder-attention-heads", "2"),
]


def news_data(root: Path, max_len: int, lines_per_set: int | None = None) -> Path:
    """newstest2009-2012 En-De (train) and 2013 (valid), a joint BPE of 8,000 pieces
    (`lines_per_set`: the first lines of each, for --tiny)."""
    import itertools

    from nmt_tie.data.locations import data_root
    from nmt_tie.data.prepare import PrepareOptions, prepare

    news = data_root() / "wmt" / "en-de"
    corpus = root / f"news-{max_len}"
    corpus.mkdir(parents=True, exist_ok=True)
    for lang in ("en", "de"):
        with open(corpus / f"train.{lang}", "w", encoding="utf-8") as out:
            for year in (2009, 2010, 2011, 2012):
                from nmt_tie.data.text import read_lines

                lines = itertools.islice(read_lines(news / f"newstest{year}.{lang}.gz"), lines_per_set)
                out.writelines(line + "\n" for line in lines)
    out = root / f"prepared-{max_len}"
    options = PrepareOptions(
        src="en", tgt="de", train=str(corpus / "train"), valid=str(news / "newstest2013"), out=out,
        vocab_size=2000 if lines_per_set else 8000, max_len=max_len,
    )  # fmt: skip
    prepare(options, log=lambda m: None)
    return out


def profile_updates(trainer, device: str, updates: int = 2, rows: int = 25) -> str:
    """Where an update's time goes: torch.profiler over `updates` updates, the operators with the
    most time of their own on the device (the GPU's kernels, or the CPU's), as a table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(updates):
            trainer.train_step()
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=rows)


def measure(
    recipe: str,
    tie: str,
    compiled: bool,
    as_one_of: int,
    updates: int,
    data: str,
    tiny: bool,
    device: str,
    profile: bool = False,
) -> dict:
    """Runs in a child process: the recipe's Trainer, `updates` timed updates (then, with
    `profile`, two more under the profiler)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from train_speed import matmul_peak

    from nmt_tie.config import load_config
    from nmt_tie.data.batching import ParallelData
    from nmt_tie.data.prepare import PreparedData
    from nmt_tie.devices import compiled_graph_count, resolve_device
    from nmt_tie.training import translation
    from nmt_tie.training.batch_plan import plan_batches
    from nmt_tie.training.trainer import Trainer
    from nmt_tie.training.translation import TranslationTask

    arch, vocab, _ = RECIPES[recipe]
    if not tiny:  # the recipe's vocabulary size (see the docstring)
        with_data_vocab = translation.configure_for_data

        def with_recipe_vocab(config, prepared):
            config = with_data_vocab(config, prepared)
            return dataclasses.replace(config, src_vocab_size=vocab, tgt_vocab_size=vocab)

        translation.configure_for_data = with_recipe_vocab
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"data={data}", f"save_dir={tmp}", f"device={device}", f"compile={compiled}"]
        overrides += ["max_updates=1000000", "valid_every=1000000", "save_every=0", "save_every_minutes=0"]
        overrides += ["log_every=1000000", *(TINY[arch].split() if tiny else [])]
        model_cfg, train_cfg = load_config(REPO / "recipes" / recipe / f"{arch}-{tie}.yaml", overrides)
        budget_updates = load_config(REPO / "recipes" / recipe / f"{arch}-{tie}.yaml")[1].max_updates
        if as_one_of > 1:  # one worker of `as_one_of`: its share of the global batch, as planned there
            prepared = PreparedData(data)
            train = ParallelData(prepared, "train")
            sized = translation.configure_for_data(model_cfg, prepared)
            plan = plan_batches(
                sized, train_cfg, train.src_lengths, train.tgt_lengths, as_one_of, resolve_device(device)
            )
            train_cfg = dataclasses.replace(
                train_cfg,
                max_tokens=plan.max_tokens,
                max_sentences=plan.max_sentences,
                update_freq=plan.update_freq,
                global_batch_tokens=0,
                global_batch_sentences=0,
            )
        trainer = Trainer(TranslationTask, model_cfg, train_cfg, log=lambda m: None)
        plan = trainer.task.batch_plan
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(1 if tiny else WARMUP_UPDATES):
            trainer.train_step()
        counter = FlopCounterMode(display=False)
        compiled_model, trainer.train_model = trainer.train_model, trainer.model
        with counter:  # counted eagerly (the counter does not see inside compiled graphs)
            trainer.train_step()
        trainer.train_model = compiled_model
        times, tokens = [], []
        for _ in range(updates):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _, _, n, _ = trainer.train_step()  # synchronizes once (its statistics)
            times.append(time.perf_counter() - start)
            tokens.append(n)
        profiled = profile_updates(trainer, device) if profile else None
        trainer.close()
        tokens_per_s = sum(tokens) / sum(times)
        peak = matmul_peak(
            "bf16" if device == "cuda" else trainer.precision, device, repeats=1 if tiny else 5
        )
        flops = counter.get_total_flops()
        global_tokens = train_cfg.global_batch_tokens or plan.tokens_per_update * as_one_of
        # a run's hours: its updates x the global batch's tokens, at this speed (x workers)
        hours = budget_updates * global_tokens / (tokens_per_s * as_one_of) / 3600
        return {
            "recipe": recipe,
            "tie": tie,
            "compiled": compiled,
            "as_one_of": as_one_of,
            "dtype": trainer.precision,
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "batch": plan.describe(),
            "tokens_per_update": statistics.mean(tokens),
            "target_tokens_per_s": tokens_per_s,
            "updates_per_s": updates / sum(times),
            "mfu": flops / statistics.median(times) / peak,
            "peak_tflops": peak / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
            "graphs": compiled_graph_count() if compiled else 0,
            "budget_updates": budget_updates,
            "global_tokens": global_tokens,
            "hours": hours,
            "profile": profiled,
        }


def fairseq_speed(venv: Path, data: Path, work: Path, updates: int, device: str, tiny: bool) -> dict:
    """fairseq's Transformer-base on the same pieces (the dictionary padded to the recipe's
    vocabulary size) at about 25,000 target tokens per update; target tokens/s after the first
    10 updates (--tiny: a tiny model on the data's vocabulary, after the first)."""
    from peers import write_pieces

    pieces = work / "pieces"
    src, tgt = write_pieces(data, pieces)
    listed = len((pieces / "dict.txt").read_text(encoding="utf-8").splitlines())
    vocab = listed + 4 if tiny else RECIPES["wmt14_en_de_transformer"][1]
    with open(pieces / "dict.txt", "a", encoding="utf-8") as handle:  # the recipe's vocabulary size
        handle.writelines(f"madeupword{i} 1\n" for i in range(vocab - 4 - listed))
    binarized = work / "fairseq-bin"
    subprocess.run(
        [str(venv / "bin" / "fairseq-preprocess"), "--source-lang", src, "--target-lang", tgt,
         "--trainpref", str(pieces / "train"), "--validpref", str(pieces / "valid"),
         "--destdir", str(binarized),
         "--joined-dictionary", "--srcdict", str(pieces / "dict.txt"), "--workers", "2"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    command = [
        str(venv / "bin" / "fairseq-train"),
        str(binarized),
        *FAIRSEQ_BASE.split(),
        *(FAIRSEQ_TINY if tiny else []),
    ]
    skip = 1 if tiny else 10  # fairseq logs a wps of 0 for its first update
    # fairseq's --max-tokens bounds max(source, target) padded per sentence: 18,500 x 2
    # accumulated comes to about 25,000 target tokens per update on news text (12,500 gave
    # 17,000; its wpb says what it was)
    command += ["--max-tokens", "18500", "--update-freq", "2", "--max-update", str(updates + skip)]
    # every update logged: whatever --updates, there are records after the skipped ones
    command += ["--log-format", "json", "--log-interval", "1", "--no-save"]
    command += ["--save-dir", str(work / "ckpt")]
    command += ["--bf16"] if device == "cuda" else ["--cpu"]
    log = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    records = [json.loads(line[line.index("{") :]) for line in log.splitlines() if "train_inner" in line]
    records = [r for r in records if int(r["num_updates"]) > skip]
    if not records:
        raise SystemExit(f"fairseq logged no update after the first {skip}:\n{log[-2000:]}")
    return {
        "target_tokens_per_s": statistics.mean(float(r["wps"]) for r in records),
        "tokens_per_update": statistics.mean(float(r["wpb"]) for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--updates", type=int, default=30, help="timed updates per job (after warm-up)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models, the data's vocabulary: a self-check"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled job")
    parser.add_argument(
        "--data-dir", type=Path, help="where to prepare the news data (default: a temporary one)"
    )
    parser.add_argument("--fairseq-venv", type=Path, help="a virtualenv with fairseq: also train it")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing each eager one-GPU job, profile two updates and print the operators "
        "that take the most device time (where an update's time goes)",
    )
    parser.add_argument(
        "--jobs",
        help="RECIPE:TIE:eager|compiled:WORKERS,... (default: both Transformer ties, compiled, 1/8, the RNN)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    started = time.time()
    jobs = DEFAULT_JOBS
    if args.jobs:
        fields = [job.split(":") for job in args.jobs.split(",")]
        jobs = [(recipe, tie, run == "compiled", int(workers)) for recipe, tie, run, workers in fields]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or Path(tmp)
        lines = 1500 if args.tiny else None
        prepared = {limit: news_data(root, limit, lines) for limit in {RECIPES[job[0]][2] for job in jobs}}
        results = []
        for recipe, tie, compiled, as_one_of in jobs:
            if compiled and args.no_compile:
                continue
            job = {
                "recipe": recipe, "tie": tie, "compiled": compiled, "as_one_of": as_one_of,
                "updates": args.updates, "data": str(prepared[RECIPES[recipe][2]]), "tiny": args.tiny,
                "device": args.device, "profile": args.profile and not compiled and as_one_of == 1,
            }  # fmt: skip
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
            output = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(job)],
                check=True, stdout=subprocess.PIPE, text=True, env=env,
            ).stdout  # fmt: skip
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "profile"}), flush=True)
        fairseq = None
        if args.fairseq_venv:
            work = root / "fairseq"
            work.mkdir(exist_ok=True)
            news = prepared.get(250) or news_data(root, 250, lines)
            fairseq = fairseq_speed(args.fairseq_venv, news, work, args.updates, args.device, args.tiny)
            print(json.dumps({"fairseq": fairseq}), flush=True)
    print(
        f"\n{'recipe':<25}{'tie':<6}{'run':<12}{'dtype':<6}{'tok/update':>11}{'tgt tok/s':>11}{'upd/s':>7}"
        f"{'MFU':>7}{'GPU GiB':>8}{'hours':>8}"
    )
    for r in results:
        run = ("compiled" if r["compiled"] else "eager") + (
            f" 1/{r['as_one_of']}" if r["as_one_of"] > 1 else ""
        )
        print(
            f"{r['recipe']:<25}{r['tie']:<6}{run:<12}{r['dtype']:<6}{r['tokens_per_update']:>11,.0f}"
            f"{r['target_tokens_per_s']:>11,.0f}{r['updates_per_s']:>7.2f}{r['mfu']:>7.1%}{r['peak_gib']:>8.1f}"
            f"{r['hours']:>8.1f}"
        )
    peak = results[0]["peak_tflops"] if results else 0
    print(
        f"\nhours: the recipe's max_updates x its global batch at this speed; '1/8' rows: one of 8 GPUs, "
        f"as it would run there, x 8 (without the gradient all-reduce). MFU against {peak:.0f} TFLOP/s, "
        f"this device's measured {'bf16' if args.device == 'cuda' else 'own-precision'} matrix-product peak."
    )
    for r in results:
        print(
            f"{r['recipe']} {r['tie']} {'compiled' if r['compiled'] else 'eager'} "
            f"1/{r['as_one_of']}: {r['batch']}"
        )
    for r in results:
        if r["profile"]:
            print(f"\n{r['recipe']} {r['tie']} eager, two updates profiled:\n{r['profile']}")
    if fairseq:
        ours = [r for r in results if r["recipe"] == "wmt14_en_de_transformer" and r["tie"] == "all"
                and r["as_one_of"] == 1]  # fmt: skip
        ratios = "; ".join(
            f"nmt-tie (tie all, {'compiled' if r['compiled'] else 'eager'}) "
            f"{r['target_tokens_per_s'] / fairseq['target_tokens_per_s']:.2f}x"
            for r in ours
        )
        print(
            f"fairseq Transformer-base: {fairseq['target_tokens_per_s']:,.0f} target tokens/s at "
            f"{fairseq['tokens_per_update']:,.0f} per update" + (f"; {ratios}" if ratios else "")
        )
    print(f"({time.time() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
