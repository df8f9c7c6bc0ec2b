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
    parser.add_argument("--report-only", action="store_true", help="print the table of finished runs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.report_only:
        names = [f"{args.size}-{variant}" for variant in args.variants.split(",")]
        rows = [
            json.loads((args.runs / n / "results.json").read_text())
            for n in names
            if (args.runs / n / "results.json").exists()
        ]
        print(results_table(rows))
        return
    ptb = data_root() / "ptb"
    texts = {split: ptb / f"ptb.{split}.txt.gz" for split in ("train", "valid", "test")}
    rows = []
    for variant in args.variants.split(","):
        name = f"{args.size}-{variant}"
        run_dir = args.runs / name
        nmt_tie(
            "lm",
            "train",
            str(RECIPE / f"{name}.yaml"),
            f"train_text={texts['train']}",
            f"valid_text={texts['valid']}",
            f"test_text={texts['test']}",
            f"save_dir={run_dir}",
            *args.overrides,
        )
        best = run_dir / "best.pt"
        results = run_dir / "results.json"
        if results.exists() and results.stat().st_mtime > best.stat().st_mtime:
            print(f"{results} is up to date: not evaluating again", flush=True)
            rows.append(json.loads(results.read_text()))
            continue
        test = json.loads(
            nmt_tie("lm", "eval", str(best), "--text", str(texts["test"]), "--json", capture=True)
        )
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
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        valid = min(r["ppl"] for r in log if r["type"] == "valid")
        minutes = max(r.get("elapsed", 0) for r in log) / 60
        result = {
            "variant": name,
            "valid_ppl": valid,
            "test_ppl": test["ppl"],
            "minutes": round(minutes, 1),
            "params": _params(best),
            "similarity": similarity,
        }
        results.write_text(json.dumps(result, indent=2) + "\n")
        rows.append(result)
    table = results_table(rows)
    (args.runs / f"results-{args.size}.md").write_text(table + "\n")
    print("\n" + table)


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


if __name__ == "__main__":
    main()
