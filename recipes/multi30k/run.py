"""Multi30k recipe: how much smaller does tying make the model, and at what BLEU?

Prepares one joint BPE vocabulary (8000 pieces), trains `tie: none`, `decoder` and `all`
with otherwise identical settings, translates test2016 with beam search, scores it with
sacrebleu and prints the comparison table (`nmt-tie compare`, also written as Markdown and
a PNG plot). Every step is an `nmt-tie` command, printed before it runs; re-running the
recipe resumes unfinished training runs and skips finished ones.

    python recipes/multi30k/run.py --demo                    # En-De, untied and three-way tied, ~12 min
    python recipes/multi30k/run.py --pair en-de --arch transformer --seeds 3 --max-updates 1000
    python recipes/multi30k/run.py --pair en-fr --arch rnn --max-time 10
    python recipes/multi30k/run.py --converge --seeds 3          # early stopping, averaging
    python recipes/multi30k/run.py --converge --seeds 3-3        # the third seed alone

Data: Multi30k task 1 from NMT_TIE_DATA or ../shared/data (`nmt-tie data fetch
multi30k_en_de --dest DIR` downloads it; then set NMT_TIE_DATA=DIR).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

from nmt_tie.data.locations import data_root
from nmt_tie.data.text import split_file

RECIPE = Path(__file__).resolve().parent
TEST_SET = "test_2016_flickr"
# The converged results (README's Results), printed under the demo's own short-budget table.
CONVERGED_TABLE = RECIPE / "results" / "converged" / "table.md"
# The search behind the demo's configuration (demo_search.py), its seeds printed with the demo.
DEMO_SEARCH = RECIPE / "results" / "demo-search" / "summary.json"


# The demo's configuration, chosen by demo_search.py on validation (README here): a small,
# fast Transformer (2+2 layers, feed-forward 512) without dropout, 1,250 updates with the
# learning rate decaying linearly to 0, untied and three-way tied with otherwise identical
# settings.
DEMO_CANDIDATE = "e2d2-dropout0-linear-1250"
DEMO_TIES = "none,all"


def demo_settings(max_updates: int | None = None) -> tuple[int, list[str]]:
    """(updates, overrides) of the demo: the chosen search candidate's, one validation at the
    end; with another budget, the warm-up kept at a third of it."""
    search = _sibling("demo_search")
    updates, overrides, pairs = search.CANDIDATES[DEMO_CANDIDATE]
    assert not pairs, "the demo trains on the whole corpus"
    if max_updates and max_updates != updates:
        overrides = [o for o in overrides if not o.startswith("warmup=")] + [
            f"warmup={max(1, max_updates // 3)}"
        ]
    return max_updates or updates, ["valid_every=100000", *overrides]


def demo_description() -> str:
    """The demo's model and schedule in words, from the chosen candidate's overrides."""
    settings = dict(item.split("=", 1) for item in demo_settings()[1])

    def layers(count: str, side: str) -> str:
        return f"{count} {side} layer{'s' if count != '1' else ''}"

    words = [layers(settings["enc_layers"], "encoder"), layers(settings["dec_layers"], "decoder")]
    words.append(f"feed-forward {settings['ffn_dim']}")
    if float(settings.get("dropout", "0.1")) == 0:
        words.append("no dropout")
    if settings.get("schedule") == "linear":
        words.append("the learning rate decaying linearly to 0")
    return f"a small Transformer ({', '.join(words)})"


def _sibling(name: str):
    """A script beside this one, as a module."""
    spec = importlib.util.spec_from_file_location(f"multi30k_{name}", RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def converge_overrides(args) -> list[str]:
    """Early stopping on validation BLEU of the same beam search as the final scores,
    numbered checkpoints at every validation for averaging, and last.pt every 10 minutes as
    well: a run of hours killed between validations (500 updates, up to half an hour on one
    CPU thread) resumes from there instead."""
    return [
        f"patience={args.patience}",
        "valid_every=500",
        f"valid_beam={args.beam}",
        "save_every=500",
        f"keep_last={args.average + args.patience}",
        "save_every_minutes=10",
    ]


def seed_range(text: str) -> list[int]:
    """`--seeds`: "N" is seeds 1 to N, "A-B" seeds A to B."""
    first, dash, last = text.partition("-")
    try:
        seeds = list(range(int(first), int(last) + 1)) if dash else list(range(1, int(first) + 1))
    except ValueError:
        seeds = []
    if not seeds or seeds[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give N (seeds 1 to N) or A-B with 1 <= A <= B")
    return seeds


def run(*args: str) -> None:
    command = [sys.executable, "-m", "nmt_tie", *args]
    print("$ nmt-tie " + " ".join(shlex.quote(a) for a in args), flush=True)
    code = subprocess.run(command).returncode
    if code != 0:  # the command has said why; a traceback of this script would bury it
        sys.exit(code)


def up_to_date(output: Path, source: Path) -> bool:
    return output.exists() and source.exists() and output.stat().st_mtime > source.stat().st_mtime


def check_overrides(parser: argparse.ArgumentParser, configs: list[Path], overrides: list[str]) -> None:
    """An override a config refuses (an unknown key, a bad value), said before the first step
    runs rather than by the first training, after the steps before it."""
    from nmt_tie.config import load_config
    from nmt_tie.errors import UserError

    for config in configs:
        try:
            load_config(config, overrides)
        except UserError as err:
            parser.error(f"{config.name}: {err}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", default="en-de", choices=["en-de", "en-fr"])
    parser.add_argument("--arch", default="transformer", choices=["transformer", "rnn"])
    parser.add_argument("--ties", default="none,decoder,all", help="tying modes to train")
    parser.add_argument(
        "--seeds",
        type=seed_range,
        default=[1],
        help="seeds per tying mode: N for seeds 1 to N, or A-B for seeds A to B (e.g. 3-3 to run "
        "the third seed alone, on another machine or after the first two)",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-updates", type=int, help="updates per run (config default: 1000)")
    budget.add_argument("--max-time", type=float, help="minutes of training per run")
    parser.add_argument(
        "--converge",
        action="store_true",
        help="train to convergence: validate every 500 updates with beam search, stop after "
        "--patience validations without a better BLEU (at most 30,000 updates), and also score the "
        "average of the --average checkpoints nearest the best one",
    )
    parser.add_argument("--patience", type=int, default=5, help="with --converge (default 5)")
    parser.add_argument("--average", type=int, default=5, help="with --converge: checkpoints averaged")
    parser.add_argument(
        "--export",
        default="int8",
        help="also export each model to CTranslate2 with this quantization, translate the test set "
        "through the export and report the shipped size (default int8; 'none' to skip; needs "
        "`pip install nmt-tie[ctranslate2]`)",
    )
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--lenpen", type=float, default=1.0)
    parser.add_argument("--runs", type=Path, default=Path("runs/multi30k"), help="output directory")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="En-De, a small Transformer (2+2 layers, no dropout) untied and three-way tied, 1,250 "
        "updates each (about 6 minutes each on 2 cores in fp32); its configuration: README here",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra config overrides")
    args = parser.parse_args()
    for tie in args.ties.split(","):
        if not (RECIPE / f"{args.arch}-{tie}.yaml").is_file():
            parser.error(f"--ties: no recipe {args.arch}-{tie}.yaml here; give some of none,decoder,all")
    if args.demo:
        args.pair, args.arch, args.seeds = "en-de", "transformer", [1]
        if args.ties == parser.get_default("ties"):
            args.ties = DEMO_TIES  # decoder-tied stays in the converged tables
        updates, demo_overrides = demo_settings(args.max_updates)
        if not args.max_time:
            args.max_updates = updates  # the same budget for both
        args.overrides = [*demo_overrides, *args.overrides]
    if args.converge:
        args.max_updates = args.max_updates or 30000
        args.overrides = [*converge_overrides(args), *args.overrides]
    configs = [RECIPE / f"{args.arch}-{tie}.yaml" for tie in args.ties.split(",")]
    check_overrides(parser, configs, args.overrides)

    src, tgt = args.pair.split("-")
    multi30k = data_root() / "multi30k"
    export = None if args.export == "none" else args.export
    if export and args.arch != "transformer":
        print("--export: CTranslate2 has no counterpart of the paper's RNN; not exporting", flush=True)
        export = None
    if export and importlib.util.find_spec("ctranslate2") is None:
        print("--export: ctranslate2 is not installed (pip install 'nmt-tie[ctranslate2]'); not exporting")
        export = None
    data_dir = args.runs / f"data-{args.pair}"
    run(
        "prepare",
        "--src",
        src,
        "--tgt",
        tgt,
        "--train",
        str(multi30k / "train"),
        "--valid",
        str(multi30k / "val"),
        "--test",
        str(multi30k / TEST_SET),
        "--out",
        str(data_dir),
        "--vocab-size",
        "8000",
    )

    budget = []
    if args.max_updates:
        budget = [f"max_updates={args.max_updates}", "max_time=0"]
    elif args.max_time:
        budget = [f"max_time={args.max_time}", "max_updates=0"]
    run_dirs = []
    for seed in args.seeds:
        for tie in args.ties.split(","):
            run_dir = args.runs / args.pair / f"{args.arch}-{tie}-seed{seed}"
            run_dirs.append(run_dir)
            config = RECIPE / f"{args.arch}-{tie}.yaml"
            run(
                "train",
                str(config),
                f"data={data_dir}",
                f"save_dir={run_dir}",
                f"seed={seed}",
                *budget,
                *args.overrides,
            )
            checkpoints = {TEST_SET: run_dir / "best.pt"}
            if args.converge:
                checkpoints[f"{TEST_SET}.averaged"] = average_around_best(run_dir, args.average)
            for name, checkpoint in checkpoints.items():
                translate_and_score(checkpoint, run_dir, name, multi30k, src, tgt, args)
            if export:
                shipped = export_model(checkpoints[TEST_SET], run_dir / f"export-{export}", export)
                name = f"{TEST_SET}.export-{export}"
                translate_and_score(shipped, run_dir, name, multi30k, src, tgt, args)
    report = args.runs / f"report-{args.pair}-{args.arch}.md"
    run("compare", *map(str, run_dirs), "-o", str(report), "--plot", str(report.with_suffix(".png")))
    print(f"\ntable: {report}\nplot:  {report.with_suffix('.png')}")
    if args.demo:
        print_demo_seeds()
    if args.demo and CONVERGED_TABLE.is_file():
        print(
            f"\nThe demo trains {demo_description()} for {args.max_updates or 'a few'} updates, untied "
            "and three-way tied, with otherwise identical settings: a configuration made for a short "
            "budget (recipes/multi30k/"
            "README.md, 'The demo'). The recipe's models trained to convergence "
            f"({CONVERGED_TABLE.parent.relative_to(RECIPE.parents[1])}/; full experiment: python "
            "recipes/multi30k/run.py --converge --seeds 3 dropout=0.2):\n"
        )
        print(CONVERGED_TABLE.read_text().strip())


def print_demo_seeds() -> None:
    """The demo is one seed of each model; say what the search's seeds of its configuration gave."""
    if not DEMO_SEARCH.is_file():
        return
    by_tie = json.loads(DEMO_SEARCH.read_text()).get(DEMO_CANDIDATE, {})
    search = _sibling("demo_search")
    by_seed, beam_by_seed = search.seed_gaps(by_tie), search.seed_gaps(by_tie.get("beam5", {}))
    if not by_seed:
        return
    gaps = list(by_seed.values()) + list(beam_by_seed.values())
    ahead = sum(gap >= 0 for gap in gaps)
    where = "in each" if ahead == len(gaps) else f"in {ahead} of {len(gaps)}"
    said = f"{search.listed_gaps(by_tie)} BLEU greedy"
    if beam_by_seed:
        said += f" and {search.listed_gaps(by_tie['beam5'])} with beam 5"
    untied, tied = search.spreads(by_tie)
    print(
        f"\nOne run of each model, and another seed (or thread count, or precision) moves each score. "
        f"The search ran this configuration with seeds {', '.join(by_seed)} (validation, greedy: "
        f"untied {untied}, three-way tied {tied}): the tied model was level with or "
        f"ahead of the untied one {where}, by {said} "
        f"({DEMO_SEARCH.parent.relative_to(RECIPE.parents[1])}/)."
    )


def checkpoints_around(updates: list[int], best_update: int, count: int) -> list[int]:
    """The `count` checkpoint updates nearest the best one, on both sides (the earlier of two
    equally near first), in order. Early stopping trains `patience` validations past the best;
    a run that peaked early would otherwise average in its undertrained start."""
    nearest = sorted(updates, key=lambda update: (abs(update - best_update), update))[:count]
    return sorted(nearest)


def average_around_best(run_dir: Path, count: int) -> Path:
    """The average of the `count` numbered checkpoints nearest best.pt (see checkpoints_around);
    made again when best.pt is newer or the checkpoints chosen differ."""
    import torch

    best_update = torch.load(run_dir / "best.pt", weights_only=True)["trainer"]["update"]
    numbered = {int(p.stem.split("_")[1]): p for p in run_dir.glob("checkpoint_*.pt")}
    chosen = [str(numbered[u]) for u in checkpoints_around(list(numbered), best_update, count)]
    averaged = run_dir / "averaged.pt"
    if up_to_date(averaged, run_dir / "best.pt"):
        previous = torch.load(averaged, weights_only=True, map_location="cpu").get("averaged_from")
        if previous == chosen:
            return averaged
    run("average", *chosen, "-o", str(averaged))
    return averaged


def export_model(checkpoint: Path, out: Path, quantization: str) -> Path:
    if not up_to_date(out / "model.bin", checkpoint):
        run("export", str(checkpoint), "--out", str(out), "--quantization", quantization, "--force")
    return out


def translate_and_score(checkpoint: Path, run_dir: Path, name: str, multi30k: Path, src, tgt, args):
    hypotheses = run_dir / f"{name}.hyp"
    score = run_dir / f"{name}.score.json"
    if up_to_date(score, checkpoint):
        print(f"{score} is up to date: not translating again", flush=True)
        return
    run(
        "translate",
        "-c",
        str(checkpoint),
        "-i",
        str(split_file(multi30k / TEST_SET, src)),
        "-o",
        str(hypotheses),
        "--beam",
        str(args.beam),
        "--lenpen",
        str(args.lenpen),
        *([] if checkpoint.is_dir() else ["--dtype", "bf16"]),  # an export runs in its own type
    )
    run("score", str(hypotheses), str(split_file(multi30k / TEST_SET, tgt)), "--out", str(score))


if __name__ == "__main__":
    main()
