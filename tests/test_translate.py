"""Search and `nmt-tie translate/score/average`: beam vs greedy, batching, ensembles, bad input."""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import prepare_small, run_cli, write_lines
from test_model import tiny_config

from nmt_tie.checkpoint import average_checkpoints, load_checkpoint, load_model, save_atomic
from nmt_tie.data.prepare import PreparedData
from nmt_tie.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt_tie.evaluate import score
from nmt_tie.model.packed import PackedLinear, packing_available
from nmt_tie.model.seq2seq import EncoderDecoder, build_model, configure_for_data
from nmt_tie.search import Ensemble, beam_search, best_candidates, greedy_search, max_lengths
from nmt_tie.training.trainer import Trainer
from nmt_tie.training.translation import TranslationTask
from nmt_tie.translate import SearchOptions, Translator


@pytest.mark.parametrize("arch", ["rnn", "transformer"])
def test_beam_one_equals_greedy(arch):
    torch.manual_seed(5)
    model = build_model(tiny_config(arch)).eval()
    src = torch.randint(4, 50, (8, 9))
    src[2, 4:] = 0
    limit = max_lengths(src, 1.5, 5)
    greedy = greedy_search(Ensemble([model]), src, limit)
    beam = beam_search(Ensemble([model]), src, limit, beam=1)
    assert [g.tokens for g in greedy] == [b[0].tokens for b in beam]
    for g, b in zip(greedy, beam, strict=True):
        # The default normalization: the mean log-probability per token, EOS included.
        assert b[0].score == pytest.approx(g.score / (len(g.tokens) + 1), rel=1e-5)


@pytest.mark.parametrize("arch", ["rnn", "transformer"])
def test_a_batch_gives_the_same_output_as_one_sentence_at_a_time(arch):
    torch.manual_seed(6)
    model = build_model(tiny_config(arch)).eval()
    sources = [torch.randint(4, 50, (n,)).tolist() for n in (3, 9, 5, 12, 1, 7)]
    translator = Translator([model], None, None, SearchOptions(beam=4, nbest=2, max_len_b=5))
    together = translator.translate_ids(sources)
    alone = [translator.translate_ids([s])[0] for s in sources]
    for a, b in zip(together, alone, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


@pytest.mark.parametrize("beam", [1, 3])
def test_search_keeps_row_counts_on_the_ladder_and_results_unchanged(beam):
    """Finished sentences leave the batch only in ladder steps (done ones fill the rest and
    take no more hypotheses), in beam search and greedy search alike: the decoder sees few
    row counts, and every sentence gets what it gets alone. The first step decodes one row
    per sentence (its beams are copies of one another)."""
    from nmt_tie.data.batching import ladder_up

    torch.manual_seed(7)
    model = build_model(tiny_config("transformer")).eval()
    sources = [torch.randint(4, 50, (n,)).tolist() for n in torch.randint(1, 10, (24,)).tolist()]
    rows_seen = []
    step = model.decode_step

    def recording_step(enc, prev, cache, out=None):
        rows_seen.append(prev.size(0))
        return step(enc, prev, cache, out)

    model.decode_step = recording_step
    translator = Translator(
        [model], None, None, SearchOptions(beam=beam, nbest=beam, max_len_b=4, max_tokens=100000)
    )
    together = translator.translate_ids(sources)
    first, later = rows_seen[0], set(rows_seen[1:])
    assert first == 24
    assert all(rows % beam == 0 and rows // beam == ladder_up(rows // beam) for rows in later)
    assert max(later) == beam * 24 and len(later) > 3, later  # sentences did leave
    for source, hyps in zip(sources, together, strict=True):
        alone = translator.translate_ids([source])[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-4)


def test_ensemble_steps_reuse_one_score_buffer_as_rows_leave():
    """Every step's log-probabilities land in the buffer the first step made (fresh memory
    each step costs page faults), also after sentences leave; they equal a fresh step's."""
    torch.manual_seed(8)
    model = build_model(tiny_config("transformer")).eval()
    ensemble, src = Ensemble([model]), torch.randint(4, 50, (4, 6))
    with torch.no_grad():
        encs, enc = ensemble.encode(src), model.encode(src)
        caches = cache = None
        prev, pointers = torch.full((4,), BOS_ID), set()
        for rows in (4, 4, 2, 2, 1):
            if rows < prev.size(0):
                keep = torch.arange(rows)
                encs, caches = Ensemble.reorder(encs, keep), Ensemble.reorder(caches, keep)
                enc, cache, prev = (
                    EncoderDecoder.reorder(enc, keep),
                    EncoderDecoder.reorder(cache, keep),
                    prev[:rows],
                )
            log_probs, caches = ensemble.step(encs, prev, caches)
            logits, cache = model.decode_step(enc, prev, cache)
            expected = torch.log_softmax(logits, -1)
            expected[:, [PAD_ID, BOS_ID]] = -math.inf
            torch.testing.assert_close(log_probs, expected, rtol=0, atol=1e-6)
            pointers.add(log_probs.data_ptr())
            prev = torch.randint(4, 50, (rows,))
    assert len(pointers) == 1


class TableModel(torch.nn.Module):
    """A hand-set 'decoder' from a table of next-token probabilities given the previous token."""

    def __init__(self, transitions: dict[int, dict[int, float]], vocab: int = 12):
        super().__init__()
        table = torch.full((vocab, vocab), 1e-12, dtype=torch.float64)
        for prev, nexts in transitions.items():
            for token, p in nexts.items():
                table[prev, token] = p
        self.register_buffer("log_table", (table / table.sum(1, keepdim=True)).log().float())

    def encode(self, src):
        return {"mask": src != 0}

    def decode_step(self, enc, prev, cache, out=None):
        return torch.index_select(self.log_table, 0, prev, out=out), {"steps": torch.zeros(prev.size(0))}

    fills_out = True

    reorder = staticmethod(EncoderDecoder.reorder)


def MarkovModel() -> TableModel:  # noqa: N802 (reads as the model it builds)
    """From BOS: token 4 with p=0.5, token 5 with p=0.4. After 4 every one of 10 tokens has
    p=0.09 (and EOS 0.1), after 5 EOS has p=0.9. Greedy takes 4 (log p = log .5 + log .1),
    the better sequence is 5 EOS (log .4 + log .9)."""
    after_4 = {token: 0.09 for token in range(6, 16)} | {EOS_ID: 0.1}
    transitions = {BOS_ID: {4: 0.5, 5: 0.4, EOS_ID: 0.1}, 4: after_4, 5: {EOS_ID: 0.9, 6: 0.1}}
    transitions |= {token: {EOS_ID: 1.0} for token in range(6, 16)}
    return TableModel(transitions, vocab=20)


def test_beam_search_finds_a_better_sequence_than_greedy():
    model = MarkovModel()
    src = torch.tensor([[7, 8, 3]])
    limit = torch.tensor([5])
    greedy = greedy_search(Ensemble([model]), src, limit)[0]
    best = beam_search(Ensemble([model]), src, limit, beam=5, lenpen=0.0, nbest=3)[0]
    assert greedy.tokens[0] == 4
    assert best[0].tokens == [5]
    assert best[0].score == pytest.approx(math.log(0.4) + math.log(0.9), abs=1e-4)
    assert best[0].score > greedy.score
    assert [h.score for h in best] == sorted((h.score for h in best), reverse=True)


@pytest.mark.parametrize("vocab", [640, 1000, 8000, 60])
def test_best_candidates_equal_a_top_k_over_every_candidate(vocab):
    """Chunked selection (640: whole chunks, 1,000: a shorter last chunk, 60: too small to
    chunk) returns the scores and indices a top-k over all beam x vocab sums returns,
    including dead beams (-inf) and a row where only EOS is allowed."""
    torch.manual_seed(vocab)
    sentences, beam, k = 7, 5, 10
    log_probs = torch.log_softmax(3 * torch.randn(sentences * beam, vocab), dim=-1)
    log_probs[3] = -math.inf
    log_probs[3, EOS_ID] = -0.5
    scores = torch.randn(sentences, beam)
    scores[0, 1:] = -math.inf  # the first step: one live beam
    sums = log_probs.view(sentences, beam, vocab) + scores.unsqueeze(2)
    expected = sums.view(sentences, -1).topk(k, dim=1)
    got_scores, got_index = best_candidates(log_probs.clone(), scores, k)
    assert torch.equal(got_scores, expected.values)
    finite = expected.values > -math.inf  # which of several -inf comes first is arbitrary
    assert torch.equal(got_index[finite], expected.indices[finite])
    assert torch.equal(sums.view(sentences, -1).gather(1, got_index), got_scores)


def test_average_length_normalization_keeps_the_long_hypothesis_gnmt_drops():
    # BOS -> 4 EOS: log .5 + log .5 = -1.386 over 2 tokens (EOS counted).
    # BOS -> 5 6 7 EOS: log .5 + 3 log .6 = -2.226 over 4 tokens.
    # GNMT, alpha 1: -1.386 / (7/6) = -1.188 beats -2.226 / (9/6) = -1.484: the short one.
    # Average, lenpen 1: -1.386 / 2 = -0.693 loses to -2.226 / 4 = -0.556: the long one.
    model = TableModel({BOS_ID: {4: 0.5, 5: 0.5}, 4: {EOS_ID: 0.5, 8: 0.5}, 5: {6: 0.6, EOS_ID: 0.4},
                        6: {7: 0.6, EOS_ID: 0.4}, 7: {EOS_ID: 0.6, 9: 0.4},
                        8: {EOS_ID: 0.1, 9: 0.3, 10: 0.3, 11: 0.3}, 9: {EOS_ID: 1.0},
                        10: {EOS_ID: 1.0}, 11: {EOS_ID: 1.0}})  # fmt: skip
    src, limit = torch.tensor([[7, 8, 3]]), torch.tensor([6])
    short_score, long_score = 2 * math.log(0.5), math.log(0.5) + 3 * math.log(0.6)
    gnmt = beam_search(Ensemble([model]), src, limit, beam=4, lenpen=1.0, length_norm="gnmt")[0][0]
    assert gnmt.tokens == [4]
    assert gnmt.score == pytest.approx(short_score / (7 / 6), abs=1e-4)
    average = beam_search(Ensemble([model]), src, limit, beam=4, lenpen=1.0)[0][0]  # the default
    assert average.tokens == [5, 6, 7]
    assert average.score == pytest.approx(long_score / 4, abs=1e-4)
    assert SearchOptions().length_norm == "average" and SearchOptions().lenpen == 1.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, small_corpus) -> tuple[Path, Path, Path]:
    """Two checkpoints of one short run, and the prepared data."""
    from test_train import write_config

    from nmt_tie.config import load_config

    root = tmp_path_factory.mktemp("translate")
    data = root / "prep"
    prepare_small(small_corpus, data)
    config = write_config(root / "c.yaml", data, root / "run", save_every=5, max_updates=10)
    Trainer(TranslationTask, *load_config(config), log=lambda m: None).run()
    return root / "run" / "checkpoint_5.pt", root / "run" / "checkpoint_10.pt", data


def test_ensemble_of_one_checkpoint_twice_equals_that_checkpoint(checkpoints, small_corpus):
    ckpt, _, _ = checkpoints
    lines = (small_corpus / "valid.en").read_text().splitlines()[:15]
    single = Translator.from_checkpoints([ckpt], SearchOptions(beam=3, nbest=2)).translate(lines)
    double = Translator.from_checkpoints([ckpt, ckpt], SearchOptions(beam=3, nbest=2)).translate(lines)
    for a, b in zip(single, double, strict=True):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-4)


def test_a_line_break_spelled_in_bytes_never_splits_an_output_line(checkpoints):
    """Byte fallback lets a model spell any byte, <0x0A> (a line break) too: untrained models
    do, and every later output line would then be one off against its input."""
    _, _, data = checkpoints
    target = PreparedData(data).processor("tgt")
    word = target.encode(["Haus"])[0]
    breaks = [target._sp.piece_to_id(f"<0x{code:02X}>") for code in (0x0A, 0x0D, 0x0C)]
    text = target.decode([*word, breaks[0], *word, breaks[1], breaks[2], *word])
    assert text.splitlines() == [text] and text.count("Haus") == 3


needs_packing = pytest.mark.skipif(not packing_available(), reason="no oneDNN linear kernel in this PyTorch")


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_linear_with_and_without_relu(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    x = torch.randn(3, 7, 24)  # (rows, positions, features), as the decoder has them
    packed = PackedLinear.of(linear, dtype)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x.to(dtype), linear.weight.to(dtype), linear.bias.to(dtype))
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    assert packed(x).dtype == dtype and packed(x).shape == (3, 7, 40)
    torch.testing.assert_close(packed(x).float(), reference.float(), **tolerance)
    torch.testing.assert_close(packed(x, activation="relu").float(), reference.relu().float(), **tolerance)
    assert not list(packed.parameters())  # copies for inference: nothing to train


def assert_same_beam_search(plain, changed, score_tolerance: float) -> None:
    """Beam search (2-best) on random sources finds the same hypotheses with both models,
    their scores equal to `score_tolerance`."""
    sources = [torch.randint(4, 50, (n,)).tolist() for n in (3, 9, 5, 12, 1, 7, 4, 6)]
    options = SearchOptions(beam=4, nbest=2, max_len_b=5)
    before = Translator([plain], None, None, options).translate_ids(sources)
    after = Translator([changed], None, None, options).translate_ids(sources)
    for a, b in zip(before, after, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=score_tolerance)


@needs_packing
@pytest.mark.parametrize("arch", ["rnn", "transformer"])
def test_a_model_packed_for_the_cpu_translates_as_before(arch):
    """Packing changes the kernels, not the translations: the same hypotheses, scores equal
    to 1e-4. The Transformer's linear layers and every output product are packed; the RNN
    keeps its linear layers (its time loop reads their weights)."""
    torch.manual_seed(8)
    plain = build_model(tiny_config(arch)).eval()
    packed = copy.deepcopy(plain)
    assert packed.pack_for_cpu_inference(torch.float32)  # fp32: comparable to 1e-4
    kinds = {type(module) for module in packed.modules()}
    assert PackedLinear in kinds and (torch.nn.Linear in kinds) == (arch == "rnn")
    assert packed.embeddings.packed_output is not None
    assert_same_beam_search(plain, packed, score_tolerance=1e-4)


@pytest.mark.parametrize("arch", ["rnn", "transformer"])
def test_the_output_bias_folded_into_the_product_translates_as_before(arch):
    """fp32 translation on a CPU multiplies [hidden, 1] by [W, b]: the same scores as
    addmm's, so the same hypotheses."""
    torch.manual_seed(9)
    plain = build_model(tiny_config(arch)).eval()
    with torch.no_grad():
        plain.embeddings.output_bias.normal_(std=2.0)  # one that matters: it starts at zero
    folded = copy.deepcopy(plain)
    folded.embeddings.fold_output_bias_for_cpu()
    hidden = torch.randn(7, plain.embeddings.weight("output").size(1))
    vocab = plain.embeddings.output_bias.numel()
    with torch.no_grad():
        expected = plain.embeddings.logits(hidden, out=torch.empty(7, vocab))
        got = folded.embeddings.logits(hidden, out=torch.full((7, vocab), math.nan))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    assert_same_beam_search(plain, folded, score_tolerance=1e-5)


def test_compiled_decoding_translates_as_eager_and_stops_recompiling():
    """`translate --compile`: the Transformer's decoder steps through torch.compile find the
    eager hypotheses, greedy and beam; after the first batches, sentences of other counts and
    lengths (other rows, source lengths, cache sizes, positions) compile nothing new. A new
    model of the same shape reuses the graphs. The RNN does not compile."""
    from nmt_tie.devices import compiled_graph_count

    torch._dynamo.reset()
    before = compiled_graph_count()  # reset() keeps the counters of graphs compiled earlier
    torch.manual_seed(10)
    plain = build_model(tiny_config("transformer")).eval()
    compiled = copy.deepcopy(plain)
    assert compiled.compile_decoding() and compiled_graph_count() == before

    def same_search(sources: list, beam: int) -> None:
        options = SearchOptions(beam=beam, max_len_b=6)
        expected = Translator([plain], None, None, options).translate_ids(sources)
        got = Translator([compiled], None, None, options).translate_ids(sources)
        assert [h[0].tokens for h in got] == [h[0].tokens for h in expected]
        assert [h[0].score for h in got] == pytest.approx([h[0].score for h in expected], abs=1e-4)

    for beam, lengths in ((4, (3, 9, 5)), (1, (3, 9, 5, 12, 1, 7, 4, 6)), (3, (14, 2, 8, 11, 6))):
        same_search([torch.randint(4, 50, (n,)).tolist() for n in lengths], beam)
    warm = compiled_graph_count()
    assert 1 <= warm - before <= 12
    for beam, lengths in ((1, (10, 4, 1, 13, 2, 6, 8)), (3, (5, 1)), (4, (2, 15, 7))):
        same_search([torch.randint(4, 50, (n,)).tolist() for n in lengths], beam)
    other = build_model(tiny_config("transformer")).eval()
    assert other.compile_decoding()
    Translator([other], None, None, SearchOptions(beam=2)).translate_ids([[5, 6, 7], [8, 9]])
    assert compiled_graph_count() == warm
    assert not build_model(tiny_config("rnn")).compile_decoding()


@needs_packing
def test_checkpoints_translated_in_bf16_on_the_cpu_are_packed(checkpoints, small_corpus, native_cpu_bf16):
    ckpt, _, _ = checkpoints
    lines = (small_corpus / "valid.en").read_text().splitlines()[:15]
    bf16 = Translator.from_checkpoints([ckpt], SearchOptions(beam=3), dtype="bf16")
    assert isinstance(bf16.ensemble.models[0].decoder.layers[0].ffn.up, PackedLinear)
    assert bf16.ensemble.models[0].embeddings.packed_output is not None
    fp32 = Translator.from_checkpoints([ckpt], SearchOptions(beam=3))
    assert fp32.ensemble.models[0].embeddings.packed_output is None  # fp32 is not packed
    assert fp32.ensemble.models[0].embeddings.output_with_bias is not None  # but its bias is folded
    model = load_model(load_checkpoint(ckpt)).eval()
    plain = Translator([model], bf16.src, bf16.tgt, bf16.options, dtype="bf16")
    for a, b in zip(bf16.translate(lines), plain.translate(lines), strict=True):
        assert [text for text, _ in a] == [text for text, _ in b]
        assert [score for _, score in a] == pytest.approx([score for _, score in b], abs=1e-2)


def test_averaging_identical_checkpoints_returns_the_same_weights(checkpoints, tmp_path):
    ckpt, other, _ = checkpoints
    averaged = average_checkpoints([ckpt, ckpt, ckpt])
    original = load_checkpoint(ckpt)["model"]
    for name, tensor in original.items():
        torch.testing.assert_close(averaged["model"][name], tensor, rtol=0, atol=1e-7)
    mean = average_checkpoints([ckpt, other])["model"]
    second = load_checkpoint(other)["model"]
    for name in original:
        torch.testing.assert_close(mean[name], (original[name] + second[name]) / 2)
    save_atomic(averaged, tmp_path / "avg.pt")
    model = load_model(load_checkpoint(tmp_path / "avg.pt"))
    assert model.embeddings.weight("encoder_input") is model.embeddings.weight("output")


def test_translate_keeps_one_line_per_input_line(checkpoints, tmp_path, capsys):
    ckpt, _, _ = checkpoints
    lines = ["A dog runs on the beach.", "", "Two men are talking.", "   ", "word " * 400, "A cat."]
    write_lines(tmp_path / "in.en", lines)
    code, _, err = run_cli(
        capsys,
        "translate",
        "-c",
        str(ckpt),
        "-i",
        str(tmp_path / "in.en"),
        "-o",
        str(tmp_path / "out.de"),
        "--beam",
        "2",
        "--max-src-len",
        "50",
    )
    assert code == 0
    out = (tmp_path / "out.de").read_text().split("\n")
    assert len(out) == len(lines) + 1 and out[-1] == ""
    assert out[1] == "" and out[3] == ""
    assert f"{tmp_path / 'in.en'}:5:" in err and "truncated to 50" in err
    # gzip input gives the same output
    with gzip.open(tmp_path / "in.en.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    code, stdout, _ = run_cli(
        capsys,
        "translate",
        "-c",
        str(ckpt),
        "-i",
        str(tmp_path / "in.en.gz"),
        "--beam",
        "2",
        "--max-src-len",
        "50",
    )
    assert stdout.split("\n") == out


def test_translate_compile_gives_the_eager_output_and_counts_its_graphs(
    checkpoints, small_corpus, tmp_path, capsys
):
    ckpt, _, _ = checkpoints
    lines = (small_corpus / "valid.en").read_text().splitlines()[:6]
    write_lines(tmp_path / "in.en", lines)
    argv = ("translate", "-c", str(ckpt), "-i", str(tmp_path / "in.en"), "--beam", "1")
    code, eager, _ = run_cli(capsys, *argv)
    assert code == 0 and len(eager.splitlines()) == len(lines)
    code, compiled, err = run_cli(capsys, *argv, "--compile")
    assert code == 0 and compiled == eager
    assert int(err.split("compiled graphs: ")[1].split()[0]) >= 1


def test_translation_reports_lines_as_batches_finish_and_ends_with_a_summary(checkpoints, tmp_path, capsys):
    ckpt, _, _ = checkpoints
    lines = ["A dog.", "", "A man in a red shirt.", "Two women sit on a bench.", "A cat."]
    translator = Translator.from_checkpoints([ckpt], SearchOptions(beam=2, max_tokens=16))
    done: list[int] = []
    translator.lines_done = done.append  # what the progress bar is told
    translator.translate(lines)
    assert sum(done) == len(lines) and len(done) >= 3  # batch by batch, not once at the end
    write_lines(tmp_path / "in.en", lines)
    code, stdout, err = run_cli(capsys, "translate", "-c", str(ckpt), "-i", str(tmp_path / "in.en"))
    words = sum(len(line.split()) for line in stdout.splitlines())
    assert code == 0 and err.startswith(f"translated 5 lines into {words:,} words in ")


def test_nbest_output_lists_line_number_score_and_text(checkpoints, tmp_path, capsys):
    ckpt, _, _ = checkpoints
    write_lines(tmp_path / "in.en", ["A dog.", "", "A man in a red shirt."])
    code, stdout, _ = run_cli(
        capsys, "translate", "-c", str(ckpt), "-i", str(tmp_path / "in.en"), "--beam", "4", "--nbest", "3"
    )
    assert code == 0
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert [r[0] for r in rows] == ["1"] * 3 + ["2"] + ["3"] * 3
    scores = [float(r[1]) for r in rows if r[0] == "3"]
    assert scores == sorted(scores, reverse=True)


def test_invalid_utf8_stops_with_file_and_line_after_translating_what_came_before(
    checkpoints, tmp_path, capsys
):
    ckpt, _, _ = checkpoints
    (tmp_path / "bad.en").write_bytes(b"A dog.\nA cat.\nA \xff bird.\nA fish.\n")
    code, stdout, err = run_cli(
        capsys, "translate", "-c", str(ckpt), "-i", str(tmp_path / "bad.en"), "--beam", "1"
    )
    assert code == 2
    assert f"{tmp_path / 'bad.en'}:3: invalid UTF-8" in err and err.count("\n") == 1
    assert len(stdout.splitlines()) == 2


def test_ensemble_members_must_share_a_vocabulary(checkpoints, tmp_path, small_corpus):
    ckpt, _, data = checkpoints
    other_data = tmp_path / "other"
    prepare_small(small_corpus, other_data, vocab_size=700)
    from nmt_tie.checkpoint import model_payload, vocab_payload

    prepared = PreparedData(other_data)
    model = build_model(configure_for_data(tiny_config("transformer"), prepared))
    vocab = vocab_payload(prepared.processor("src"), prepared.processor("tgt"), True)
    save_atomic(model_payload(model, model.config, vocab), tmp_path / "other.pt")
    from nmt_tie.errors import UserError

    with pytest.raises(UserError, match="another vocabulary.*an ensemble needs one"):
        Translator.from_checkpoints([ckpt, tmp_path / "other.pt"])
    with pytest.raises(UserError, match="cannot average"):
        average_checkpoints([ckpt, tmp_path / "other.pt"])


def test_missing_and_truncated_checkpoints_are_clear_errors(checkpoints, tmp_path, capsys):
    ckpt, _, _ = checkpoints
    code, _, err = run_cli(capsys, "translate", "-c", str(tmp_path / "none.pt"), "-i", "x")
    assert code == 2 and "checkpoint not found" in err
    (tmp_path / "cut.pt").write_bytes(ckpt.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "translate", "-c", str(tmp_path / "cut.pt"), "-i", "x")
    assert code == 2 and "truncated or corrupt" in err


def test_an_unwritable_output_and_bad_search_options_are_one_line_errors(checkpoints, tmp_path, capsys):
    ckpt, _, _ = checkpoints
    write_lines(tmp_path / "in.en", ["A dog."])
    argv = ("translate", "-c", str(ckpt), "-i", str(tmp_path / "in.en"))
    out = tmp_path / "no-such-dir" / "out.de"
    code, _, err = run_cli(capsys, *argv, "-o", str(out))
    assert code == 2 and err == f"nmt-tie translate: error: {out}: No such file or directory\n"
    code, _, err = run_cli(capsys, *argv, "--beam", "0")
    assert code == 2 and "--beam 0: need at least 1" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, *argv, "--beam", "2", "--nbest", "3")
    assert code == 2 and "--nbest 3: need 1 <= --nbest <= --beam (2)" in err
    code, _, err = run_cli(capsys, *argv, "--max-src-len", "0")
    assert code == 2 and "--max-src-len 0: need at least 1" in err
    for device in ("bogus", "cuda:x"):
        code, _, err = run_cli(capsys, *argv, "--device", device)
        assert code == 2 and f"device {device!r}: give auto, cpu, cuda or cuda:N" in err


def test_streaming_from_a_pipe_answers_before_the_input_ends(checkpoints):
    ckpt, _, _ = checkpoints
    process = subprocess.Popen(
        [sys.executable, "-m", "nmt_tie", "translate", "-c", str(ckpt), "--beam", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        process.stdin.write(b"A dog runs.\n")
        process.stdin.flush()
        started = time.time()
        first = process.stdout.readline()  # arrives while stdin is still open
        assert first.endswith(b"\n") and time.time() - started < 60
        process.stdin.write(b"\nTwo men.\n")
        process.stdin.close()
        rest = process.stdout.read().splitlines()
        assert len(rest) == 2 and rest[0] == b""
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


def test_score_matches_sacrebleu_and_checks_line_counts(tmp_path, capsys):
    import sacrebleu

    hyps = ["the cat sat on the mat", "a dog runs"]
    refs = ["the cat sat on a mat", "a dog is running"]
    write_lines(tmp_path / "hyp", hyps)
    write_lines(tmp_path / "ref", refs)
    ours = score(hyps, refs)
    assert ours["bleu"]["score"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    assert ours["chrf"]["score"] == round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
    code, stdout, _ = run_cli(capsys, "score", str(tmp_path / "hyp"), str(tmp_path / "ref"))
    assert code == 0 and "BLEU" in stdout and "nrefs:1" in stdout and "chrF2" in stdout
    write_lines(tmp_path / "short", hyps[:1])
    code, _, err = run_cli(capsys, "score", str(tmp_path / "short"), str(tmp_path / "ref"))
    assert code == 2 and "short has 1 lines" in err and "ref has 2" in err
    (tmp_path / "empty").write_text("")
    code, _, err = run_cli(capsys, "score", str(tmp_path / "empty"), str(tmp_path / "empty"))
    assert code == 2 and "are empty: nothing to score" in err and err.count("\n") == 1


def test_no_command_writes_over_its_own_input(checkpoints, tmp_path, capsys):
    ckpt, _, _ = checkpoints
    write_lines(tmp_path / "in.en", ["A dog.", "Two men."])
    before = (tmp_path / "in.en").read_bytes(), ckpt.read_bytes()
    for output in (tmp_path / "in.en", ckpt):
        code, _, err = run_cli(
            capsys, "translate", "-c", str(ckpt), "-i", str(tmp_path / "in.en"), "-o", str(output)
        )
        assert code == 2 and f"-o {output} is also" in err
    code, _, err = run_cli(capsys, "score", *[str(tmp_path / "in.en")] * 2, "--out", str(tmp_path / "in.en"))
    assert code == 2 and "--out" in err and "an input" in err
    code, _, err = run_cli(capsys, "embeddings", str(ckpt), "--export", str(ckpt))
    assert code == 2 and "--export" in err and "an input" in err
    assert ((tmp_path / "in.en").read_bytes(), ckpt.read_bytes()) == before


def test_embeddings_command_reads_translation_checkpoints_as_whole_word_pieces(checkpoints, tmp_path, capsys):
    import sentencepiece as spm
    from scipy.stats import spearmanr

    from nmt_tie.wordvectors import WORD_START, embedding_matrix

    ckpt, _, _ = checkpoints
    payload = load_checkpoint(ckpt)
    words, tied = embedding_matrix(payload, "tied")
    encoder_words, encoder = embedding_matrix(payload, "encoder-input")
    # Three-way tied with one shared vocabulary: every role reads the same matrix.
    assert encoder_words == words and torch.equal(torch.from_numpy(encoder), torch.from_numpy(tied))
    processor = spm.SentencePieceProcessor(model_proto=payload["vocab"]["spm_tgt"])
    pieces = {processor.id_to_piece(i) for i in range(processor.get_piece_size())}
    assert words and all(w.isalpha() and WORD_START + w in pieces for w in words)
    assert len(set(words)) == len(words) < processor.get_piece_size()  # sub-word pieces are left out
    # The row of a word is the row of its piece in the model's matrix.
    row = payload["model"]["embeddings.matrices.shared"][processor.piece_to_id(WORD_START + words[0])]
    assert torch.equal(torch.from_numpy(tied[0]), row.float())
    similar = tmp_path / "sim"
    similar.mkdir()
    a, b, c = words[:3]
    pairs = [(a, b, 3.0), (a, c, 1.0), (b, c, 2.0), (a, "zzqx", 5.0)]  # the last one is out of vocabulary
    write_lines(similar / "EN-MEN-TR-3k.txt", [f"{x} {y} {score}" for x, y, score in pairs])
    code, out, _ = run_cli(
        capsys, "embeddings", str(ckpt), "--which", "tied", "--eval", str(similar), "--json"
    )
    men = json.loads(out)["men"]
    assert code == 0 and (men["pairs"], men["skipped"], men["total"]) == (3, 1, 4)
    vectors = dict(zip(words, torch.from_numpy(tied), strict=True))
    known = pairs[:3]
    cosines = [torch.cosine_similarity(vectors[x], vectors[y], dim=0).item() for x, y, _ in known]
    expected = spearmanr(cosines, [score for *_, score in known]).statistic
    assert men["spearman"] == pytest.approx(expected, abs=1e-4)
