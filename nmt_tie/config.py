"""Configuration: a flat YAML file of documented keys, plus `key=value` overrides.

Keys belong to `ModelConfig` (what the network is; stored in every checkpoint) or to
`TrainConfig` (how it is trained). The recipe YAML files list every key with a comment.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nmt_tie.artifacts import wrong_kind
from nmt_tie.errors import UserError

ARCHS = ("rnn", "transformer")
TIE_MODES = ("none", "decoder", "src-tgt", "all")


@dataclass
class ModelConfig:
    arch: str = "transformer"  # rnn | transformer
    tie: str = "all"  # none | decoder | src-tgt | all (see nmt_tie/model/embeddings.py)
    emb_dim: int = 512  # embedding size; the Transformer's model width
    hidden_dim: int = 1024  # RNN: GRU state size (encoder annotations are twice this)
    ffn_dim: int = 2048  # Transformer: feed-forward inner size
    enc_layers: int = 6  # Transformer encoder layers (the RNN has one bidirectional layer)
    dec_layers: int = 6  # Transformer decoder layers (the RNN has one conditional GRU)
    heads: int = 8  # Transformer attention heads
    norm: str = "pre"  # Transformer: pre | post layer normalization
    dropout: float = 0.1  # Transformer: residual dropout; RNN: hidden-layer dropout
    emb_dropout: float = 0.0  # dropout on input embeddings (the RNN's dropout_embedding)
    attention_dropout: float = 0.0  # Transformer: dropout on attention weights
    deep_output: bool = True  # RNN: deep output layer down to emb_dim (needed for tying)
    scale_embeddings: bool | None = None  # multiply input embeddings by sqrt(emb_dim); None:
    #                                       yes for the Transformer, no for the RNN
    emb_init_std: float | None = None  # std of the embedding matrices' normal initialization;
    #                                    None: emb_dim ** -0.5 (rows of unit norm)
    projection_reg: float = 0.0  # lambda of projection regularization; 0 = no projection P
    src_vocab_size: int = 0  # filled in from the prepared data
    tgt_vocab_size: int = 0  # filled in from the prepared data
    shared_vocab: bool = False  # filled in: source and target vocabularies are identical

    def validate(self) -> None:
        """Errors that say what to change; never a silent untie."""
        if self.arch not in ARCHS:
            raise UserError(f"arch: {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.tie not in TIE_MODES:
            raise UserError(f"tie: {self.tie!r} is not one of {', '.join(TIE_MODES)}")
        if self.norm not in ("pre", "post"):
            raise UserError(f"norm: {self.norm!r} is not pre or post")
        if self.src_vocab_size <= 0 or self.tgt_vocab_size <= 0:
            raise UserError("the vocabulary sizes are unknown: give `data` (a prepared directory)")
        if self.tie in ("src-tgt", "all") and not self.shared_vocab:
            raise UserError(
                f"tie: {self.tie} needs one vocabulary shared by source and target, but the data "
                "has two different ones (their pieces differ, whatever their sizes); re-run "
                "`nmt-tie prepare --joint`, or use `tie: decoder`"
            )
        if self.tie in ("decoder", "all") and self.output_dim != self.emb_dim:
            raise UserError(
                f"tie: {self.tie} needs an output layer of the embedding size (emb_dim "
                f"{self.emb_dim}), but it has size {self.output_dim}; set deep_output: true, "
                "or use tie: none or tie: src-tgt"
            )
        if self.arch == "transformer" and self.emb_dim % self.heads:
            raise UserError(f"emb_dim {self.emb_dim} is not divisible by heads {self.heads}")
        if self.projection_reg < 0:
            raise UserError("projection_reg must be >= 0")
        if self.emb_init_std is not None and self.emb_init_std <= 0:
            raise UserError(f"emb_init_std must be > 0 (null: emb_dim ** -0.5), not {self.emb_init_std}")

    @property
    def output_dim(self) -> int:
        """Size of the vector the output embedding multiplies."""
        if self.arch == "rnn" and not self.deep_output:
            return self.hidden_dim
        return self.emb_dim

    @property
    def embedding_init_std(self) -> float:
        """Unit-norm rows by default: with tied matrices the first logits are then near 0."""
        return self.emb_dim**-0.5 if self.emb_init_std is None else self.emb_init_std

    @property
    def embedding_scale(self) -> float:
        scale = self.arch == "transformer" if self.scale_embeddings is None else self.scale_embeddings
        return self.emb_dim**0.5 if scale else 1.0


@dataclass
class TrainConfig:
    data: str = ""  # prepared data directory (`nmt-tie prepare --out`)
    save_dir: str = "runs/model"  # run directory: config, logs, checkpoints
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (fp16 with loss scaling; bf16 becomes fp16 on GPUs
    #                      without fast bf16, before Ampere, and fp32 on CPUs with neither
    #                      AVX512-BF16 nor AMX); the log says which is in effect
    tf32: bool = True  # dtype fp32 on Ampere/Hopper GPUs: TF32 tensor-core matrix products
    threads: int = 0  # CPU threads for torch; 0 = all cores
    compile: bool = False  # torch.compile the model
    cpu_attention: str = "fp32"  # dtype bf16 on the CPU: attention in fp32 (1.23x fp32 training's
    #                              memory) or bf16 products (1.60x: oneDNN keeps a kernel per shape;
    #                              about as fast: 0.97-1.02x per update, the same whole-run time)
    # batching
    max_tokens: int | str = 4096  # padded source + target tokens per batch and worker (GPU), or
    #                               `auto`: the largest whose estimated worst-case memory fits
    #                               the GPU's free memory (or memory_budget)
    max_sentences: int = 0  # optional cap on sentences per batch and worker; 0 = none
    update_freq: int = 1  # gradient accumulation: batches per update (derived when a global batch is set)
    global_batch_tokens: int = 0  # target tokens per update, all workers together: the trainer
    #                               derives the accumulation and per-worker batch; 0 = off
    global_batch_sentences: int = 0  # sentences per update, all workers together; 0 = off
    memory_budget: float = 0.0  # GiB per worker for max_tokens: auto; 0 = 90% of the GPU's free
    #                             memory (half the available memory on a CPU)
    shape_ladder: bool = True  # batch widths and sentence counts on a ladder of 8 values per
    #                            doubling: few tensor shapes (flat memory, compile), ~1% more padded tokens
    # stopping
    max_updates: int = 0  # 0 = no limit
    max_epochs: int = 0  # 0 = no limit
    max_time: float = 0.0  # wall-clock budget in minutes; 0 = no limit
    patience: int = 0  # stop after this many validations without improvement; 0 = never
    # optimization
    optimizer: str = "adam"  # adam | adadelta | sgd
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # Adam
    eps: float = 1e-8  # Adam; Adadelta uses 1e-6
    rho: float = 0.95  # Adadelta
    weight_decay: float = 0.0
    schedule: str = "inverse_sqrt"  # inverse_sqrt | plateau | constant | epoch_decay | linear
    warmup: int = 4000  # inverse_sqrt: linear warm-up updates
    lr_decay: float = 0.5  # plateau: factor when validation does not improve
    min_lr: float = 1e-6  # plateau: floor
    clip_norm: float = 0.0  # gradient norm clipping; 0 = off
    label_smoothing: float = 0.1
    # validation and checkpoints
    valid_every: int = 1000  # updates between validations (and checkpoints); 0 = every epoch
    valid_metric: str = "bleu"  # bleu | chrf | loss (for best.pt and early stopping)
    valid_beam: int = 1  # beam size for validation translation (1 = greedy)
    valid_dtype: str = "fp32"  # precision of validation (loss and translation), whatever `dtype`
    valid_max_sentences: int = 0  # translate only the first N validation sentences; 0 = all
    save_every: int = 0  # also keep checkpoint_UPDATES.pt (weights only) every N updates; 0 = never
    keep_last: int = 5  # how many of those to keep
    save_every_minutes: float = 0.0  # also write last.pt this often (preemption); 0 = only at validation
    log_every: int = 100  # updates between training log records


CONFIG_CLASSES = (ModelConfig, TrainConfig)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or explain the problem."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        members = [a for a in args if a is not type(None)]
        for member in members[:-1]:  # the first type that takes the value (int | str: 4096 or auto)
            try:
                return _coerce(key, value, member)
            except UserError:
                pass
        hint = members[-1]
        origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                return lowered in ("true", "yes", "1")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            (item,) = typing.get_args(hint)
            return [item(v) for v in value]
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise UserError(f"{key}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def closest_key(key: str, names: list[str] | None = None) -> str:
    """The valid key a typo most likely meant: fewest edits, then most similar."""
    names = names or [f.name for cls in CONFIG_CLASSES for f in fields(cls)]
    return min(names, key=lambda n: (_edit_distance(key, n), -difflib.SequenceMatcher(None, key, n).ratio()))


def parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value")
        overrides[key.strip()] = value
    return overrides


def build_configs(values: dict[str, Any], source: str = "config", classes: tuple = CONFIG_CLASSES) -> tuple:
    """Split flat key/values into one dataclass instance per class, checking every key and value."""
    types = [_field_types(cls) for cls in classes]
    kwargs: list[dict] = [{} for _ in classes]
    for key, value in values.items():
        for field_types, chosen in zip(types, kwargs, strict=True):
            if key in field_types:
                chosen[key] = _coerce(key, value, field_types[key])
                break
        else:
            names = [name for field_types in types for name in field_types]
            raise UserError(f"{source}: unknown key {key!r}; did you mean {closest_key(key, names)!r}?")
    return tuple(cls(**chosen) for cls, chosen in zip(classes, kwargs, strict=True))


def load_config(path: str | Path | None, overrides: list[str] = (), classes: tuple = CONFIG_CLASSES) -> tuple:
    """Read a flat YAML config and apply `key=value` overrides (values parsed as YAML)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            binary = f"{path}: not a YAML config (not UTF-8 text)"
            raise UserError(wrong_kind(path, "a YAML config") or binary) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{where}: not valid YAML") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected key: value pairs")
        values.update(loaded)
    configs = build_configs(values, str(path or "config"), classes)
    if not overrides:
        return configs
    for key, raw in parse_overrides(list(overrides)).items():
        values[key] = yaml.safe_load(raw) if raw != "" else ""
    return build_configs(values, "override", classes)


def to_dict(config: ModelConfig | TrainConfig) -> dict:
    return asdict(config)


def dump_configs(*configs) -> str:
    """The resolved configuration as flat YAML (what `train` writes into the run directory)."""
    merged: dict = {}
    for config in configs:
        merged.update(asdict(config))
    return yaml.safe_dump(merged, sort_keys=False)
