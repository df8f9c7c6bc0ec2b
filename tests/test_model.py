"""Models and tying: identity, gradients, incremental decoding, errors, exact sizes, learning."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nmt_tie.checkpoint import load_checkpoint, load_model, model_payload, save_atomic
from nmt_tie.cli import main
from nmt_tie.config import ModelConfig
from nmt_tie.errors import UserError
from nmt_tie.model.embeddings import MATRIX_OF_ROLE, ROLES
from nmt_tie.model.seq2seq import build_model
from nmt_tie.report import count_unique

MODES = ("none", "decoder", "src-tgt", "all")
ARCHS = ("rnn", "transformer")


def tiny_config(arch: str, tie: str = "all", vocab: int = 50, **kwargs) -> ModelConfig:
    base = dict(
        arch=arch,
        tie=tie,
        emb_dim=32,
        hidden_dim=24,
        ffn_dim=64,
        enc_layers=2,
        dec_layers=2,
        heads=4,
        dropout=0.0,
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
        shared_vocab=True,
    )
    return ModelConfig(**{**base, **kwargs})


def source_batch(vocab: int = 50) -> torch.Tensor:
    torch.manual_seed(0)
    src = torch.randint(4, vocab, (3, 7))
    src[0, 5:] = 0  # padding
    src[1, 3:] = 0
    return src


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", MODES)
def test_tied_roles_are_one_parameter_before_and_after_save_load(arch, tie, tmp_path):
    model = build_model(tiny_config(arch, tie))
    emb = model.embeddings
    for a in ROLES:
        for b in ROLES:
            tied = MATRIX_OF_ROLE[tie][a] == MATRIX_OF_ROLE[tie][b]
            assert (emb.weight(a) is emb.weight(b)) == tied
    # Each matrix once in the state dict and in parameters().
    names = [n for n in model.state_dict() if n.startswith("embeddings.matrices.")]
    assert len(names) == len(set(MATRIX_OF_ROLE[tie].values()))
    save_atomic(model_payload(model, model.config, vocab={}), tmp_path / "m.pt")
    loaded = load_model(load_checkpoint(tmp_path / "m.pt"))
    for a in ROLES:
        for b in ROLES:
            tied = MATRIX_OF_ROLE[tie][a] == MATRIX_OF_ROLE[tie][b]
            assert (loaded.embeddings.weight(a) is loaded.embeddings.weight(b)) == tied
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    # The optimizer sees each tensor once, so a tied matrix has one optimizer state.
    opt = torch.optim.Adam(loaded.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(loaded.parameters()))
    assert len({id(p) for p in loaded.parameters()}) == len(list(loaded.parameters()))


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_gradient_is_the_sum_of_the_untied_role_gradients(arch):
    torch.manual_seed(1)
    tied = build_model(tiny_config(arch, "all"))
    untied = build_model(tiny_config(arch, "none"))
    untied.encoder.load_state_dict(tied.encoder.state_dict())
    untied.decoder.load_state_dict(tied.decoder.state_dict())
    with torch.no_grad():
        for role in ROLES:
            untied.embeddings.weight(role).copy_(tied.embeddings.weight("output"))
        untied.embeddings.output_bias.copy_(tied.embeddings.output_bias)
    src = source_batch()
    tgt = torch.randint(4, 50, (3, 6))
    for model in (tied, untied):
        logits = model(src, tgt)
        F.cross_entropy(logits.flatten(0, 1), tgt.roll(-1, 1).flatten()).backward()
    role_sum = sum(untied.embeddings.weight(role).grad for role in ROLES)
    torch.testing.assert_close(tied.embeddings.weight("output").grad, role_sum, rtol=1e-5, atol=1e-7)
    # And the roles really contribute: each untied role gradient is non-zero.
    assert all(untied.embeddings.weight(r).grad.abs().sum() > 0 for r in ROLES)


@pytest.mark.parametrize("arch, norm", [("rnn", "pre"), ("transformer", "pre"), ("transformer", "post")])
def test_incremental_decoding_equals_the_full_forward_pass(arch, norm):
    torch.manual_seed(2)
    model = build_model(tiny_config(arch, "all", norm=norm, projection_reg=0.1)).eval()
    src = source_batch()
    tgt = torch.randint(4, 50, (3, 9))
    with torch.no_grad():
        full = model(src, tgt)
        enc = model.encode(src)
        cache, steps = None, []
        for t in range(tgt.size(1)):
            logits, cache = model.decode_step(enc, tgt[:, t], cache)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("autocast", [False, True])
def test_a_decoding_step_writes_its_logits_into_the_buffer_it_is_given(arch, autocast):
    """Search keeps one fp32 buffer for every step's scores: a step given `out` writes there
    (also under bf16 autocast, where the product is bf16) what it would return fresh."""
    torch.manual_seed(3)
    model = build_model(tiny_config(arch, "all", projection_reg=0.1)).eval()
    src = source_batch()
    buffer = torch.full((8, model.embeddings.weight("output").size(0)), math.nan)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        enc = model.encode(src)
        fresh_cache = buffered_cache = None
        for _ in range(3):
            prev = torch.randint(4, 50, (src.size(0),))
            fresh, fresh_cache = model.decode_step(enc, prev, fresh_cache)
            out = buffer[: src.size(0)]
            written, buffered_cache = model.decode_step(enc, prev, buffered_cache, out=out)
            assert written.data_ptr() == buffer.data_ptr() and written.dtype == torch.float32
            torch.testing.assert_close(written, fresh.float(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_beams_of_a_sentence_share_its_encoder_output(arch):
    """Beam search gives the decoder `beam` adjacent rows per sentence and one encoder output
    per sentence: each step must equal decoding from an encoder output copied per row."""
    torch.manual_seed(5)
    model = build_model(tiny_config(arch, "all")).eval()
    src, beam = source_batch(), 3
    with torch.no_grad():
        enc = model.encode(src)
        copied = {key: value.repeat_interleave(beam, 0) for key, value in enc.items()}
        shared_cache = copied_cache = None
        for _ in range(4):
            prev = torch.randint(4, 50, (src.size(0) * beam,))
            shared, shared_cache = model.decode_step(enc, prev, shared_cache)
            expected, copied_cache = model.decode_step(copied, prev, copied_cache)
            torch.testing.assert_close(shared, expected, rtol=0, atol=1e-5)


def test_key_value_cache_equals_concatenation_through_reorders_and_growth():
    """Appending in place and reordering into a spare buffer give exactly the keys and values
    of concatenating and selecting rows, also when rows leave and the buffer grows."""
    from nmt_tie.model.transformer import KeyValueCache

    torch.manual_seed(6)
    cache, keys, values = KeyValueCache(), None, None
    rows = 12
    for step in range(30):  # past the first capacity (8) and its growth
        k, v = torch.randn(rows, 2, 1, 4), torch.randn(rows, 2, 1, 4)
        keys = k if keys is None else torch.cat([keys, k], 2)
        values = v if values is None else torch.cat([values, v], 2)
        cache.append(k, v)
        got_keys, got_values = cache.filled()
        assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
        if step in (10, 20):
            rows -= 4  # sentences leave the batch
        index = torch.randint(0, keys.size(0), (rows,))
        cache.reorder(index)
        keys, values = keys.index_select(0, index), values.index_select(0, index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decoding_step_attends_to_every_cached_position_in_fp32(dtype):
    """The decoder's self-attention in a step (`KeyValueCache.attend`): one query over the
    positions appended so far, past the buffer's growth and through reorders, equals the
    formula; on the CPU the cache and the products are fp32 under bf16 autocast too (bf16
    products would make oneDNN keep a kernel for every (rows, length) pair), and the result
    comes back in the model's dtype."""
    from nmt_tie.model.transformer import KeyValueCache

    torch.manual_seed(7)
    cache, keys, values = KeyValueCache(), None, None
    rows = 5
    for step in range(20):  # past the first capacity (8) and the second (16)
        k, v, q = (torch.randn(rows, 2, 1, 8).to(dtype) for _ in range(3))
        cache.append(k, v)
        keys = k.float() if keys is None else torch.cat([keys, k.float()], 2)
        values = v.float() if values is None else torch.cat([values, v.float()], 2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            got = cache.attend(q)
        assert got.dtype == dtype and cache.keys.dtype == torch.float32
        expected = torch.softmax(q.float() @ keys.transpose(-1, -2) / 8**0.5, -1) @ values
        # bf16: within one rounding of the fp32 result (its products sum in their own order)
        rtol = 0 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(got.float(), expected, atol=1e-6, rtol=rtol)
        # attend multiplies whole buffers: the positions not yet written must hold zeros
        assert not cache.values[:, :, cache.length :].any()
        index = torch.randint(0, rows, (3 if step == 9 else rows,))  # at step 9 rows leave
        rows = index.numel()
        cache.reorder(index)
        keys, values = keys.index_select(0, index), values.index_select(0, index)


@pytest.mark.parametrize(
    "dtype,cpu_attention", [(torch.float32, "bf16"), (torch.bfloat16, "bf16"), (torch.bfloat16, "fp32")]
)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_kernels_equal_the_textbook_formula_with_masks(dtype, cpu_attention, causal, monkeypatch):
    """fp32 at these short lengths takes explicit products, bf16 on the CPU too (or with
    cpu_attention fp32 fp32 products, under autocast too): all must be
    softmax(q k^T / sqrt(d) + mask) v, with padded keys (encoder, cross-attention) or future
    positions (decoder self-attention, which has no padded keys: they come last) masked."""
    from nmt_tie.model import transformer
    from nmt_tie.model.transformer import attention

    monkeypatch.setattr(transformer, "_cpu_bf16_attention", "bf16")
    transformer.set_cpu_bf16_attention(cpu_attention)

    torch.manual_seed(4)
    q, k, v = (torch.randn(3, 2, 6, 8) for _ in range(3))
    key_mask = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    key_mask[0, ..., 4:] = False  # padding
    key_mask[1, ..., 2:] = False
    scores = q @ k.transpose(-1, -2) / 8**0.5
    if causal:
        key_mask = None
        scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    else:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    expected = torch.softmax(scores, -1) @ v
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = attention(q.to(dtype), k.to(dtype), v.to(dtype), key_mask, causal=causal)
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=0)
    if cpu_attention == "fp32":  # fp32 products of the bf16 inputs, rounded once to bf16
        q, k, v = (t.to(dtype).float() for t in (q, k, v))
        exact = transformer._explicit_attention(q, k, v, key_mask, causal, 0.0)  # fp32 at these lengths
        torch.testing.assert_close(got, exact.to(dtype), atol=0, rtol=0)


def test_cpu_attention_takes_bf16_or_fp32_only(monkeypatch):
    from nmt_tie.errors import UserError
    from nmt_tie.model import transformer

    monkeypatch.setattr(transformer, "_cpu_bf16_attention", "bf16")
    with pytest.raises(UserError, match="cpu_attention must be bf16 or fp32"):
        transformer.set_cpu_bf16_attention("fp16")


@pytest.mark.parametrize(
    "dtype,queries,keys,fused",
    [
        (torch.bfloat16, 1, 7, True),  # greedy decoding's cross-attention
        (torch.float32, 1, 7, False),
        (torch.float32, 5, 90, False),  # a beam's queries over a long source
        (torch.float32, 90, 90, True),  # training on long sentences
    ],
)
def test_cpu_attention_picks_its_kernel_by_shape_and_equals_the_formula(
    dtype, queries, keys, fused, monkeypatch
):
    """PyTorch's fused kernel for one bf16 query position (the explicit bf16 products would
    make oneDNN keep kernels for every (rows, source length) pair) and for fp32 with many
    queries over many keys; explicit fp32 products (faster) for short keys or few queries.
    All equal the formula with padded keys masked."""

    from nmt_tie.model import transformer

    torch.manual_seed(5)
    q, k, v = torch.randn(4, 2, queries, 8), torch.randn(4, 2, keys, 8), torch.randn(4, 2, keys, 8)
    key_mask = torch.ones(4, 1, 1, keys, dtype=torch.bool)
    key_mask[2, ..., 3:] = False
    expected = torch.softmax((q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~key_mask, float("-inf")), -1) @ v
    fused_calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        transformer.F,
        "scaled_dot_product_attention",
        lambda *a, **kw: fused_calls.append(1) or real_sdpa(*a, **kw),
    )
    got = transformer.attention(q.to(dtype), k.to(dtype), v.to(dtype), key_mask).float()
    assert fused_calls == ([1] if fused else [])
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_drops_its_share_and_keeps_the_expectation(dtype):
    """The integer-bit dropout: p rounded to 1/256, survivors scaled by 256 / (256 - dropped),
    the gradient is the same mask and scale, and nothing happens outside training."""
    from nmt_tie.model.dropout import dropout

    torch.manual_seed(0)
    x = torch.full((400_000,), 0.75, dtype=dtype, requires_grad=True)
    for p, dropped in ((0.1, 26), (0.3, 77)):
        x.grad = None
        y = dropout(x, p, True)
        y.backward(torch.ones_like(y))
        scale = 256 / (256 - dropped)
        kept = y != 0
        assert abs(1 - kept.float().mean().item() - dropped / 256) < 0.003
        expected = torch.tensor(0.75, dtype=dtype) * scale  # rounded as the dtype rounds it
        assert (y[kept] == expected).all()
        assert (x.grad == kept.to(dtype) * torch.tensor(scale, dtype=dtype)).all()
        assert abs(y.float().mean().item() - 0.75) < 0.01
    assert dropout(x, 0.3, False) is x and dropout(x, 0.0, True) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_relu_dropout_equals_relu_then_dropout(dtype):
    """The feed-forward layer's relu + dropout in one function: with the same random numbers
    the same output and the same gradient as relu and `dropout` apart, bit for bit."""
    from torch.nn import functional as F

    from nmt_tie.model.dropout import dropout, relu_dropout

    x = torch.randn(300, 70, dtype=dtype)
    x[0, :5] = 0.0  # relu's kink: no gradient at zero in both
    grad = torch.randn(300, 70, dtype=dtype)
    results = []
    for fn in (relu_dropout, lambda h, p, training: dropout(F.relu(h), p, training)):
        torch.manual_seed(3)
        leaf = x.clone().requires_grad_()
        out = fn(leaf, 0.2, True)
        out.backward(grad)
        results.append((out, leaf.grad))
    (out, x_grad), (reference, reference_grad) = results
    assert torch.equal(out, reference) and torch.equal(x_grad, reference_grad)
    dropped = (out == 0) & (x > 0)
    assert 0.15 < dropped.sum() / (x > 0).sum() < 0.25
    assert torch.equal(relu_dropout(x, 0.2, False), F.relu(x))


def test_rnn_loop_weight_gradients_equal_step_by_step_autograd(monkeypatch):
    """LoopLinear takes each recurrent weight's gradient in one product over all time steps;
    it must equal autograd's step-by-step sum (float64), for every parameter, padding included,
    and under bf16 autocast be no further from the float64 gradient than the plain path."""
    from nmt_tie.model import rnn

    torch.manual_seed(4)
    model = build_model(tiny_config("rnn", "all", emb_dropout=0.0)).double()
    src, tgt = source_batch(), torch.randint(4, 50, (3, 6))
    loop_linear, wrapped = rnn.LoopLinear, []

    def counted_loop_linear(layer):
        wrapped.append(layer)
        return loop_linear(layer)

    def gradients(loop: bool, autocast: bool = False, dtype=torch.float64) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(rnn, "LoopLinear", counted_loop_linear if loop else (lambda layer: layer))
        copy = build_model(tiny_config("rnn", "all", emb_dropout=0.0)).to(dtype)
        copy.load_state_dict(model.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = copy(src, tgt)
        F.cross_entropy(logits.float().flatten(0, 1), tgt.roll(-1, 1).flatten()).backward()
        monkeypatch.undo()
        return {name: p.grad.double() for name, p in copy.named_parameters()}

    plain, looped = gradients(loop=False), gradients(loop=True)
    # the four GRUs' recurrent weights, the attention query, GRU2's input projection
    assert len(wrapped) == 6
    loop_suffixes = ("recurrent.weight", "att_query.weight", "gru2.input_proj.weight")
    loop_weights = [name for name in plain if name.endswith(loop_suffixes)]
    assert len(loop_weights) == 6
    for name in plain:
        torch.testing.assert_close(looped[name], plain[name], rtol=1e-12, atol=1e-15, msg=name)

    def error(grads: dict, name: str) -> float:
        return float((grads[name] - plain[name]).norm() / plain[name].norm())

    plain_bf16 = gradients(loop=False, autocast=True, dtype=torch.float32)
    looped_bf16 = gradients(loop=True, autocast=True, dtype=torch.float32)
    for name in loop_weights:
        assert error(looped_bf16, name) <= error(plain_bf16, name) * 1.05, name


def test_source_padding_does_not_change_the_result():
    torch.manual_seed(3)
    for arch in ARCHS:
        model = build_model(tiny_config(arch)).eval()
        src = torch.tensor([[5, 6, 7, 3]])
        padded = torch.tensor([[5, 6, 7, 3, 0, 0, 0]])
        tgt = torch.tensor([[2, 9, 10]])
        with torch.no_grad():
            torch.testing.assert_close(model(src, tgt), model(padded, tgt), atol=1e-5, rtol=0)


def test_tying_errors_say_what_to_change():
    with pytest.raises(UserError, match=r"re-run `nmt-tie prepare --joint`.*tie: decoder"):
        build_model(tiny_config("transformer", "all", shared_vocab=False))
    with pytest.raises(UserError, match="tie: src-tgt needs one vocabulary"):
        build_model(tiny_config("rnn", "src-tgt", shared_vocab=False))
    with pytest.raises(UserError, match="deep_output: true"):
        build_model(tiny_config("rnn", "decoder", deep_output=False))
    # Without tying of the output, the same model is fine (output layer of hidden size).
    model = build_model(tiny_config("rnn", "src-tgt", deep_output=False))
    assert model.embeddings.weight("output").shape == (50, 24)
    with pytest.raises(UserError, match="tie: 'both' is not one of"):
        build_model(tiny_config("rnn", "both"))


def test_equal_sized_separate_vocabularies_never_tie(tmp_path, small_corpus):
    from conftest import prepare_small

    from nmt_tie.data.prepare import PreparedData
    from nmt_tie.model.seq2seq import configure_for_data

    out = prepare_small(small_corpus, tmp_path / "separate", vocab_size=600, joint=False)
    config = configure_for_data(tiny_config("transformer", "all"), PreparedData(out))
    assert config.src_vocab_size == config.tgt_vocab_size == 600 and not config.shared_vocab
    with pytest.raises(UserError, match="pieces differ"):
        build_model(config)
    assert build_model(dataclasses.replace(config, tie="decoder")).embeddings.tie == "decoder"


def test_projection_regularization_only_when_set():
    plain = build_model(tiny_config("rnn", "all"))
    assert plain.embeddings.projection is None and plain.projection_penalty() is None
    assert not any("projection" in n for n, _ in plain.named_parameters())
    model = build_model(tiny_config("rnn", "all", projection_reg=0.15))
    P = model.embeddings.projection
    assert P.shape == (32, 32)
    with torch.no_grad():
        P.copy_(torch.randn(32, 32))
    torch.testing.assert_close(model.projection_penalty(), (P**2).sum())
    h = torch.randn(5, 32)
    expected = (h @ P) @ model.embeddings.weight("output").T + model.embeddings.output_bias
    torch.testing.assert_close(model.embeddings.logits(h), expected)
    assert count_unique(model) == count_unique(plain) + 32 * 32


@pytest.mark.parametrize("tie", ["none", "all"])
def test_embedding_initialization_scale_is_a_setting(tie):
    """Unit-norm rows by default (std emb_dim ** -0.5); emb_init_std sets every matrix's std,
    padding row zero; a non-positive value is refused."""
    vocab = 4000  # enough entries for the sample std to be within 2% of the true one
    for std, expected in ((None, 32**-0.5), (0.01, 0.01)):
        model = build_model(tiny_config("transformer", tie, vocab=vocab, emb_init_std=std))
        matrices = list(model.embeddings.matrices.values())
        assert len(matrices) == (1 if tie == "all" else 3)
        for matrix in matrices:
            assert matrix[1:].std().item() == pytest.approx(expected, rel=0.02)
            assert not matrix[0].any()  # the padding row
    with pytest.raises(UserError, match="emb_init_std must be > 0"):
        build_model(tiny_config("transformer", emb_init_std=0.0))


def test_exact_parameter_counts_computed_by_hand():
    V, E, H = 50, 32, 24
    gru = lambda i: 3 * H * (i + H + 1)  # input weights + bias, recurrent weights  # noqa: E731
    encoder = 2 * gru(E)
    decoder = (
        (2 * H * H + H)  # init state from the mean annotation
        + gru(E)  # GRU1
        + H * 2 * H  # W_comb_att
        + (2 * H * 2 * H + 2 * H)  # Wc_att, b_att
        + (2 * H + 1)  # U_att, c_tt
        + gru(2 * H)  # GRU2 on the 2H context
        + (H * E + E)
        + (E * E + E)
        + (2 * H * E + E)  # deep output
    )
    for tie, matrices in (("none", 3), ("decoder", 2), ("src-tgt", 2), ("all", 1)):
        model = build_model(tiny_config("rnn", tie))
        assert count_unique(model.encoder) == encoder
        assert count_unique(model.decoder) == decoder
        assert count_unique(model) == matrices * V * E + V + encoder + decoder
    d, f, L = 32, 64, 2
    attn = 4 * (d * d + d)
    ffn = d * f + f + f * d + d
    norm = 2 * d
    enc_layer = attn + ffn + 2 * norm
    dec_layer = 2 * attn + ffn + 3 * norm
    model = build_model(tiny_config("transformer", "all"))
    assert count_unique(model.encoder) == L * enc_layer + norm
    assert count_unique(model.decoder) == L * dec_layer + norm
    assert count_unique(model) == V * d + V + L * (enc_layer + dec_layer) + 2 * norm


@pytest.mark.parametrize(
    "vocab, expected",
    [(("87000", "92000"), (168e6, 122e6, 80e6)), (("83000", "91000"), (165e6, 119e6, 79e6))],
)
def test_paper_sizes_from_flags_within_one_percent(capsys, vocab, expected):
    main(
        [
            "params",
            "--arch",
            "rnn",
            "--emb-dim",
            "500",
            "--hidden-dim",
            "1000",
            "--src-vocab",
            vocab[0],
            "--tgt-vocab",
            vocab[1],
            "--joint-vocab",
            "94000",
            "--tie-modes",
            "none,decoder,all",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    for mode, paper in zip(("none", "decoder", "all"), expected, strict=True):
        assert abs(result[mode]["params"] - paper) / paper < 0.01, (mode, result[mode])
    assert result["none"]["reduction"] == 0.0
    assert 0.5 < result["all"]["reduction"] < 0.54


def test_three_way_tied_checkpoint_is_about_half_the_untied_one(tmp_path):
    sizes = {}
    for tie in ("none", "all"):
        model = build_model(tiny_config("rnn", tie, vocab=4000, emb_dim=64, hidden_dim=16))
        save_atomic(model_payload(model, model.config, vocab={}), tmp_path / f"{tie}.pt")
        sizes[tie] = (tmp_path / f"{tie}.pt").stat().st_size
        assert abs(sizes[tie] - 4 * count_unique(model)) / sizes[tie] < 0.02
    assert 0.3 < sizes["all"] / sizes["none"] < 0.4  # 1 of 3 matrices, plus the rest


class _Evil:
    def __reduce__(self):
        return (print, ("this ran code",))


def test_checkpoints_from_strangers_cannot_run_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "nmt-tie/1", "payload": _Evil()}, path)
    with pytest.raises(UserError, match="not a safe nmt-tie checkpoint"):
        load_checkpoint(path)


def test_missing_and_truncated_checkpoints(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    model = build_model(tiny_config("rnn"))
    save_atomic(model_payload(model, model.config, vocab={}), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not an nmt-tie checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


DDP_CHECK = """
import os, sys, torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, {tests!r})
from test_model import build_model, source_batch, tiny_config

dist.init_process_group("gloo", init_method={store!r}, rank=0, world_size=1)
model = build_model(tiny_config("transformer", "all"))
wrapped = DistributedDataParallel(model)
inner = wrapped.module.embeddings
assert inner.weight("encoder_input") is inner.weight("output")
logits = wrapped(source_batch(), torch.randint(4, 50, (3, 5)))
logits.sum().backward()
assert inner.weight("output").grad is not None
assert len(list(wrapped.parameters())) == len(list(model.parameters()))
print("tied under DDP", flush=True)
os._exit(0)  # skip gloo's teardown, which now and then hangs (pytorch/pytorch#75097)
"""


def test_ddp_wrapping_keeps_one_tied_parameter(tmp_path):
    """In a child process that exits without tearing its gloo process group down: the
    teardown (ProcessGroupGloo's destructor joining its threads) hung a whole test run once."""
    import subprocess
    import sys
    from pathlib import Path

    script = DDP_CHECK.format(tests=str(Path(__file__).parent), store=f"file://{tmp_path / 'store'}")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tied under DDP" in result.stdout


def copy_task_batch(vocab: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.randint(3, 7, (batch,))
    src = torch.zeros(batch, 7, dtype=torch.long)
    tgt_in = torch.zeros(batch, 8, dtype=torch.long)
    tgt_out = torch.zeros(batch, 8, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        seq = torch.randint(4, vocab, (n,))
        src[i, :n], src[i, n] = seq, 3
        tgt_in[i, 0], tgt_in[i, 1 : n + 1] = 2, seq
        tgt_out[i, :n], tgt_out[i, n] = seq, 3
    return src, tgt_in, tgt_out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", MODES)
def test_each_architecture_and_tying_mode_learns_to_copy(arch, tie):
    torch.manual_seed(4)
    vocab = 16
    config = tiny_config(
        arch, tie, vocab=vocab, emb_dim=64, hidden_dim=64, ffn_dim=128, enc_layers=1, dec_layers=1
    )
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Decayed to 0: at a constant 3e-3 the loss spikes now and then, and whether update 300
    # met a spike turned on rounding (seed 4 ended at 0.005 or 0.27 by attention kernel).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1 - update / 300)
    for _ in range(300):
        src, tgt_in, tgt_out = copy_task_batch(vocab)
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    src, tgt_in, tgt_out = copy_task_batch(vocab, 256)
    with torch.no_grad():
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=0)
    assert loss < 0.2, f"{arch}/{tie}: copy loss {loss:.3f}"


def test_config_overrides_may_follow_the_flags(capsys, tmp_path, small_corpus):
    """`nmt-tie params CONFIG --data DIR ffn_dim=512`: overrides after a flag count as they do
    before it; anything else left over is still refused."""
    from conftest import prepare_small, run_cli

    data = prepare_small(small_corpus, tmp_path / "prep")
    config = str(Path(__file__).resolve().parents[1] / "recipes" / "multi30k" / "transformer-all.yaml")
    before = run_cli(capsys, "params", config, "ffn_dim=512", "enc_layers=2", "--data", str(data), "--json")
    after = run_cli(capsys, "params", config, "--data", str(data), "--json", "ffn_dim=512", "enc_layers=2")
    plain = run_cli(capsys, "params", config, "--data", str(data), "--json")
    assert before[0] == after[0] == plain[0] == 0
    assert json.loads(before[1]) == json.loads(after[1]) != json.loads(plain[1])
    code, _, err = run_cli(capsys, "params", config, "--data", str(data), "--bogus", "x=1")
    assert code == 2 and "unrecognized arguments: --bogus x=1" in err
