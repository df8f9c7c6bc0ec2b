"""`nmt-tie embeddings`: export an embedding matrix, nearest neighbours, word similarity.

Press & Wolf (2017, Table 3) compare the input and output embeddings of language models on
word-similarity benchmarks (Simlex-999, Verb-143, MEN, Rare Words): the output embedding,
and the tied one, correlate better with human judgements than the input embedding.
Works on language-model checkpoints (words) and translation checkpoints (SentencePiece
pieces that are whole words, i.e. start with the word-boundary mark).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nmt_tie.errors import UserError
from nmt_tie.model.embeddings import MATRIX_OF_ROLE

WORD_START = "\u2581"  # SentencePiece's word-boundary mark
WHICH = ("input", "output", "tied", "encoder-input")


def embedding_matrix(payload: dict, which: str) -> tuple[list[str], np.ndarray]:
    """(words, vectors) of one role's matrix in a checkpoint."""
    if which not in WHICH:
        raise UserError(f"--which {which!r} is not one of {', '.join(WHICH)}")
    state = payload["model"]
    config = payload["model_config"]
    if payload.get("kind") == "lm":
        mode = "decoder" if config["tie"] == "all" else "none"  # as LSTMLanguageModel builds it
        words = list(payload["lm_vocab"])
    else:
        mode = config["tie"]
        words = None
    roles = {"input": "decoder_input", "output": "output", "tied": "output", "encoder-input": "encoder_input"}
    matrices = MATRIX_OF_ROLE[mode]
    if which == "tied" and matrices["decoder_input"] != matrices["output"]:
        raise UserError(f"this model is untied (tie: {config['tie']}); use --which input or --which output")
    if which == "encoder-input" and payload.get("kind") == "lm":
        raise UserError("a language model has no encoder; use --which input or output")
    matrix = state[f"embeddings.matrices.{matrices[roles[which]]}"].float().numpy()
    if words is None:
        side = "spm_src" if which == "encoder-input" else "spm_tgt"
        words = _whole_word_pieces(payload["vocab"][side])
        keep = [i for i, w in enumerate(words) if w is not None]
        return [words[i] for i in keep], matrix[keep]
    return words, matrix


def _whole_word_pieces(spm_model: bytes) -> list[str | None]:
    """Per piece id: the word it spells if it starts a word and is alphabetic, else None."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    seen: set[str] = set()
    words: list[str | None] = []
    for i in range(processor.get_piece_size()):
        piece = processor.id_to_piece(i)
        word = piece[1:] if piece.startswith(WORD_START) else ""
        if word.isalpha() and word not in seen:
            seen.add(word)
            words.append(word)
        else:
            words.append(None)
    return words


def export_word2vec(words: list[str], matrix: np.ndarray, path: Path) -> None:
    """word2vec text format: a header `count dim`, then `word v1 v2 ...` per line."""
    with open(path, "w", encoding="utf-8") as out:
        out.write(f"{len(words)} {matrix.shape[1]}\n")
        for word, vector in zip(words, matrix, strict=True):
            out.write(word + " " + " ".join(f"{v:.6f}" for v in vector) + "\n")


def _normalized(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def neighbours(words: list[str], matrix: np.ndarray, query: str, k: int = 10) -> list[tuple[str, float]]:
    index = {w: i for i, w in enumerate(words)}
    if query not in index:
        raise UserError(f"{query!r} is not in the vocabulary")
    unit = _normalized(matrix)
    cosine = unit @ unit[index[query]]
    order = [i for i in np.argsort(-cosine) if i != index[query]][:k]
    return [(words[i], float(cosine[i])) for i in order]


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    rx, ry = rank(np.asarray(x, dtype=np.float64)), rank(np.asarray(y, dtype=np.float64))
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator else float("nan")


def read_similarity_pairs(path: Path) -> list[tuple[str, str, float]]:
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.strip().split()
        if not fields:
            continue
        if len(fields) != 3:
            raise UserError(f"{path}:{lineno}: expected `word1 word2 score`")
        try:
            pairs.append((fields[0], fields[1], float(fields[2])))
        except ValueError:
            raise UserError(f"{path}:{lineno}: the score {fields[2]!r} is not a number") from None
    return pairs


def similarity_score(words: list[str], matrix: np.ndarray, path: Path) -> dict:
    """Spearman correlation between cosine similarity and the human scores of a benchmark file.

    Words are looked up lowercased; pairs with an out-of-vocabulary word are skipped and counted.
    """
    index: dict[str, int] = {}
    for i, word in enumerate(words):
        index.setdefault(word.lower(), i)
    unit = _normalized(matrix)
    model_scores, human_scores, skipped = [], [], 0
    pairs = read_similarity_pairs(path)
    for a, b, human in pairs:
        ia, ib = index.get(a.lower()), index.get(b.lower())
        if ia is None or ib is None:
            skipped += 1
            continue
        model_scores.append(float(unit[ia] @ unit[ib]))
        human_scores.append(human)
    used = len(model_scores)
    rho = spearman(np.array(model_scores), np.array(human_scores)) if used > 1 else float("nan")
    return {"spearman": round(rho, 4), "pairs": used, "skipped": skipped, "total": len(pairs)}


BENCHMARKS = {
    "simlex999": "EN-SIMLEX-999.txt",
    "verb143": "EN-VERB-143.txt",
    "men": "EN-MEN-TR-3k.txt",
    "rw": "EN-RW-STANFORD.txt",
}


def evaluate_all(words: list[str], matrix: np.ndarray, directory: Path) -> dict:
    results = {}
    for name, filename in BENCHMARKS.items():
        path = Path(directory) / filename
        if path.is_file():
            results[name] = similarity_score(words, matrix, path)
    if not results:
        raise UserError(f"{directory}: none of {', '.join(BENCHMARKS.values())} found")
    return results


def load_payload(path: Path) -> dict:
    from nmt_tie.checkpoint import load_checkpoint

    return load_checkpoint(path, map_location=torch.device("cpu"))
