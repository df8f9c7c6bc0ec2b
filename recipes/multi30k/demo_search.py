"""The search behind `make demo`'s configuration (issue 40): which short-budget setting lets the
three-way tied model show, within the demo's minutes, what it shows at convergence?

Every candidate trains `tie: none` and `tie: all` with identical settings but `tie` (the
recipe's transformer-none.yaml / transformer-all.yaml plus the candidate's overrides), for
the same compute, and is judged on *validation* BLEU (val, 1,014 sentences) at the end of its
budget, greedy (the training run's own validation) and, with --beam, beam 5 (the demo's
search); test2016 is never looked at here. A candidate is kept only if the tied model is
level or ahead for every seed, greedy and beam 5.

    python recipes/multi30k/demo_search.py --candidates all --seeds 1        # the search
    python recipes/multi30k/demo_search.py --candidates demo --seeds 1-3 --beam   # the check

Runs resume and finished ones are skipped; the summary of every finished run in RUNS lands in
RUNS/summary.md and .json (`--collect` only summarizes; the search's logs and configs are
committed under results/demo-search/).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPE.parents[1]))

from nmt_tie.training.metrics import read_log  # noqa: E402


def shape(encoder_layers: int, decoder_layers: int) -> list[str]:
    """A small Transformer's overrides: the recipe's width, a feed-forward of 512."""
    return ["ffn_dim=512", f"enc_layers={encoder_layers}", f"dec_layers={decoder_layers}"]


NO_DROPOUT_LINEAR = ["dropout=0.0", "schedule=linear"]

# name -> (updates, overrides, training pairs: 0 = all 29,000); every candidate costs about
# the same (updates x batch).
CANDIDATES = {
    "recipe-600": (600, ["warmup=200"], 0),
    "lr0.004-600": (600, ["lr=0.004", "warmup=100"], 0),
    "unscaled-600": (600, ["warmup=200", "scale_embeddings=false"], 0),
    "dropout0-600": (600, ["warmup=200", "dropout=0.0"], 0),
    "batch8k-300": (300, ["max_tokens=8192", "lr=0.003", "warmup=100"], 0),
    "enc4dec1-600": (600, ["warmup=200", "enc_layers=4", "dec_layers=1"], 0),
    # equal time instead of equal updates: a faster shape makes more updates in the demo's minutes
    # (fp32, 1 thread, measured side by side: 4+1 layers 1.45x the recipe's 3+3, 2+1 layers with
    # a feed-forward of 512 2.26x)
    "e4d1-950": (950, ["warmup=317", "enc_layers=4", "dec_layers=1"], 0),
    "small-1500": (1500, ["warmup=500", "ffn_dim=512", "enc_layers=2", "dec_layers=1"], 0),
    "small-dropout0-1500": (
        1500,
        ["warmup=500", "ffn_dim=512", "enc_layers=2", "dec_layers=1", "dropout=0.0"],
        0,
    ),
    # the same, the learning rate decaying linearly to 0 at the end of the budget (a smoother
    # final model, as averaging gives; averaging itself lifted the untied model more)
    "small-dropout0-linear-1500": (
        1500,
        ["warmup=500", "ffn_dim=512", "enc_layers=2", "dec_layers=1", "dropout=0.0", "schedule=linear"],
        0,
    ),
    # a deeper decoder for the same time (fp32, 2 threads: 1+2 layers 0.88x the speed of 2+1, 2+2
    # 0.83x): with one decoder layer, the tied model's decoder input and output share a matrix
    # and the single layer must also turn "this word" into "the next word" (train loss 1.25 vs
    # the untied 0.74 in small-dropout0-linear-1500)
    "e1d2-dropout0-linear-1300": (1300, ["warmup=433", *shape(1, 2), *NO_DROPOUT_LINEAR], 0),
    "e2d2-dropout0-linear-1250": (1250, ["warmup=417", *shape(2, 2), *NO_DROPOUT_LINEAR], 0),
    # the same with a short warm-up, and a higher peak: more of the budget at a high learning rate
    # (at which, without the linear decay, the untied model varied more from seed to seed)
    "e2d2-dropout0-linear-warmup150-1250": (1250, ["warmup=150", *shape(2, 2), *NO_DROPOUT_LINEAR], 0),
    "e2d2-dropout0-linear-lr0.003-1250": (
        1250,
        ["lr=0.003", "warmup=150", *shape(2, 2), *NO_DROPOUT_LINEAR],
        0,
    ),
    "small-2000": (2000, ["warmup=667", "ffn_dim=512", "enc_layers=2", "dec_layers=1"], 0),
    # the last resort of the issue: fewer pairs, where the untied model's extra matrices overfit
    "subset8k-700": (700, ["warmup=233"], 8000),
    "subset4k-700": (700, ["warmup=233"], 4000),
    "small-subset16k-1500": (1500, ["warmup=500", "ffn_dim=512", "enc_layers=2", "dec_layers=1"], 16000),
}


BEAM_SCORE = "valid.beam5.score.json"


def seed_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1)) if "-" in text else list(range(1, int(first) + 1))


def train(data: Path, run_dir: Path, tie: str, seed: int, updates: int, overrides: list[str], threads: int):
    command = [sys.executable, "-m", "nmt_tie", "train", str(RECIPE / f"transformer-{tie}.yaml")]
    command += [f"data={data}", f"save_dir={run_dir}", f"seed={seed}", f"max_updates={updates}"]
    command += ["valid_every=100000", f"threads={threads}", *overrides]
    print("$ nmt-tie " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)


def subset_data(full: Path, runs: Path, pairs: int) -> Path:
    """The first `pairs` training pairs of Multi30k, prepared as the recipe prepares the whole."""
    if not pairs:
        return full
    from nmt_tie.data.locations import data_root
    from nmt_tie.data.text import read_lines

    multi30k = data_root() / "multi30k"
    corpus = runs / f"corpus-{pairs}"
    corpus.mkdir(parents=True, exist_ok=True)
    for lang in ("en", "de"):
        lines = list(itertools.islice(read_lines(multi30k / f"train.{lang}.gz"), pairs))
        (corpus / f"train.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out = runs / f"data-{pairs}"
    command = [sys.executable, "-m", "nmt_tie", "prepare", "--src", "en", "--tgt", "de"]
    command += ["--train", str(corpus / "train"), "--valid", str(multi30k / "val"), "--out", str(out)]
    subprocess.run([*command, "--vocab-size", "8000"], check=True)
    return out


def beam_valid(run_dir: Path, threads: int) -> None:
    """Validation BLEU of the run's final checkpoint with the demo's search (beam 5), in
    RUN/valid.beam5.score.json: the rule holds for greedy and beam search alike."""
    import os

    from nmt_tie.data.locations import data_root
    from nmt_tie.data.text import split_file

    score = run_dir / BEAM_SCORE
    if score.is_file() and score.stat().st_mtime > (run_dir / "best.pt").stat().st_mtime:
        return
    multi30k = data_root() / "multi30k"
    hypotheses = run_dir / "valid.beam5.hyp"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "nmt_tie", "translate", "-c", str(run_dir / "best.pt")]
    command += ["-i", str(split_file(multi30k / "val", "en")), "-o", str(hypotheses), "--beam", "5"]
    print("$ nmt-tie " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True, env=env)
    command = [sys.executable, "-m", "nmt_tie", "score", str(hypotheses)]
    command += [str(split_file(multi30k / "val", "de")), "--out", str(score)]
    subprocess.run(command, check=True)


def final_valid(run_dir: Path) -> dict | None:
    records = [r for r in read_log(run_dir) if r["type"] == "valid"]
    return records[-1] if records else None


def collect(runs: Path) -> dict:
    """{candidate: {tie: {seed: valid BLEU}}} of every run in RUNS that finished its budget,
    read from the runs' logs (so runs made side by side, or copied together, add up)."""
    results: dict = {}
    for name, (updates, _, _) in CANDIDATES.items():
        for run_dir in sorted((runs / name).glob("*-seed*")):
            tie, _, seed = run_dir.name.partition("-seed")
            valid = final_valid(run_dir)
            if valid is not None and valid["update"] >= updates:
                results.setdefault(name, {}).setdefault(tie, {})[seed] = valid["bleu"]
                if (run_dir / BEAM_SCORE).is_file():
                    beam = json.loads((run_dir / BEAM_SCORE).read_text())["bleu"]["score"]
                    results[name].setdefault("beam5", {}).setdefault(tie, {})[seed] = beam
    return results


def seed_gaps(by_tie: dict) -> dict[str, float]:
    """{seed: tied - untied valid BLEU} for the seeds both modes finished, in seed order."""
    seeds = sorted(set(by_tie.get("none", {})) & set(by_tie.get("all", {})), key=int)
    return {seed: by_tie["all"][seed] - by_tie["none"][seed] for seed in seeds}


def listed_gaps(by_tie: dict) -> str:
    """The per-seed leads as the summary and the demo print them: "+0.78, +1.24, +0.65"."""
    return ", ".join(f"{gap:+.2f}" for gap in seed_gaps(by_tie).values())


def spreads(by_tie: dict) -> tuple[str, str]:
    """(untied, tied) BLEU over the seeds both modes finished, as mean ± sd."""
    seeds = list(seed_gaps(by_tie))
    untied, tied = (describe([by_tie[tie][seed] for seed in seeds]) for tie in ("none", "all"))
    return untied, tied


def summary_table(results: dict) -> str:
    lines = [
        "| candidate | updates | overrides | seeds | valid BLEU untied | valid BLEU three-way tied "
        "| tied - untied, per seed | beam 5: untied / tied | beam 5: tied - untied |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, by_tie in results.items():
        seeds = list(seed_gaps(by_tie))
        if not seeds:
            continue
        updates, overrides, pairs = CANDIDATES[name]
        overrides = [*overrides, f"(first {pairs:,} pairs)"] if pairs else overrides
        untied, tied = spreads(by_tie)
        beam = by_tie.get("beam5", {})
        beam_columns = f"{' / '.join(spreads(beam))} | {listed_gaps(beam)}" if seed_gaps(beam) else "- | -"
        lines.append(
            f"| {name} | {updates} | {' '.join(overrides)} | {','.join(seeds)} | {untied} | {tied} | "
            f"{listed_gaps(by_tie)} | {beam_columns} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="prepared Multi30k En-De (run.py makes it)")
    parser.add_argument("--runs", type=Path, default=Path("runs/demo-search"))
    parser.add_argument("--candidates", default="all", help="comma-separated names, 'all' or 'demo'")
    parser.add_argument("--seeds", default="1", help="N (1..N) or A-B")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--beam",
        action="store_true",
        help="also translate validation with beam 5 (the demo's search) from each finished run",
    )
    parser.add_argument(
        "--collect", action="store_true", help="train nothing: summarize the finished runs in RUNS"
    )
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run (e.g. dtype=fp32)")
    args = parser.parse_args()
    if not args.collect:
        if args.data is None:
            parser.error("--data is needed to train (or give --collect)")
        if args.candidates == "all":
            names = list(CANDIDATES)
        elif args.candidates == "demo":
            from run import DEMO_CANDIDATE

            names = [DEMO_CANDIDATE]
        else:
            names = args.candidates.split(",")
        for name in names:
            updates, overrides, pairs = CANDIDATES[name]
            data = subset_data(args.data, args.runs, pairs)
            for seed in seed_range(args.seeds):
                for tie in ("none", "all"):
                    run_dir = args.runs / name / f"{tie}-seed{seed}"
                    valid = final_valid(run_dir)
                    if valid is None or valid["update"] < updates:
                        train(data, run_dir, tie, seed, updates, [*overrides, *args.overrides], args.threads)
                    if args.beam:
                        beam_valid(run_dir, args.threads)
    results = collect(args.runs)
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    table = summary_table(results)
    (args.runs / "summary.md").write_text(table)
    print(table)


def describe(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


if __name__ == "__main__":
    main()
