"""Multi30k recipe (offline default): prepare En-De data and print its statistics.

python recipes/multi30k/run.py --pair en-de --demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nmt_tie.data.locations import data_root
from nmt_tie.data.prepare import PrepareOptions, format_stats, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pair", default="en-de", choices=["en-de", "en-fr"])
    parser.add_argument("--runs", type=Path, default=Path("runs/multi30k"))
    parser.add_argument("--demo", action="store_true")
    args = parser.parse_args()
    src, tgt = args.pair.split("-")
    multi30k = data_root() / "multi30k"
    stats = prepare(
        PrepareOptions(
            src=src,
            tgt=tgt,
            train=str(multi30k / "train"),
            valid=str(multi30k / "val"),
            test=[str(multi30k / "test_2016_flickr")],
            out=args.runs / f"data-{args.pair}",
            vocab_size=8000,
        )
    )
    print(format_stats(stats))


if __name__ == "__main__":
    main()
