"""The language-model task for the generic Trainer: word-level text, truncated BPTT.

The training text becomes one stream of word ids (`<eos>` after every line), cut into
`batch_size` parallel streams read `bptt` steps at a time. The LSTM state is carried from
one window to the next (detached: gradients stop at the window border) and reset at the
start of every epoch, as in Zaremba et al. (2014). The objective per batch is the summed
negative log-likelihood divided by the number of streams (their `cost / batch_size`), so
that SGD with lr 1 behaves as in their recipe.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nmt_tie.data.text import read_lines
from nmt_tie.errors import UserError
from nmt_tie.model.lstm_lm import LMConfig, LSTMLanguageModel
from nmt_tie.training.loss import label_smoothed_nll

EOS, UNK = "<eos>", "<unk>"


@dataclass
class LMDataConfig:
    train_text: str = ""  # one sentence per line, tokenized; the vocabulary comes from it
    valid_text: str = ""
    test_text: str = ""  # optional; `nmt-tie lm eval` scores any file
    bptt: int = 20  # steps of truncated backpropagation through time
    batch_size: int = 20  # parallel streams
    eval_batch_size: int = 10
    decay_start: int = 4  # schedule epoch_decay: the lr is constant through this epoch


class WordVocabulary:
    """Words of the training text, most frequent first (ties alphabetically)."""

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.index = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def from_text(cls, path: Path) -> WordVocabulary:
        counts = Counter()
        for line in read_lines(path):
            counts.update(line.split())
            counts[EOS] += 1
        if not counts:
            raise UserError(f"{path}: no words")
        return cls(sorted(counts, key=lambda w: (-counts[w], w)))

    def __len__(self) -> int:
        return len(self.words)

    def encode_file(self, path: Path) -> np.ndarray:
        """All lines as one id stream with <eos> after each; unknown words become <unk>."""
        unk = self.index.get(UNK)
        ids: list[int] = []
        for lineno, line in enumerate(read_lines(path), start=1):
            for word in line.split():
                index = self.index.get(word, unk)
                if index is None:
                    raise UserError(f"{path}:{lineno}: {word!r} is not in the vocabulary, which has no <unk>")
                ids.append(index)
            ids.append(self.index[EOS])
        return np.asarray(ids, dtype=np.int64)


def batchify(ids: np.ndarray, streams: int, source: str | Path = "the text") -> torch.Tensor:
    """(streams, length): the id stream cut into `streams` contiguous pieces (tail dropped)."""
    length = len(ids) // streams
    if length < 2:
        raise UserError(
            f"{source}: too short for {streams} streams ({len(ids)} tokens, at least {2 * streams} needed)"
        )
    return torch.from_numpy(ids[: streams * length].reshape(streams, length).copy())


@torch.no_grad()
def perplexity(model: LSTMLanguageModel, data: torch.Tensor, bptt: int, device) -> tuple[float, int]:
    """Mean NLL per token over (streams, length) ids, carrying the state; and the token count."""
    model.eval()
    state = model.initial_state(data.size(0), device)
    total, count = 0.0, 0
    for start in range(0, data.size(1) - 1, bptt):
        end = min(start + bptt, data.size(1) - 1)
        x = data[:, start:end].to(device)
        y = data[:, start + 1 : end + 1].to(device)
        logits, state = model(x, state)
        _, nll = label_smoothed_nll(logits.flatten(0, 1), y.flatten(), 0.0)
        total += float(nll)
        count += y.numel()
    return total / count, count


class LanguageModelTask:
    def __init__(self, model_cfg: LMConfig, cfg, dist, device, data_cfg: LMDataConfig):
        if dist.enabled:
            raise UserError("`nmt-tie lm train` runs in one process (no torchrun)")
        if not data_cfg.train_text or not data_cfg.valid_text:
            raise UserError("set train_text and valid_text")
        self.cfg = cfg
        self.data_cfg = data_cfg
        self.device = device
        self.vocab = WordVocabulary.from_text(Path(data_cfg.train_text))
        model_cfg.vocab_size = len(self.vocab)
        self.model_config = model_cfg
        self.extra_configs = (data_cfg,)
        self.decay_start = data_cfg.decay_start
        self.train = batchify(
            self.vocab.encode_file(Path(data_cfg.train_text)), data_cfg.batch_size, data_cfg.train_text
        )
        self.valid = batchify(
            self.vocab.encode_file(Path(data_cfg.valid_text)), data_cfg.eval_batch_size, data_cfg.valid_text
        )
        self.windows = math.ceil((self.train.size(1) - 1) / data_cfg.bptt)
        self.epoch = 1
        self.position = 0  # next window of the epoch
        self.state = None

    def build_model(self) -> LSTMLanguageModel:
        return LSTMLanguageModel(self.model_config)

    def next_batch(self):
        bptt = self.data_cfg.bptt
        start = self.position * bptt
        end = min(start + bptt, self.train.size(1) - 1)
        x = self.train[:, start:end].to(self.device)
        y = self.train[:, start + 1 : end + 1].to(self.device)
        last = self.position + 1 == self.windows
        self.position += 1
        if last:
            self.epoch += 1
            self.position = 0
        return x, y, last

    @staticmethod
    def batch_tokens(batch) -> int:
        return batch[1].numel()

    @staticmethod
    def loss_normalizer(batch) -> int:
        return batch[1].size(0)  # streams: the objective is cost / batch_size

    def loss(self, model, batch):
        x, y, last = batch
        state = self.state if self.state is not None else model.initial_state(x.size(0), x.device)
        logits, (h, c) = model(x, state)
        # Carry the state to the next window without its history (truncated BPTT); a new
        # epoch starts from zeros.
        self.state = None if last else (h.detach(), c.detach())
        loss, nll = label_smoothed_nll(logits.flatten(0, 1), y.flatten(), 0.0)
        return loss, nll, y.numel()

    def after_update(self) -> None:
        pass

    def validate(self, model, run_dir: Path) -> dict:
        nll, _ = perplexity(model, self.valid, self.data_cfg.bptt, self.device)
        return {"loss": round(nll, 4), "ppl": round(math.exp(nll), 2)}

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position}
        if self.state is not None:
            state["h"], state["c"] = (t.cpu() for t in self.state)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.position = state["position"]
        self.state = (state["h"].to(self.device), state["c"].to(self.device)) if "h" in state else None

    def data_identity(self) -> dict:
        """What a resumed run must train on: the same vocabulary and training text (its size
        in tokens: the saved position in it means nothing in another text)."""
        vocabulary = hashlib.sha256("\n".join(self.vocab.words).encode()).hexdigest()
        return {"vocabulary": vocabulary, "training data": int(self.train.numel())}

    def checkpoint_extras(self) -> dict:
        return {"kind": "lm", "lm_vocab": self.vocab.words, "lm_data": asdict(self.data_cfg)}


def load_lm(payload: dict, device="cpu") -> tuple[LSTMLanguageModel, WordVocabulary]:
    if payload.get("kind") != "lm":
        raise UserError("not a language-model checkpoint (train one with `nmt-tie lm train`)")
    model = LSTMLanguageModel(LMConfig(**payload["model_config"]))
    model.load_state_dict(payload["model"])
    return model.to(device), WordVocabulary(payload["lm_vocab"])
