"""Penn Treebank language models: Press & Wolf (2017) Table 6, and their embeddings (Table 3).

Trains the small model (2 x 200 LSTM, no dropout, 13 epochs) untied, tied, with projection
regularization, and tied with projection regularization; scores the test set with
`nmt-tie lm eval` (one stream, exact), evaluates the input and output embeddings on the
word-similarity sets, and prints the results beside the paper's.

    python recipes/ptb/run.py                       # the four small models (~2 hours on 2 cores)
    python recipes/ptb/run.py --size large --variants none,all      # on a GPU

Data: ptb/ and wordsim/ from NMT_TIE_DATA or ../shared/data (Mikolov's PTB:
http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from nmt_tie.data.locations import data_root

RECIPE = Path(__file__).resolve().parent
PAPER = {  # Table 6, small model: test perplexity and parameters
    "small-none": (114.5, 4.65e6),
    "small-all": (112.4, 2.65e6),
    "small-none-pr": (111.7, 4.69e6),
    "small-all-pr": (100.9, 2.69e6),
}
LABELS = {"none": "untied", "all": "tied", "none-pr": "untied + PR", "all-pr": "tied + PR"}


def nmt_tie(*args: str, capture: bool = False) -> str:
    print("$ nmt-tie " + " ".join(shlex.quote(a) for a in args), flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "nmt_tie", *args],
        check=True,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    return result.stdout if capture else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", choices=["small", "large"])
    parser.add_argument("--variants", default="none,all,none-pr,all-pr")
    parser.add_argument("--runs", type=Path, default=Path("runs/ptb"))
    parser.add_argument("--report-only", action="store_true", help="only the table and plot of finished runs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    names = [f"{args.size}-{variant}" for variant in args.variants.split(",")]
    if args.report_only:
        rows = [
            json.loads((args.runs / n / "results.json").read_text())
            for n in names
            if (args.runs / n / "results.json").exists()
        ]
    else:
        rows = [train_and_evaluate(name, args.runs / name, args.overrides) for name in names]
    table = results_table(rows)
    (args.runs / f"results-{args.size}.md").write_text(table + "\n")
    if rows:
        results_plot(rows, args.runs, args.runs / f"results-{args.size}.png")
    print("\n" + table)


def train_and_evaluate(name: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train one variant (resuming if it was stopped), then score it unless already scored."""
    ptb = data_root() / "ptb"
    texts = {split: ptb / f"ptb.{split}.txt.gz" for split in ("train", "valid", "test")}
    nmt_tie(
        "lm",
        "train",
        str(RECIPE / f"{name}.yaml"),
        f"train_text={texts['train']}",
        f"valid_text={texts['valid']}",
        f"test_text={texts['test']}",
        f"save_dir={run_dir}",
        *overrides,
    )
    best = run_dir / "best.pt"
    results = run_dir / "results.json"
    if results.exists() and results.stat().st_mtime > best.stat().st_mtime:
        print(f"{results} is up to date: not evaluating again", flush=True)
        return json.loads(results.read_text())
    test = json.loads(nmt_tie("lm", "eval", str(best), "--text", str(texts["test"]), "--json", capture=True))
    similarity = {}
    for which in ("input", "output"):
        out = nmt_tie(
            "embeddings",
            str(best),
            "--which",
            which,
            "--eval",
            str(data_root() / "wordsim"),
            "--json",
            capture=True,
        )
        similarity[which] = json.loads(out)
    log = _read_log(run_dir)
    result = {
        "variant": name,
        "valid_ppl": min(r["ppl"] for r in log if r["type"] == "valid"),
        "test_ppl": test["ppl"],
        "minutes": round(max(r.get("elapsed", 0) for r in log) / 60, 1),
        "params": _params(best),
        "similarity": similarity,
    }
    results.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _params(checkpoint: Path) -> int:
    from nmt_tie.checkpoint import load_checkpoint
    from nmt_tie.model.lstm_lm import LMConfig, LSTMLanguageModel
    from nmt_tie.report import count_unique

    return count_unique(LSTMLanguageModel(LMConfig(**load_checkpoint(checkpoint)["model_config"])))


def results_table(rows: list[dict]) -> str:
    lines = [
        "| model | params | valid ppl | test ppl | paper test ppl | paper params | test vs paper | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper_ppl, paper_params = PAPER.get(r["variant"], (None, None))
        label = LABELS.get(r["variant"].split("-", 1)[1], r["variant"])
        versus = f"{(r['test_ppl'] / paper_ppl - 1):+.1%}" if paper_ppl else "-"
        paper_size = f"{paper_params / 1e6:.2f}M" if paper_params else "-"
        lines.append(
            f"| {label} | {r['params'] / 1e6:.2f}M | {r['valid_ppl']:.1f} | {r['test_ppl']:.1f} | "
            f"{paper_ppl or '-'} | {paper_size} | {versus} | {r['minutes']} |"
        )
    lines += [
        "",
        "Word similarity (Spearman) of the input and output embeddings:",
        "",
        "| model | embedding | simlex999 | verb143 | men | rw |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = LABELS.get(r["variant"].split("-", 1)[1], r["variant"])
        tied = "-all" in r["variant"]  # one matrix: input and output are the same
        for which, scores in r["similarity"].items():
            if tied and which == "input":
                continue
            which = "tied" if tied else which
            cells = " | ".join(
                f"{scores[k]['spearman']:.3f}" if k in scores else "-"
                for k in ("simlex999", "verb143", "men", "rw")
            )
            lines.append(f"| {label} | {which} | {cells} |")
    return "\n".join(lines)


VARIANT_COLORS = {"none": "tab:red", "all": "tab:green", "none-pr": "tab:orange", "all-pr": "tab:blue"}


def results_plot(rows: list[dict], runs: Path, path: Path) -> None:
    """Test perplexity against parameters beside the paper's (left), validation curves (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        variant = r["variant"].split("-", 1)[1]
        color = VARIANT_COLORS.get(variant, "black")
        label = LABELS.get(variant, variant)
        left.plot(r["params"] / 1e6, r["test_ppl"], "o", color=color, markersize=9, label=f"{label} (ours)")
        if r["variant"] in PAPER:
            paper_ppl, paper_params = PAPER[r["variant"]]
            left.plot(paper_params / 1e6, paper_ppl, "o", mfc="none", color=color, markersize=12)
        log_path = runs / r["variant"] / "log.jsonl"
        if log_path.exists():
            valid = [x for x in _read_log(runs / r["variant"]) if x["type"] == "valid"]
            # a validation record is written when epoch x["epoch"] begins: it scores the one before
            right.plot(
                [x["epoch"] - 1 for x in valid], [x["ppl"] for x in valid], "-o", color=color, label=label
            )
    left.set_xlabel("parameters (millions, each tensor once)")
    left.set_ylabel("test perplexity")
    left.set_title("test perplexity against size (hollow: the paper's Table 6)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.set_xlabel("epoch")
    right.set_ylabel("validation perplexity")
    right.set_yscale("log")  # the first epochs of a random P reach the thousands
    right.yaxis.set_major_formatter(ScalarFormatter())
    right.yaxis.set_minor_formatter(ScalarFormatter())
    right.set_title("validation curves")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
