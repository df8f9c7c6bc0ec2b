"""Benchmark: `nmt-tie prepare` on Multi30k En-De (29k pairs, joint vocabulary of 8000).

Prints wall time and sentence pairs per second, for plain and Moses-tokenized preparation.
Target (issue 2): under 60 s on a 2-core CPU.

    python recipes/benchmarks/prepare_speed.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from nmt_tie.data.locations import data_root
from nmt_tie.data.prepare import PrepareOptions, prepare


def main() -> None:
    multi30k = data_root() / "multi30k"
    for moses in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            stats = prepare(
                PrepareOptions(
                    src="en",
                    tgt="de",
                    train=str(multi30k / "train"),
                    valid=str(multi30k / "val"),
                    test=[str(multi30k / "test_2016_flickr")],
                    out=Path(tmp) / "prep",
                    vocab_size=8000,
                    moses=moses,
                ),
                log=lambda m: None,
            )
            seconds = time.perf_counter() - started
        pairs = sum(split["read"] for split in stats["splits"].values())
        print(
            f"prepare multi30k en-de joint 8000{' +moses' if moses else ''}: {pairs} pairs in "
            f"{seconds:.2f} s = {pairs / seconds:,.0f} sentence pairs/s"
        )


if __name__ == "__main__":
    main()
