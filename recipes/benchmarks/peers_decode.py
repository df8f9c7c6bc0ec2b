"""Benchmark: beam search of fairseq 0.12 on an nmt-tie Transformer, against nmt-tie's own.

Decoding speed depends on the model's shape and on how long its outputs are, so the fair
comparison is the same model in both toolkits. This script converts a pre-norm nmt-tie
Transformer checkpoint, three-way tied (fairseq's `--share-all-embeddings`) or decoder-tied on
a joint vocabulary (`--share-decoder-input-output-embed`), into a fairseq `transformer`
checkpoint (in fairseq's own virtualenv, see ../../../shared/peers.md), binarizes Multi30k
test2016 with the same vocabulary, runs `fairseq-generate --beam 5` twice (the better time
counts, as fairseq reports it: output tokens including EOS per second) and prints the rows of
both toolkits with BLEU and the hypothesis/reference length ratio (nmt-tie's from
`translate_speed.py`'s `measure`, fp32, best of two passes, the same batch size in source
tokens).

The conversion is exact but for one thing fairseq has no place for: the output layer's bias.
It becomes the part of it that a shift of the decoder's final LayerNorm can express (its
least-squares projection onto the embedding matrix), so fairseq's translations differ
somewhat; BLEU and the length ratio are printed beside the speed to show by how much.
fairseq's sinusoidal positions start at 2 (its padding index + 1) and its decoder starts
from </s>: the converted model uses learned positions holding nmt-tie's sinusoids, and the
first decoder position adds the difference between nmt-tie's BOS and EOS embeddings.

    python recipes/benchmarks/peers_decode.py CHECKPOINT --data PREPARED --fairseq-venv PEER
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nmt_tie.data.locations import data_root
from nmt_tie.data.text import read_lines
from nmt_tie.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from nmt_tie.model.transformer import sinusoidal_positions

sys.path.insert(0, str(Path(__file__).parent))
from peers import FAIRSEQ_MODEL, write_pieces  # noqa: E402 (this script's siblings)
from translate_speed import measure  # noqa: E402

# fairseq's dictionary: <s> </s> <pad> <unk> at 0 2 1 3, then the pieces in nmt-tie's order
FAIRSEQ_ROW_OF_OURS = {BOS_ID: 0, PAD_ID: 1, EOS_ID: 2, UNK_ID: 3}
MAX_POSITIONS = 1024
FAIRSEQ_PADDING = 1
# fairseq's flag for each nmt-tie tie mode it can express (both with --joined-dictionary)
TIE_FLAGS = {"all": "--share-all-embeddings", "decoder": "--share-decoder-input-output-embed"}
BUILD = """
import sys, torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
bin_dir, weights, out, *model_args = sys.argv[1:]
args = options.parse_args_and_arch(options.get_training_parser(), [bin_dir, *model_args])
cfg = convert_namespace_to_omegaconf(args)
model = tasks.setup_task(cfg.task).build_model(cfg.model)
model.load_state_dict(torch.load(weights), strict=True)
history = [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
            "lr_scheduler_state": {}, "num_updates": 0}]  # fairseq's loader reads the last entry
torch.save({"cfg": cfg, "model": model.state_dict(), "optimizer_history": history, "extra_state": {}}, out)
"""


def fairseq_state_dict(payload: dict) -> dict[str, torch.Tensor]:
    """fairseq's state dict of a loaded nmt-tie checkpoint."""
    config, ours = payload["model_config"], payload["model"]
    if config["arch"] != "transformer" or config["tie"] not in TIE_FLAGS or config["norm"] != "pre":
        raise SystemExit("peers_decode.py converts pre-norm three-way or decoder-tied Transformers only")
    if not config["shared_vocab"]:
        raise SystemExit("peers_decode.py needs a joint vocabulary (fairseq's --joined-dictionary)")
    dim = config["emb_dim"]
    order = list(range(config["tgt_vocab_size"]))
    for our_id, row in FAIRSEQ_ROW_OF_OURS.items():
        order[row] = our_id
    prefix = "embeddings.matrices."  # "shared", or "source" and "target" (decoder-tied)
    matrices = {key[len(prefix) :]: value for key, value in ours.items() if key.startswith(prefix)}
    target = matrices.get("shared", matrices.get("target"))  # decoder input and output
    embedding, source_embedding = target[order], matrices.get("shared", matrices.get("source"))[order]
    bias = ours["embeddings.output_bias"][order]
    scale = math.sqrt(dim) if config["scale_embeddings"] else 1.0

    positions = torch.zeros(MAX_POSITIONS + FAIRSEQ_PADDING + 1, dim)
    positions[FAIRSEQ_PADDING + 1 :] = sinusoidal_positions(MAX_POSITIONS, dim)
    decoder_positions = positions.clone()  # the first decoder input is </s>, nmt-tie's is BOS
    decoder_positions[FAIRSEQ_PADDING + 1] += scale * (target[BOS_ID] - target[EOS_ID])
    sd = {
        "encoder.embed_tokens.weight": source_embedding,
        "decoder.embed_tokens.weight": embedding,
        "decoder.output_projection.weight": embedding,
        "encoder.embed_positions.weight": positions,
        "decoder.embed_positions.weight": decoder_positions,
        "encoder.version": torch.tensor([3.0]),
        "decoder.version": torch.tensor([3.0]),
    }
    # the output bias, as far as a shift of the final LayerNorm expresses it: E @ shift ~ bias
    shift = torch.linalg.lstsq(embedding.double(), bias.double().unsqueeze(1)).solution.squeeze(1)
    for side, layers in (("encoder", config["enc_layers"]), ("decoder", config["dec_layers"])):
        sd[f"{side}.layer_norm.weight"] = ours[f"{side}.final_norm.weight"]
        sd[f"{side}.layer_norm.bias"] = ours[f"{side}.final_norm.bias"]
        for i in range(layers):
            src, dst = f"{side}.layers.{i}.", f"{side}.layers.{i}."
            q, k, v = ours[src + "self_attn.qkv.weight"].chunk(3)
            qb, kb, vb = ours[src + "self_attn.qkv.bias"].chunk(3)
            for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
                sd[dst + f"self_attn.{name}_proj.weight"], sd[dst + f"self_attn.{name}_proj.bias"] = w, b
            sd[dst + "self_attn.out_proj.weight"] = ours[src + "self_attn.out.weight"]
            sd[dst + "self_attn.out_proj.bias"] = ours[src + "self_attn.out.bias"]
            sd[dst + "fc1.weight"], sd[dst + "fc1.bias"] = (
                ours[src + "ffn.up.weight"],
                ours[src + "ffn.up.bias"],
            )
            sd[dst + "fc2.weight"], sd[dst + "fc2.bias"] = (
                ours[src + "ffn.down.weight"],
                ours[src + "ffn.down.bias"],
            )
            first = "attn_block" if side == "encoder" else "self_block"
            for ours_norm, theirs in ((first, "self_attn_layer_norm"), ("ffn_block", "final_layer_norm")):
                sd[dst + f"{theirs}.weight"] = ours[src + f"{ours_norm}.norm.weight"]
                sd[dst + f"{theirs}.bias"] = ours[src + f"{ours_norm}.norm.bias"]
            if side == "decoder":
                sd[dst + "encoder_attn.q_proj.weight"] = ours[src + "cross_attn.q.weight"]
                sd[dst + "encoder_attn.q_proj.bias"] = ours[src + "cross_attn.q.bias"]
                k, v = ours[src + "cross_attn.kv.weight"].chunk(2)
                kb, vb = ours[src + "cross_attn.kv.bias"].chunk(2)
                sd[dst + "encoder_attn.k_proj.weight"], sd[dst + "encoder_attn.k_proj.bias"] = k, kb
                sd[dst + "encoder_attn.v_proj.weight"], sd[dst + "encoder_attn.v_proj.bias"] = v, vb
                sd[dst + "encoder_attn.out_proj.weight"] = ours[src + "cross_attn.out.weight"]
                sd[dst + "encoder_attn.out_proj.bias"] = ours[src + "cross_attn.out.bias"]
                sd[dst + "encoder_attn_layer_norm.weight"] = ours[src + "cross_block.norm.weight"]
                sd[dst + "encoder_attn_layer_norm.bias"] = ours[src + "cross_block.norm.bias"]
    sd["decoder.layer_norm.bias"] = sd["decoder.layer_norm.bias"] + shift.float()
    return {key: value.contiguous() for key, value in sd.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the checkpoint's prepared directory")
    parser.add_argument("--fairseq-venv", type=Path, required=True)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--max-tokens", type=int, default=4096, help="source tokens a batch")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nmt-tie-peers-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    fairseq_bin = args.fairseq_venv / "bin"

    src, tgt = write_pieces(args.data, work, {"test_2016_flickr": "test"})
    bin_dir = work / "bin"
    shutil.rmtree(bin_dir, ignore_errors=True)  # fairseq-preprocess refuses to overwrite
    subprocess.run(
        [str(fairseq_bin / "fairseq-preprocess"), "--source-lang", src, "--target-lang", tgt,
         "--testpref", str(work / "test"), "--destdir", str(bin_dir), "--joined-dictionary",
         "--srcdict", str(work / "dict.txt"), "--workers", "1"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    payload = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    torch.save(fairseq_state_dict(payload), work / "weights.pt")
    tie_flag = TIE_FLAGS[payload["model_config"]["tie"]]
    model_args = [tie_flag if arg == TIE_FLAGS["all"] else arg for arg in FAIRSEQ_MODEL]
    model_args += ["--encoder-learned-pos", "--decoder-learned-pos"]
    build = [str(fairseq_bin / "python"), "-c", BUILD, str(bin_dir), str(work / "weights.pt")]
    subprocess.run([*build, str(work / "fairseq.pt"), *model_args], check=True, env=env)

    generate = [str(fairseq_bin / "fairseq-generate"), str(bin_dir), "--path", str(work / "fairseq.pt")]
    generate += ["--gen-subset", "test", "--beam", "5", "--lenpen", "1.0", "--max-len-a", "1.5"]
    generate += shlex.split(f"--max-len-b 10 --max-tokens {args.max_tokens} --cpu --remove-bpe sentencepiece")
    best = None
    for _ in range(2):
        result = subprocess.run(generate, check=True, capture_output=True, text=True, env=env)
        found = re.search(
            r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s", result.stderr + result.stdout
        )
        sentences, tokens, seconds = (
            int(found[1].replace(",", "")),
            int(found[2].replace(",", "")),
            float(found[3]),
        )
        if best is None or seconds < best[2]:
            best = (sentences, tokens, seconds, result.stdout)
    sentences, tokens, seconds, output = best
    hypotheses = {}
    for line in output.splitlines():
        if line.startswith("D-"):
            key, _, text = line.split("\t", 2)
            hypotheses[int(key[2:])] = text
    references = list(read_lines(data_root() / "multi30k" / f"test_2016_flickr.{tgt}.gz"))
    hyps = [hypotheses.get(i, "") for i in range(len(references))]
    print(row("fairseq-fp32", tokens, sentences, seconds, hyps, references))

    lines = list(read_lines(data_root() / "multi30k" / f"test_2016_flickr.{src}.gz"))
    ours = measure("pytorch-fp32", str(args.checkpoint), 5, lines, args.max_tokens, args.threads)
    print(row("nmt-tie-fp32", ours["pieces"], len(lines), ours["seconds"], ours["hypotheses"], references))


def row(name: str, pieces: int, sentences: int, seconds: float, hyps: list[str], refs: list[str]) -> str:
    """One printed result: output pieces (EOS included) and sentences per second, BLEU, length."""
    import sacrebleu

    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    return (
        f"{name}  beam 5  {pieces / seconds:8.0f} pieces/s  {sentences / seconds:6.1f} sent/s  "
        f"BLEU {bleu.score:.2f}  ratio {bleu.sys_len / bleu.ref_len:.3f}  ({pieces} pieces, {seconds:.1f} s)"
    )


if __name__ == "__main__":
    main()
