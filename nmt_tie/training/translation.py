"""The translation task for the generic Trainer: prepared data, label-smoothed loss, BLEU."""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from nmt_tie.checkpoint import vocab_payload
from nmt_tie.config import ModelConfig, TrainConfig
from nmt_tie.data.batching import Batch, ParallelData, TokenBucketSampler
from nmt_tie.data.prepare import PreparedData
from nmt_tie.data.tokenizer import PAD_ID
from nmt_tie.errors import UserError
from nmt_tie.evaluate import score
from nmt_tie.model.seq2seq import build_model, configure_for_data
from nmt_tie.training import distributed
from nmt_tie.training.batch_plan import plan_batches
from nmt_tie.training.distributed import DistInfo
from nmt_tie.training.loss import label_smoothed_nll
from nmt_tie.translate import SearchOptions, Translator


def sequence_loss(model, batch: Batch, label_smoothing: float):
    """Summed label-smoothed loss, summed NLL and the number of (non-padding) target tokens.

    Tensors only, no host-device synchronization: the positions and their count come from
    the CPU side of the batch (padded rows, if any, have target PAD_ID and count for nothing)."""
    logits = model(batch.src, batch.tgt_in, batch.target_positions)
    loss, nll = label_smoothed_nll(logits, batch.targets, label_smoothing, ignore_index=PAD_ID)
    return loss, nll, batch.target_tokens


class TranslationTask:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, dist: DistInfo, device: torch.device):
        if not cfg.data:
            raise UserError("`data` is not set: give the prepared data directory (data=DIR)")
        self.cfg = cfg
        self.device = device
        self.prepared = PreparedData(cfg.data)
        self.model_config = configure_for_data(model_cfg, self.prepared)
        self.src_proc = self.prepared.processor("src")
        self.tgt_proc = self.prepared.processor("tgt")
        self.train_data = ParallelData(self.prepared, "train")
        self.batch_plan = plan_batches(
            self.model_config,
            cfg,
            self.train_data.src_lengths,
            self.train_data.tgt_lengths,
            dist.world_size,
            device,
            agree=lambda value: min(distributed.gather_objects(value, dist)),
        )
        self.sampler = TokenBucketSampler(
            self.train_data.src_lengths,
            self.train_data.tgt_lengths,
            max_tokens=self.batch_plan.max_tokens,
            seed=cfg.seed,
            num_shards=dist.world_size,
            shard=dist.rank,
            max_sentences=self.batch_plan.max_sentences or None,
            ladder=cfg.shape_ladder,
        )
        # validation and its translations: batches as large as a training batch (known to fit)
        self.valid_max_tokens = self.batch_plan.max_tokens
        # On a GPU the next batch is built, pinned and copied while the current one computes.
        self.prefetch = device.type == "cuda"
        self._pending: tuple[dict, Future] | None = None
        self._consumed_state: dict | None = None  # the sampler's state after the last batch taken
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="batches") if self.prefetch else None
        self.valid_data = ParallelData(self.prepared, "valid")
        limit = cfg.valid_max_sentences or None
        self.valid_sources = self.prepared.raw_text("valid", "src")[:limit]
        self.valid_references = self.prepared.raw_text("valid", "tgt")[:limit]

    @property
    def epoch(self) -> int:
        """The epoch of the next batch to be trained on (not of a batch prefetched ahead)."""
        return self._sampler_state()["epoch"]

    def build_model(self):
        return build_model(self.model_config)

    def next_batch(self) -> Batch:
        if not self.prefetch:
            return self._load(self.sampler.next_batch())
        if self._pending is None:
            self._pending = self._draw()
        self._consumed_state, future = self._pending
        self._pending = self._draw()
        return future.result()

    def _draw(self) -> tuple[dict, Future]:
        """Take the next batch's indices (on this thread) and build it on the loader thread."""
        indices = self.sampler.next_batch()
        return self.sampler.state_dict(), self._loader.submit(self._load, indices)

    def _load(self, indices) -> Batch:
        batch = self.train_data.collate(indices, self.cfg.shape_ladder)
        return (batch.pin_memory() if self.device.type == "cuda" else batch).to(self.device)

    def _sampler_state(self) -> dict:
        if self.prefetch and self._consumed_state is not None:
            return self._consumed_state
        return self.sampler.state_dict()

    @staticmethod
    def batch_tokens(batch: Batch) -> int:
        return batch.target_tokens

    def loss(self, model, batch: Batch):
        return sequence_loss(model, batch, self.cfg.label_smoothing)

    def after_update(self) -> None:
        pass

    def validate(self, model, run_dir: Path) -> dict:
        nll_sum, tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0
        valid_sampler = TokenBucketSampler(
            self.valid_data.src_lengths,
            self.valid_data.tgt_lengths,
            self.valid_max_tokens,
            shuffle=False,
            ladder=self.cfg.shape_ladder,
        )
        for indices in valid_sampler:
            batch = self.valid_data.collate(indices, self.cfg.shape_ladder).to(self.device)
            _, nll, n = sequence_loss(model, batch, 0.0)
            nll_sum += nll.double()  # summed on the device: one synchronization in all
            tokens += n
        loss = float(nll_sum) / max(1, tokens)
        translator = Translator(
            [model],
            self.src_proc,
            self.tgt_proc,
            SearchOptions(beam=self.cfg.valid_beam, max_tokens=self.valid_max_tokens),
            device=self.device,
            dtype=self.cfg.valid_dtype,
        )
        hypotheses = [hyps[0][0] if hyps else "" for hyps in translator.translate(self.valid_sources)]
        (run_dir / "valid.hyp").write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
        scores = score(hypotheses, self.valid_references)
        return {
            "loss": round(loss, 4),
            "ppl": round(math.exp(min(50.0, loss)), 2),
            "bleu": scores["bleu"]["score"],
            "chrf": scores["chrf"]["score"],
            # BLEU of what search? (the final scores use beam search)
            "search": "greedy" if self.cfg.valid_beam == 1 else f"beam {self.cfg.valid_beam}",
        }

    def data_identity(self) -> dict:
        """What a resumed run must train on to continue the same training: the vocabulary
        (what each id means) and the training pairs (prepare's inputs and options). By
        content, not path: a moved data directory resumes."""
        record = self.prepared.record
        vocabulary = hashlib.sha256(self.src_proc.spm_model + self.tgt_proc.spm_model).hexdigest()
        inputs = {lang: entry["sha256"] for lang, entry in record["inputs"]["train"].items()}
        return {"vocabulary": vocabulary, "training data": {"inputs": inputs, "options": record["options"]}}

    def state_dict(self) -> dict:
        return {"sampler": self._sampler_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self._pending = self._consumed_state = None

    def checkpoint_extras(self) -> dict:
        return {"vocab": vocab_payload(self.src_proc, self.tgt_proc, self.prepared.joint)}
