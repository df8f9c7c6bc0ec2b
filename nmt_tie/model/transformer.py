"""A Transformer encoder-decoder (Vaswani et al., 2017) with incremental decoding.

Pre-norm by default (post-norm as an option), sinusoidal positions, input embeddings scaled
by sqrt(d_model) (done by TiedEmbeddings). The decoder caches the keys and values of its
self-attention step by step, and the cross-attention keys and values are computed once per
source sentence (`prepare`), so generating a token costs one position, not the whole prefix.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nmt_tie.devices import autocast_active
from nmt_tie.errors import UserError
from nmt_tie.model.dropout import dropout, relu_dropout
from nmt_tie.model.packed import PackedLinear

EncoderOut = dict[str, torch.Tensor]
GPU_ATTENTION_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sinusoidal_positions(length: int, dim: int, offset: int = 0, device=None) -> torch.Tensor:
    """(length, dim) sinusoids [sin | cos] for positions offset .. offset + length - 1."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=device) * -(math.log(10000.0) / max(1, half - 1)))
    pos = torch.arange(offset, offset + length, device=device, dtype=torch.float32)
    angles = pos[:, None] * freq[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(table, (0, dim - 2 * half))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, dim = x.shape
    return x.view(batch, length, heads, dim // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


# Decoding's default; training sets it from its config (`cpu_attention`, default fp32).
_cpu_bf16_attention = "bf16"


def set_cpu_bf16_attention(precision: str) -> None:
    """How bf16 attention with several query positions runs on the CPU (training, the
    encoder, cross-attention of a beam): "bf16", explicit bf16 matrix products; or "fp32",
    fp32 attention (see `attention`) on fp32 copies of q, k and v, for flat memory.

    oneDNN builds and keeps a kernel for every (batch x heads, query length, key length) it
    multiplies in bf16, a few MB each: at the Multi30k recipe's shapes bf16 training peaked at
    1,762 MB with "bf16" against 1,357 MB with "fp32" (fp32 training: 1,101 MB), in the same
    time (per update 0.97-1.02x, as short attentions take fp32 products, which keep no kernels;
    recipes/benchmarks/results/bf16_memory_cpu.txt), so training takes "fp32" by default.
    Decoding keeps "bf16": beam 5 is 5% faster with it, greedy 2%, and its shapes are bounded
    by the ladder."""
    global _cpu_bf16_attention
    if precision not in ("bf16", "fp32"):
        raise UserError(f"cpu_attention must be bf16 or fp32, not {precision!r}")
    _cpu_bf16_attention = precision


def attention(q, k, v, key_mask=None, causal=False, dropout_p=0.0) -> torch.Tensor:
    """Scaled dot-product attention; q, k, v (batch, heads, len, head_dim), mask True = attend.

    On the CPU plain matrix products beat PyTorch's fused kernel at short lengths: in fp32
    forward+backward about 2x at 20 positions, 1.25x at 64 (the fused kernel wins from about
    128 on), decoding's cross-attention (a beam's few query positions) 2-3x; so fp32 with short
    keys or few queries takes the explicit path. In bf16 the fused kernel is about six times
    slower (28 ms against 4.6 ms forward+backward for 128 sentences of 20 tokens), so bf16 on
    the CPU takes fp32 attention on fp32 copies (`set_cpu_bf16_attention("fp32")`, training's
    default) or the explicit bf16 path (decoding's), except for one query position
    (greedy decoding's cross-attention): there the explicit products would make oneDNN build
    and keep kernels for every (rows, source length) pair a translation meets. The decoder's
    self-attention in a decoding step does not come here: see `KeyValueCache.attend`.

    On GPUs, cuDNN's attention is left out: it builds a plan for every new tensor shape, and
    translation has many (each batch its lengths, each decoding step its key length). Measured
    on an H100 (torch 2.11, small Transformer, bf16): 380 ms for a training step of a shape
    not seen before against 20 ms once seen; without cuDNN 31 ms and 23.5 ms.
    """
    if q.dtype == torch.float32 and q.device.type == "cpu" and _short_fp32(q, k):
        return _explicit_attention(q, k, v, key_mask, causal, dropout_p)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.size(-2) > 1:
        if _cpu_bf16_attention == "bf16":
            return _explicit_attention(q, k, v, key_mask, causal, dropout_p)
        with torch.autocast("cpu", enabled=False):  # autocast would cast q, k, v back to bf16
            return attention(q.float(), k.float(), v.float(), key_mask, causal, dropout_p).to(q.dtype)
    kernels = sdpa_kernel(GPU_ATTENTION_KERNELS) if q.device.type == "cuda" else nullcontext()
    with kernels:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=dropout_p, is_causal=causal
        )


def _short_fp32(q: torch.Tensor, k: torch.Tensor) -> bool:
    # Not when compiling: a test of the lengths would make a graph per side of it.
    return not torch.compiler.is_compiling() and (k.size(-2) <= 64 or q.size(-2) <= 16)


def _explicit_attention(q, k, v, key_mask, causal, dropout_p) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    if causal:
        future = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    weights = dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout_p, dropout_p > 0)
    return weights @ v


class KeyValueCache:
    """One decoder layer's self-attention keys and values of the positions decoded so far.

    They live in a buffer with room for more positions, so that a step writes its own
    position in place instead of concatenating (a copy of the whole cache every step), and a
    beam reorder gathers into a second buffer kept for it instead of a fresh allocation (on
    the CPU a large allocation is fresh pages from the kernel every time). Beam-5 decoding in
    fp32 spent about a quarter of its time on those copies. On the CPU the buffer is fp32
    whatever the model computes in (see `attend`).
    """

    def __init__(self):
        self.keys: torch.Tensor | None = None  # (rows, heads, capacity, head_dim)
        self.values: torch.Tensor | None = None
        self.length = 0
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> KeyValueCache:
        """A cache over buffers with room past `length` (a compiled decoding step is handed
        the buffers and the length, not the cache object: see `TransformerDecoder.step`)."""
        cache = cls()
        cache.keys, cache.values, cache.length = keys, values, length
        return cache

    def reserve(self, like: torch.Tensor) -> None:
        """Make room for one more position (like: rows, heads, 1, head_dim)."""
        if self.keys is None or self.length == self.keys.size(2):
            self._grow(like)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add one position (k, v: rows, heads, 1, head_dim)."""
        self.reserve(k)
        # narrow, not an integer index: torch.compile would make a graph per position
        self.keys.narrow(2, self.length, 1).copy_(k)
        self.values.narrow(2, self.length, 1).copy_(v)
        self.length += 1

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of all positions so far (views into the buffer)."""
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def _grow(self, like: torch.Tensor) -> None:
        # growing copies the cache: by half its length, so that it happens rarely
        capacity = self.length + max(8, self.length // 2)
        dtype = torch.float32 if like.device.type == "cpu" else like.dtype
        shape = (like.size(0), like.size(1), capacity, like.size(3))
        keys, values = (like.new_empty(shape, dtype=dtype) for _ in "kv")
        if self.keys is not None:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        # zeros past the filled part: `attend` multiplies the whole buffer, and 0 weights
        # times garbage could be NaN
        keys[:, :, self.length :].zero_()
        values[:, :, self.length :].zero_()
        self.keys, self.values, self._spare = keys, values, None

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of one query position (q: rows, heads, 1, head_dim) over the positions
        so far.

        On the CPU PyTorch's fused kernel is slow for one query position: on 1,280 rows and
        10 positions 6.1 ms in bf16 and 1.9 ms in fp32, against 1.3 ms for explicit fp32
        products. fp32, not bf16 products: oneDNN would build and keep a bf16 kernel for
        every (rows, length) pair a translation meets (100,000 lines from a pipe peaked at
        845-1,067 MB instead of 650), while fp32 products keep nothing.

        The products take the whole buffers, the positions not yet written masked out of the
        softmax (their values are zeros): a product over the filled part, a slice of each
        row's block, first copied that part (1,440 rows, 14 of 16 positions: 1.7 ms for the
        scores against 0.4 ms from whole buffers). Test2016, old and new in turn in one
        process: fp32 beam 5 1.022x, greedy 1.025x, bf16 beam 5 1.047x, the same translations.
        """
        if q.device.type != "cpu":
            return attention(q, *self.filled())
        with torch.autocast("cpu", enabled=False):
            # `_explicit_attention` with a key mask, but masked in place: its out-of-place
            # masking cost fp32 beam 5 ~1.2%
            scores = q.float() @ self.keys.transpose(-1, -2)
            if torch.compiler.is_compiling():  # a slice's size would make a graph per length
                unfilled = torch.arange(self.keys.size(2), device=q.device) >= self.length
                scores = scores.masked_fill(unfilled, -math.inf)
            else:
                scores[..., self.length :] = -math.inf
            weights = torch.softmax(scores.mul_(q.size(-1) ** -0.5), dim=-1)
            return (weights @ self.values).to(q.dtype)

    def reorder(self, index: torch.Tensor) -> KeyValueCache:
        """Keep rows `index` (beam search), in place: the old order is not needed again."""
        if self.keys is None:
            return self
        shape = (index.numel(), *self.keys.shape[1:])
        if self._spare is None or self._spare[0].shape != shape:
            self._spare = (self.keys.new_empty(shape), self.values.new_empty(shape))
        # whole buffers: a contiguous gather of rows beats gathering the filled part only
        keys = torch.index_select(self.keys, 0, index, out=self._spare[0])
        values = torch.index_select(self.values, 0, index, out=self._spare[1])
        self._spare = (self.keys, self.values) if self.keys.size(0) == index.numel() else None
        self.keys, self.values = keys, values
        return self


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attention_dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.attention_dropout = attention_dropout

    def forward(self, x, key_mask=None, causal=False, cache: KeyValueCache | None = None):
        """x (batch, len, dim); key_mask (batch, 1, 1, len) True = attend.

        With `cache`, x holds the newest position only; its keys and values are appended
        to the cache and the query attends to all of them.
        """
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if cache is not None:
            cache.append(k, v)
            return self.out(_merge_heads(cache.attend(q)))
        p = self.attention_dropout if self.training else 0.0
        return self.out(_merge_heads(attention(q, k, v, key_mask, causal, p)))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attention_dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.attention_dropout = attention_dropout

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return _split_heads(k, self.heads), _split_heads(v, self.heads)

    def forward(self, x, k, v, key_mask):
        """x (rows, len, dim); k, v (batch, heads, src_len, head_dim) of `batch` sources.

        In beam search rows = batch * beam, the hypotheses of a sentence next to each other:
        they attend to their sentence's keys as extra query positions, so the keys and values
        are neither copied per hypothesis nor reordered with the beams.
        """
        rows, length, dim = x.shape
        q = _split_heads(self.q(x).view(k.size(0), -1, dim), self.heads)
        p = self.attention_dropout if self.training else 0.0
        return self.out(_merge_heads(attention(q, k, v, key_mask, False, p)).view(rows, length, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(dim, ffn_dim)
        self.down = nn.Linear(ffn_dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.up, PackedLinear):  # translation on a CPU: the product applies relu
            return self.down(self.up(x, activation="relu"))
        return self.down(relu_dropout(self.up(x), self.dropout, self.training))


class Residual(nn.Module):
    """x + dropout(f(norm(x))) when pre-norm, norm(x + dropout(f(x))) when post-norm."""

    def __init__(self, dim: int, pre_norm: bool, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pre_norm = pre_norm
        self.dropout = dropout

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return x + dropout(sublayer(self.norm(x)), self.dropout, self.training)
        return self.norm(x + dropout(sublayer(x), self.dropout, self.training))


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads, ffn_dim, dropout, attention_dropout, pre_norm):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, attention_dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.attn_block = Residual(dim, pre_norm, dropout)
        self.ffn_block = Residual(dim, pre_norm, dropout)

    def forward(self, x, key_mask):
        x = self.attn_block(x, lambda h: self.self_attn(h, key_mask=key_mask))
        return self.ffn_block(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, dim, heads, ffn_dim, dropout, attention_dropout, pre_norm):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, attention_dropout)
        self.cross_attn = CrossAttention(dim, heads, attention_dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.self_block = Residual(dim, pre_norm, dropout)
        self.cross_block = Residual(dim, pre_norm, dropout)
        self.ffn_block = Residual(dim, pre_norm, dropout)

    def forward(self, x, k, v, key_mask, cache=None):
        x = self.self_block(x, lambda h: self.self_attn(h, causal=cache is None, cache=cache))
        x = self.cross_block(x, lambda h: self.cross_attn(h, k, v, key_mask))
        return self.ffn_block(x, self.ffn)


def _init_linear_layers(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            nn.init.zeros_(sub.bias)


class TransformerEncoder(nn.Module):
    def __init__(self, dim, layers, heads, ffn_dim, dropout, attention_dropout, pre_norm):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(dim, heads, ffn_dim, dropout, attention_dropout, pre_norm) for _ in range(layers)
        )
        self.final_norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.dropout = dropout
        _init_linear_layers(self)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> EncoderOut:
        positions = sinusoidal_positions(emb.size(1), emb.size(2), device=emb.device)
        x = dropout(emb + positions.to(emb.dtype), self.dropout, self.training)
        key_mask = mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_mask)
        return {"memory": self.final_norm(x), "mask": mask}


class TransformerDecoder(nn.Module):
    def __init__(self, dim, layers, heads, ffn_dim, dropout, attention_dropout, pre_norm):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, heads, ffn_dim, dropout, attention_dropout, pre_norm) for _ in range(layers)
        )
        self.final_norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.dropout = dropout
        self._compiled_layers_step = None
        _init_linear_layers(self)

    def prepare(self, enc: EncoderOut) -> EncoderOut:
        """Cross-attention keys and values of every layer, computed once per source.

        Made contiguous once here: as views split from one product, every decoding step's
        matrix products would copy them (about 2% of fp32 beam search's time, more in bf16)."""
        prepared = dict(enc)
        for i, layer in enumerate(self.layers):
            k, v = layer.cross_attn.keys_values(enc["memory"])
            prepared[f"k{i}"], prepared[f"v{i}"] = k.contiguous(), v.contiguous()
        return prepared

    def _run(self, x, enc, caches):
        key_mask = enc["mask"][:, None, None, :]
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            x = layer(x, enc[f"k{i}"], enc[f"v{i}"], key_mask, cache)
        return self.final_norm(x)

    def forward(self, emb: torch.Tensor, enc: EncoderOut) -> torch.Tensor:
        """Teacher forcing: emb (batch, tgt_len, dim) -> (batch, tgt_len, dim)."""
        positions = sinusoidal_positions(emb.size(1), emb.size(2), device=emb.device)
        x = dropout(emb + positions.to(emb.dtype), self.dropout, self.training)
        return self._run(x, enc, None)

    def step(self, emb: torch.Tensor, enc: EncoderOut, cache: dict | None):
        """One incremental step: emb (batch, dim) of the previous token -> (batch, dim).

        The layers' work is `_layers_step`, handed the cache buffers and the position as
        plain tensors and an int, so that torch.compile (`compile_step`) traces it once for
        every position and batch size; growing the buffers stays outside it."""
        if cache is None:
            cache = {"position": 0, "layers": [KeyValueCache() for _ in self.layers]}
        layers, position = cache["layers"], cache["position"]
        heads, device = self.layers[0].self_attn.heads, emb.device.type
        # shaped and typed as a step's keys (autocast's dtype, if on: that of the products)
        dtype = torch.get_autocast_dtype(device) if autocast_active(device) else emb.dtype
        like = emb.new_empty(emb.size(0), heads, 1, emb.size(-1) // heads, dtype=dtype)
        for layer_cache in layers:
            layer_cache.reserve(like)
        step = self._compiled_layers_step or self._layers_step
        out = step(emb, enc, [c.keys for c in layers], [c.values for c in layers], position)
        for layer_cache in layers:
            layer_cache.length += 1
        cache["position"] += 1
        return out, cache

    def _layers_step(self, emb, enc, keys: list, values: list, position: int) -> torch.Tensor:
        pe = sinusoidal_positions(1, emb.size(-1), position, device=emb.device)
        x = (emb + pe.to(emb.dtype)).unsqueeze(1)
        caches = [KeyValueCache.over(k, v, position) for k, v in zip(keys, values, strict=True)]
        return self._run(x, enc, caches).squeeze(1)

    def compile_step(self) -> None:
        """Decode through a torch.compile'd `_layers_step` from now on (`translate --compile`);
        the output layer and the beam bookkeeping stay eager. Sizes are dynamic, but a few
        cases still get graphs of their own (the first position, one row, a beam's first step
        with one row per sentence): 3 on test2016 with beam 5, up to 8 in the tests' mixes,
        then none. dynamo's default limit is 8 graphs per function, past which it would decode
        eagerly without a word, so it is raised."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled_layers_step = torch.compile(self._layers_step, dynamic=True)
