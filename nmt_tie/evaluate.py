"""BLEU and chrF with sacrebleu, reported with their signatures."""

from __future__ import annotations

from pathlib import Path

from nmt_tie.data.text import read_lines
from nmt_tie.errors import UserError

METRICS = ("bleu", "chrf")


def score(hypotheses: list[str], references: list[str], metrics=METRICS, tokenize: str | None = None) -> dict:
    """{metric: {"score": float, "signature": str, "text": sacrebleu's line}}."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise UserError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    results = {}
    for name in metrics:
        if name == "bleu":
            metric = BLEU(tokenize=tokenize) if tokenize else BLEU()
        elif name == "chrf":
            metric = CHRF()
        else:
            raise UserError(f"unknown metric {name!r}; use {', '.join(METRICS)}")
        result = metric.corpus_score(hypotheses, [references])
        results[name] = {
            "score": round(result.score, 2),
            "signature": str(metric.get_signature()),
            "text": str(result),
        }
    return results


def score_files(hyp_path: Path, ref_path: Path, metrics=METRICS, tokenize: str | None = None) -> dict:
    hypotheses = list(read_lines(Path(hyp_path)))
    references = list(read_lines(Path(ref_path)))
    if len(hypotheses) != len(references):
        raise UserError(
            f"line counts differ: {hyp_path} has {len(hypotheses)} lines, {ref_path} has {len(references)}"
        )
    if not hypotheses:
        raise UserError(f"{hyp_path} and {ref_path} are empty: nothing to score")
    return score(hypotheses, references, metrics, tokenize)
