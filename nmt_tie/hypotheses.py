"""What a search is asked and what it returns: torch-free, so that the search (search.py), the
text front end (translate.py) and the CTranslate2 path (deploy.py) share them without
importing each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Hypothesis:
    """What a search returns for one sentence (best first in lists)."""

    tokens: list[int]  # without BOS and EOS
    score: float  # length-normalized log-probability (beam) or log-probability (greedy)


@dataclass
class SearchOptions:
    beam: int = 5
    lenpen: float = 1.0  # exponent of the length normalization
    length_norm: str = "average"  # average (score / length ** lenpen, as fairseq) | gnmt
    max_len_a: float = 1.5
    max_len_b: int = 10
    nbest: int = 1
    max_tokens: int = 4096  # source tokens per batch
    max_src_len: int = 256  # longer inputs are truncated (with a warning)
