"""The converged results' tables, written from the committed run files alone.

`results/converged/runs/<pair>/<arch>-<tie>-seed<N>/` holds what each converged run left
(config.yaml, log.jsonl, *.score.json). From them this script writes

- `results/converged/table.md`: per pair and architecture, one row per tying mode with the
  mean ± sd over its seeds (what `run.py --demo` prints and README's Results show), and
- `results/converged/runs.md`: one row per run.

Tables are never edited by hand, so a new seed is one command away and a rounding slip cannot
creep in:

    python recipes/multi30k/tables.py            # rewrite both files
    python recipes/multi30k/tables.py --check    # exit 1 if they are out of date
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from nmt_tie.compare import RunSummary, format_or_dash, mean_spread, summarize_run

RECIPE = Path(__file__).resolve().parent
CONVERGED = RECIPE / "results" / "converged"
TEST_SET = "test_2016_flickr"
AVERAGED = f"{TEST_SET}.averaged"
INT8 = f"{TEST_SET}.export-int8"
# Tables in this order; a pair or architecture without runs is left out.
SECTIONS = [("en-de", "transformer"), ("en-fr", "transformer"), ("en-de", "rnn")]
TIE_ORDER = ["none", "decoder", "src-tgt", "all"]
TIE_LABELS = {
    "none": "untied (tie: none)",
    "decoder": "decoder-tied (tie: decoder)",
    "src-tgt": "encoder-decoder inputs tied (tie: src-tgt)",
    "all": "three-way tied (tie: all)",
}
PAIR_NAMES = {"en-de": "En-De", "en-fr": "En-Fr"}
TITLES = {"transformer": "{pair} Transformer", "rnn": "Paper's RNN {pair}"}
RUN_NAME = re.compile(r"[a-z]+-[a-z-]+-seed\d+$")  # <arch>-<tie>-seed<N>


@dataclass
class ConvergedRun:
    summary: RunSummary
    pair: str
    config: dict
    ratios: dict[str, float]  # score file stem -> hypothesis/reference length ratio

    @property
    def best_update(self) -> int:
        """The first validation with the best BLEU (best.pt is only replaced by a better one)."""
        best = max(bleu for _, bleu in self.summary.valid_curve)
        return next(update for update, bleu in self.summary.valid_curve if bleu == best)

    def score(self, test: str, metric: str = "bleu") -> float | None:
        return self.summary.tests.get(test, {}).get(metric)

    def stopped(self) -> str:
        capped = ", the cap" if self.summary.updates >= self.config["max_updates"] else ""
        return f"{self.summary.updates:,}{capped} ({self.best_update:,})"


def length_ratio(score_file: Path) -> float:
    """sacreBLEU's hypothesis/reference length ratio, from the score's text."""
    text = json.loads(score_file.read_text())["bleu"]["text"]
    match = re.search(r"ratio = ([0-9.]+)", text)
    if match is None:
        raise ValueError(f"{score_file}: no length ratio in {text!r}")
    return float(match.group(1))


def load_runs(runs_root: Path) -> list[ConvergedRun]:
    runs = []
    for pair_dir in sorted(p for p in runs_root.iterdir() if p.is_dir()):
        for run_dir in sorted(p for p in pair_dir.iterdir() if RUN_NAME.match(p.name)):
            summary = summarize_run(run_dir)
            ratios = {
                f.name.removesuffix(".score.json"): length_ratio(f) for f in run_dir.glob("*.score.json")
            }
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            runs.append(ConvergedRun(summary, pair_dir.name, config, ratios))
    return sorted(runs, key=_order)


def _order(run: ConvergedRun) -> tuple:
    return (run.pair, run.summary.arch, TIE_ORDER.index(run.summary.tie), run.summary.seed)


def _by_tie(runs: list[ConvergedRun]) -> list[tuple[str, list[ConvergedRun]]]:
    ties = sorted({r.summary.tie for r in runs}, key=TIE_ORDER.index)
    return [(tie, [r for r in runs if r.summary.tie == tie]) for tie in ties]  # runs come in _order


def _seeds(runs: list[ConvergedRun]) -> str:
    seeds = [r.summary.seed for r in runs]
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def _parameters(run: ConvergedRun) -> str:
    text = f"{run.summary.params:,}"
    return text if run.summary.tie == "none" else f"{text} (-{run.summary.reduction:.1%})"


def _ratio_range(runs: list[ConvergedRun]) -> str:
    ratios = [r.ratios[t] for r in runs for t in (TEST_SET, AVERAGED) if t in r.ratios]
    return f"{min(ratios):.3f}-{max(ratios):.3f}"


def _one_value(runs: list[ConvergedRun], key: str) -> object:
    values = {str(r.config[key]) for r in runs}
    if len(values) != 1:
        raise ValueError(f"the runs of one table differ in {key}: {sorted(values)}")
    return runs[0].config[key]


def summary_table(pair: str, arch: str, runs: list[ConvergedRun]) -> str:
    groups = _by_tie(runs)
    most = max(groups, key=lambda group: len(group[1]))[1]
    several = len(most) > 1
    title = TITLES.get(arch, "{pair} " + arch).format(pair=PAIR_NAMES.get(pair, pair))
    title += ", trained to convergence"
    title += f" ({len(most)} seeds, mean ± sd)" if several else f" ({_seeds(most)})"
    header = [
        title,
        "parameters",
        "test2016 BLEU: best.pt",
        "averaged (5 checkpoints nearest the best)",
        "chrF (best.pt)",
        "length ratio (all runs)" if several else "length ratio",
        "stopped at (best)" + (", seeds " + " / ".join(str(r.summary.seed) for r in most) if several else ""),
    ]
    columns = [(TEST_SET, "bleu"), (AVERAGED, "bleu"), (TEST_SET, "chrf")]
    scores = {tie: [_values(members, test, metric) for test, metric in columns] for tie, members in groups}
    means = {tie: [statistics.mean(v) if v else None for v in lists] for tie, lists in scores.items()}
    best = [max(m[i] for m in means.values() if m[i] is not None) for i in range(len(columns))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for tie, members in groups:
        label = TIE_LABELS.get(tie, tie)
        if [r.summary.seed for r in members] != [r.summary.seed for r in most]:
            label += f", {_seeds(members)}"
        cells = [label, _parameters(members[0])]
        for values, mean, top in zip(scores[tie], means[tie], best, strict=True):
            text = mean_spread(values)
            cells.append(f"**{text}**" if len(groups) > 1 and mean == top else text)
        cells += [_ratio_range(members), " / ".join(r.stopped() for r in members)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + _footnote(arch, runs, most)


def _values(runs: list[ConvergedRun], test: str, metric: str) -> list[float]:
    return [v for v in (r.score(test, metric) for r in runs) if v is not None]


def _footnote(arch: str, runs: list[ConvergedRun], most: list[ConvergedRun]) -> str:
    seeds = _seeds(most)
    text = (
        f"{seeds[0].upper()}{seeds[1:]}, dropout {_one_value(runs, 'dropout')}, validation every "
        f"{_one_value(runs, 'valid_every')} updates with beam {_one_value(runs, 'valid_beam')}, "
        f"early stopping after {_one_value(runs, 'patience')} validations without a better BLEU"
    )
    if arch == "rnn":
        text += (
            f"; conditional GRU, embeddings {_one_value(runs, 'emb_dim')}, "
            f"GRU {_one_value(runs, 'hidden_dim')}"
        )
    return text + "."


def runs_table(runs: list[ConvergedRun]) -> str:
    header = [
        "run",
        "parameters",
        "valid BLEU (best)",
        "test2016 BLEU: best.pt",
        "averaged",
        "int8 export",
        "chrF: best / averaged",
        "length ratio: best / averaged",
        "stopped at (best)",
    ]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for run in runs:
        cells = [
            f"{run.pair}/{run.summary.name}",
            _parameters(run),
            format_or_dash(run.summary.best_valid_bleu, ".2f"),
            format_or_dash(run.score(TEST_SET), ".2f"),
            format_or_dash(run.score(AVERAGED), ".2f"),
            format_or_dash(run.score(INT8), ".2f"),
            " / ".join(format_or_dash(run.score(test, "chrf"), ".2f") for test in (TEST_SET, AVERAGED)),
            " / ".join(f"{run.ratios[t]:.3f}" if t in run.ratios else "-" for t in (TEST_SET, AVERAGED)),
            run.stopped(),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(runs_root: Path) -> dict[str, str]:
    """File name -> text, for table.md and runs.md."""
    runs = load_runs(runs_root)
    sections = []
    for pair, arch in SECTIONS:
        chosen = [r for r in runs if r.pair == pair and r.summary.arch == arch]
        if chosen:
            sections.append(summary_table(pair, arch, chosen))
    generated = "<!-- written by recipes/multi30k/tables.py from runs/; do not edit -->\n"
    runs_md = (
        "# Every converged run\n\n" + generated + "\n"
        "Written from each run's files in `runs/` (dropout, schedule and the rest in its config.yaml).\n\n"
        + runs_table(runs)
        + "\n"
    )
    return {"table.md": "\n\n".join(sections) + "\n", "runs.md": runs_md}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the files are up to date")
    parser.add_argument("--results", type=Path, default=CONVERGED, help="the converged results directory")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render(args.results / "runs").items():
        path = args.results / name
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
            print(f"wrote {path}")
    if args.check and stale:
        print("out of date (run recipes/multi30k/tables.py): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
