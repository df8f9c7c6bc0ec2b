"""Raw text <-> subword ids: optional Moses pre-tokenization, then SentencePiece BPE.

A `TextProcessor` is everything needed to turn one language's raw text into ids and back.
It is built from SentencePiece model bytes, so a checkpoint can carry it and `translate`
needs no other file.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import sentencepiece as spm

# Fixed special ids, identical in every vocabulary nmt-tie builds.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass(frozen=True)
class Vocabulary:
    """The ordered subword pieces of a SentencePiece model (index = id).

    Two vocabularies are equal only when their pieces are, in the same order: equal sizes
    are not enough to share an embedding matrix.
    """

    pieces: tuple[str, ...]

    pad: int = PAD_ID
    unk: int = UNK_ID
    bos: int = BOS_ID
    eos: int = EOS_ID

    def __len__(self) -> int:
        return len(self.pieces)

    @cached_property
    def index(self) -> dict[str, int]:
        return {piece: i for i, piece in enumerate(self.pieces)}

    @classmethod
    def from_sentencepiece(cls, processor: spm.SentencePieceProcessor) -> Vocabulary:
        return cls(tuple(processor.id_to_piece(i) for i in range(processor.get_piece_size())))


def train_sentencepiece(
    sentences: Iterable[str], vocab_size: int, threads: int = 2, max_sentences: int = 10_000_000
) -> bytes:
    """Learn a BPE model on the sentences and return the serialized model.

    Byte fallback means no input ever maps to <unk>: unseen characters become byte pieces,
    so decoding reproduces them.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        byte_fallback=True,
        character_coverage=1.0,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=threads,
        minloglevel=2,
    )
    return model.getvalue()


class MosesSteps:
    """sacremoses normalization + tokenization for one language, and detokenization."""

    def __init__(self, lang: str):
        from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer

        self.normalizer = MosesPunctNormalizer(lang=lang)
        self.tokenizer = MosesTokenizer(lang=lang)
        self.detokenizer = MosesDetokenizer(lang=lang)

    def tokenize(self, text: str) -> str:
        # escape=False keeps "&" and quotes as they are, so decoding gives readable text.
        normalized = self.normalizer.normalize(text)
        return self.tokenizer.tokenize(normalized, escape=False, return_str=True)

    def detokenize(self, text: str) -> str:
        return self.detokenizer.detokenize(text.split(), unescape=False)


# What str.splitlines() (and text-mode readers such as sacreBLEU's) take for the end of a line.
LINE_BREAKS_TO_SPACE = str.maketrans(dict.fromkeys("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029", " "))


class TextProcessor:
    """Raw text of one language to piece ids and back (Moses steps are optional)."""

    def __init__(self, lang: str, spm_model: bytes, moses: bool = False):
        self.lang = lang
        self.spm_model = spm_model
        self.moses = moses
        self._sp = spm.SentencePieceProcessor(model_proto=spm_model)
        self._moses = MosesSteps(lang) if moses else None
        self.vocab = Vocabulary.from_sentencepiece(self._sp)

    def pretokenize(self, text: str) -> str:
        return self._moses.tokenize(text) if self._moses else text

    def encode_pretokenized(self, lines: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(lines), num_threads=2)

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        return self.encode_pretokenized([self.pretokenize(line) for line in lines])

    def decode(self, ids: Sequence[int]) -> str:
        """One line of text: byte fallback can spell a line break (piece <0x0A>), which would
        shift every later line of the output against its input; it becomes a space."""
        text = self._sp.decode([int(i) for i in ids]).translate(LINE_BREAKS_TO_SPACE)
        return self._moses.detokenize(text) if self._moses else text

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.vocab.pieces[int(i)] for i in ids]
