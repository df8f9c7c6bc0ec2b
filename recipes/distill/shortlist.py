"""Does restricting the output layer pay for a shipped student? (issue 42)

Two restrictions through CTranslate2's vocabulary map (`vmap.txt` in the export directory,
used by `nmt-tie translate -c DIR` when present):

- `target`: the pieces the target side of the training corpus uses (prepare's Table 1: the
  others, source-only pieces of the joint vocabulary, are never produced), always allowed;
- `lexical`: a shortlist per source piece, the `--top` target pieces that co-occur with it most
  often in the training pairs, beside the `--frequent` most frequent target pieces (what
  Bergamot's students use, built here from co-occurrence counts instead of word alignments).

For each it copies the export, writes the map, translates test2016 (beam 5 and greedy, 2
threads, translate_speed.py's measurement) and prints sentences/s and BLEU beside the
unrestricted export's: a restriction is worth keeping only if it is faster and changes BLEU
by less than 0.1.

    python recipes/distill/shortlist.py runs/distill/distilled/student-6-1-seed1/export-int8 \
        --data runs/distill/data-distilled
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def target_pieces(data: Path) -> list[str]:
    """The pieces the prepared training targets use, in id order."""
    from nmt_tie.data.prepare import PreparedData

    prepared = PreparedData(data)
    ids, _ = prepared.split_arrays("train", "tgt")
    pieces = prepared.processor("tgt").vocab.pieces
    return [pieces[i] for i in np.unique(np.asarray(ids))]


def lexical_map(data: Path, top: int, frequent: int) -> dict[str, list[str]]:
    """{source piece: the `top` target pieces most often in the same pair}, and under "" the
    `frequent` most frequent target pieces."""
    from nmt_tie.data.prepare import PreparedData

    prepared = PreparedData(data)
    src_ids, src_offsets = prepared.split_arrays("train", "src")
    tgt_ids, tgt_offsets = prepared.split_arrays("train", "tgt")
    pieces = prepared.processor("tgt").vocab.pieces
    together: dict[int, Counter] = {}
    target_counts: Counter = Counter()
    for i in range(len(src_offsets) - 1):
        source = set(src_ids[src_offsets[i] : src_offsets[i + 1]].tolist())
        target = set(tgt_ids[tgt_offsets[i] : tgt_offsets[i + 1]].tolist())
        target_counts.update(target)
        for piece in source:
            together.setdefault(piece, Counter()).update(target)
    mapping = {"": [pieces[t] for t, _ in target_counts.most_common(frequent)]}
    for piece, counts in together.items():
        mapping[pieces[piece]] = [pieces[t] for t, _ in counts.most_common(top)]
    return mapping


def with_map(export: Path, rules: dict[str, list[str]], out: Path) -> Path:
    shutil.copytree(export, out)
    lines = [f"{source}\t{' '.join(targets)}\n" for source, targets in rules.items()]
    (out / "vmap.txt").write_text("".join(lines), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export", type=Path, help="a CTranslate2 export (nmt-tie export)")
    parser.add_argument("--data", type=Path, required=True, help="the prepared data the model was trained on")
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--frequent", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()

    import sacrebleu

    sys.path.insert(0, str(REPO / "recipes" / "benchmarks"))
    from translate_speed import run_row

    from nmt_tie.data.locations import data_root
    from nmt_tie.data.text import read_lines

    references = list(read_lines(data_root() / "multi30k" / "test_2016_flickr.de.gz"))
    vocabulary = len(json.loads((args.export / "shared_vocabulary.json").read_text()))
    results = []
    with tempfile.TemporaryDirectory() as work:
        kept = target_pieces(args.data)
        variants = {
            "none": (args.export, vocabulary),
            "target": (with_map(args.export, {"": kept}, Path(work) / "target"), len(kept)),
        }
        lexical = lexical_map(args.data, args.top, args.frequent)
        shortlist = f"{args.top} per source piece + {args.frequent}"
        variants["lexical"] = (with_map(args.export, lexical, Path(work) / "lexical"), shortlist)
        for name, (directory, allowed) in variants.items():
            for beam in (5, 1):
                row = run_row("export-int8", str(directory), beam, 4096, args.threads, "cpu")
                bleu = sacrebleu.corpus_bleu(row["hypotheses"], [references]).score
                results.append(
                    {"restriction": name, "beam": beam, "allowed_pieces": allowed, "bleu": round(bleu, 2),
                     "sentences_per_s": round(len(references) / row["seconds"], 1)}
                )  # fmt: skip
                print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
