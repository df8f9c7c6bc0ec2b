"""The `nmt-tie` command: one entry point, one subcommand per stage.

Every subcommand reports problems with the user's input as one line on stderr and exit
status 2 (see `nmt_tie.errors.UserError`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nmt_tie.artifacts import refuse_to_overwrite_an_input
from nmt_tie.errors import UserError


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="learn BPE, binarize train/valid/test, write data statistics",
        description="Turn raw parallel text into a prepared data directory: SentencePiece BPE "
        "model(s), vocabulary, binarized ids and stats.json. A split is the files PREFIX.SRC "
        "and PREFIX.TGT, each optionally gzip-compressed (PREFIX.SRC.gz).",
    )
    p.add_argument("--src", required=True, help="source language code, e.g. en")
    p.add_argument("--tgt", required=True, help="target language code, e.g. de")
    p.add_argument("--train", required=True, metavar="PREFIX", help="training split prefix")
    p.add_argument("--valid", required=True, metavar="PREFIX", help="validation split prefix")
    p.add_argument("--test", nargs="*", default=[], metavar="PREFIX", help="test split prefixes")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument(
        "--joint",
        dest="joint",
        action="store_true",
        default=True,
        help="one BPE model and vocabulary shared by both languages (default; "
        "needed for tie: src-tgt and tie: all)",
    )
    vocab.add_argument("--separate", dest="joint", action="store_false", help="one BPE model per language")
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary size (8000)")
    p.add_argument(
        "--moses",
        action="store_true",
        help="Moses punctuation normalization and tokenization before BPE (undone on output)",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=250,
        help="drop training pairs with a side longer than this many BPE pieces (250)",
    )
    p.add_argument(
        "--max-ratio",
        type=float,
        default=9.0,
        help="drop training pairs whose length ratio exceeds this (9; 0 = off)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing DIR")
    p.add_argument("--json", action="store_true", help="print stats.json instead of a table")
    p.set_defaults(handler=_run_prepare)


def _run_prepare(args) -> None:
    from nmt_tie.data.prepare import PrepareOptions, format_stats, prepare

    opts = PrepareOptions(
        src=args.src,
        tgt=args.tgt,
        train=args.train,
        valid=args.valid,
        test=args.test,
        out=args.out,
        joint=args.joint,
        vocab_size=args.vocab_size,
        moses=args.moses,
        max_len=args.max_len,
        max_ratio=args.max_ratio,
        force=args.force,
    )
    stats = prepare(opts, log=lambda msg: print(msg, file=sys.stderr))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="fetch public corpora (needs the internet)")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{fetch,list}")
    fetch = data_sub.add_parser(
        "fetch",
        help="download, verify and unpack a corpus from data/corpora.yaml",
        description="Download a corpus listed in data/corpora.yaml, check its checksums, unpack "
        "it and write DEST/NAME/SPLIT.LANG text files.",
    )
    fetch.add_argument("name", help="corpus name (see `nmt-tie data list`)")
    fetch.add_argument("--dest", type=Path, default=Path("corpora"), help="target directory")
    fetch.add_argument("--mirror", help="base URL of a mirror: https://host/path -> MIRROR/host/path")
    fetch.add_argument("--manifest", type=Path, help="another manifest file")
    fetch.set_defaults(handler=_run_fetch)
    listing = data_sub.add_parser("list", help="list the corpora of the manifest")
    listing.add_argument("--manifest", type=Path, help="another manifest file")
    listing.set_defaults(handler=_run_data_list)


def _run_fetch(args) -> None:
    from nmt_tie.data.fetch import fetch

    out = fetch(args.name, args.dest, args.mirror, args.manifest, log=lambda m: print(m, file=sys.stderr))
    print(out)


def _run_data_list(args) -> None:
    from nmt_tie.data.fetch import load_manifest

    for name, entry in load_manifest(args.manifest).items():
        description = " ".join(entry.get("description", "").split())
        print(f"{name:<16} {'-'.join(entry['langs'])}  {description}")


def _add_params(sub) -> None:
    p = sub.add_parser(
        "params",
        help="parameter counts by component, unique total, reduction from tying",
        description="Count a model's parameters (each tensor once) by component, and the reduction "
        "against its untied twin. TARGET is a checkpoint (.pt) or a config YAML (vocabulary sizes "
        "from its `data`, or --data); without TARGET the model is described by the flags.",
    )
    p.add_argument("target", nargs="?", type=Path, help="checkpoint, export directory or config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--data", help="prepared data directory (for a config)")
    p.add_argument("--tie-modes", help="comma-separated tying modes to compare, e.g. none,decoder,all")
    p.add_argument("--json", action="store_true", help="print JSON")
    flags = p.add_argument_group("model from flags (no TARGET)")
    flags.add_argument("--arch", choices=["rnn", "transformer"], default="rnn")
    flags.add_argument("--tie", default="all", help="tying mode when --tie-modes is not given")
    flags.add_argument("--emb-dim", type=int, default=500)
    flags.add_argument("--hidden-dim", type=int, default=1000, help="RNN state size")
    flags.add_argument("--ffn-dim", type=int, default=2048, help="Transformer feed-forward size")
    flags.add_argument("--layers", type=int, default=6, help="Transformer encoder and decoder layers")
    flags.add_argument("--heads", type=int, default=8)
    flags.add_argument("--projection-reg", type=float, default=0.0)
    flags.add_argument("--src-vocab", type=int, help="source vocabulary size (separate BPE)")
    flags.add_argument("--tgt-vocab", type=int, help="target vocabulary size (separate BPE)")
    flags.add_argument("--joint-vocab", type=int, help="joint vocabulary size (shared BPE)")
    p.set_defaults(handler=_run_params)


def _run_params(args) -> None:
    from nmt_tie import report
    from nmt_tie.config import TIE_MODES

    modes = args.tie_modes.split(",") if args.tie_modes else None
    for mode in modes or []:
        if mode not in TIE_MODES:
            raise UserError(f"--tie-modes: {mode!r} is not one of {', '.join(TIE_MODES)}")
    vocab = None
    checkpoint = state_dict = export = None
    if args.target is not None and args.target.is_dir():
        from nmt_tie.config import ModelConfig
        from nmt_tie.deploy import read_metadata

        export = read_metadata(args.target)
        config = ModelConfig(**export["model_config"])
    elif args.target is not None and args.target.suffix in (".pt", ".ckpt"):
        from nmt_tie.checkpoint import load_checkpoint, model_config_of

        payload = load_checkpoint(args.target)
        if payload.get("kind") == "lm":
            from nmt_tie.model.lstm_lm import LMConfig

            config = LMConfig(**payload["model_config"])
        else:
            config = model_config_of(payload)
        checkpoint, state_dict = args.target, payload["model"]
    elif args.target is not None:
        from nmt_tie.config import load_config
        from nmt_tie.data.prepare import PreparedData
        from nmt_tie.model.seq2seq import configure_for_data

        config, train_cfg = load_config(args.target, args.overrides)
        data = args.data or train_cfg.data
        if not data:
            raise UserError(f"{args.target} has no `data` key; give --data DIR")
        config = configure_for_data(config, PreparedData(data))
    else:
        from nmt_tie.config import ModelConfig

        vocab = {"src": args.src_vocab, "tgt": args.tgt_vocab, "joint": args.joint_vocab}
        if not (args.joint_vocab or (args.src_vocab and args.tgt_vocab)):
            raise UserError("give --joint-vocab, or --src-vocab and --tgt-vocab (or a TARGET)")
        for mode in modes or [args.tie]:
            if mode in ("src-tgt", "all") and not args.joint_vocab:
                raise UserError(f"tie {mode} needs one shared vocabulary: give --joint-vocab")
        config = ModelConfig(
            arch=args.arch,
            tie=args.tie,
            emb_dim=args.emb_dim,
            hidden_dim=args.hidden_dim,
            ffn_dim=args.ffn_dim,
            enc_layers=args.layers,
            dec_layers=args.layers,
            heads=args.heads,
            projection_reg=args.projection_reg,
            dropout=0.0,
        )
        config = report.mode_config(config, args.tie, vocab)
    if modes:
        result = report.params_by_mode(config, modes, vocab)
        print(json.dumps(result, indent=2) if args.json else report.format_modes(result))
        return
    model = report.meta_model(config)
    untied = report.count_unique(report.meta_model(report.mode_config(config, "none", vocab)))
    if args.json:
        total = report.count_unique(model)
        result = {
            "arch": config.arch,
            "tie": config.tie,
            "params": total,
            "untied_params": untied,
            "reduction": round(1 - total / untied, 4),
            "components": dict(report.breakdown(model)),
            "roles": report.shared_roles(model),
        }
        if checkpoint is not None:
            result["checkpoint_bytes"] = checkpoint.stat().st_size
        if export is not None:
            result["export"] = report.export_summary(args.target, export, untied)
        print(json.dumps(result, indent=2))
    else:
        print(report.format_params(model, untied, checkpoint, state_dict))
        if export is not None:
            print(report.format_export(report.export_summary(args.target, export, untied)))


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a translation model (resumes when the run directory has last.pt)",
        description="Train from a YAML config plus key=value overrides (e.g. tie=all "
        "max_updates=2000). Re-running the same command after an interruption resumes from "
        "SAVE_DIR/last.pt. Several GPUs or nodes: torchrun --nproc_per_node N -m nmt_tie train ...",
    )
    p.add_argument("config", type=Path, help="YAML config (see recipes/*/ for documented examples)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    p.set_defaults(handler=_run_train)


def _answer_ctrl_c() -> None:
    """A script that starts training in the background (to pass signals on, as the WMT recipes
    do) hands it SIGINT ignored, as bash does for background commands: until the trainer sets
    its own handler, Ctrl-C passed on by the script must still stop it."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run_train(args) -> None:
    from nmt_tie.config import load_config
    from nmt_tie.training.trainer import Trainer
    from nmt_tie.training.translation import TranslationTask

    _answer_ctrl_c()
    model_cfg, train_cfg = load_config(args.config, args.overrides)
    Trainer(TranslationTask, model_cfg, train_cfg).run()


def _add_translate(sub) -> None:
    p = sub.add_parser(
        "translate",
        help="translate raw text with one checkpoint or an ensemble",
        description="Translate raw text (stdin or -i) into detokenized text (stdout or -o), one "
        "output line per input line. Several -c make an ensemble (their log-probabilities are "
        "averaged); they must share a vocabulary.",
    )
    p.add_argument(
        "-c",
        "--checkpoint",
        action="append",
        required=True,
        type=Path,
        help="checkpoint (repeatable: an ensemble), or one directory from `nmt-tie export`",
    )
    p.add_argument("-i", "--input", help="input file (default: stdin; .gz accepted)")
    p.add_argument("-o", "--output", help="output file (default: stdout)")
    p.add_argument("--beam", type=int, default=5, help="beam size; 1 = greedy (default 5)")
    p.add_argument(
        "--lenpen",
        type=float,
        default=1.0,
        help="exponent of the length normalization (default 1.0: mean log-probability per token)",
    )
    p.add_argument(
        "--length-norm",
        default="average",
        choices=["average", "gnmt"],
        help="rank finished hypotheses by score / length ** lenpen (average, as fairseq; the "
        "default) or score / ((5 + length) / 6) ** lenpen (gnmt, Wu et al. 2016)",
    )
    p.add_argument("--max-len-a", type=float, default=1.5, help="output length limit a * source + b")
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--nbest", type=int, default=1, help="print the K best: line number, score, text")
    p.add_argument(
        "--max-tokens",
        type=int,
        help="source tokens per batch (default 4096 for a checkpoint, 2048 for an export)",
    )
    p.add_argument("--max-src-len", type=int, default=256, help="truncate longer inputs (subwords)")
    p.add_argument("--buffer-lines", type=int, default=1000, help="lines read before translating")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        help="compute precision (default: fp32 for a checkpoint, the export's own for an export)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile'd decoder steps (Transformer checkpoints): a minute "
        "or two of compiling first, then a few percent faster on a CPU; for long inputs",
    )
    p.set_defaults(handler=_run_translate)


def _run_translate(args) -> None:
    from nmt_tie.translate import SearchOptions, Translator, translate_stream

    if args.beam < 1:
        raise UserError(f"--beam {args.beam}: need at least 1 (1 = greedy)")
    if args.nbest < 1 or args.nbest > args.beam:
        raise UserError(f"--nbest {args.nbest}: need 1 <= --nbest <= --beam ({args.beam})")
    for flag, value in (("--max-src-len", args.max_src_len), ("--buffer-lines", args.buffer_lines)):
        if value < 1:
            raise UserError(f"{flag} {value}: need at least 1")
    refuse_to_overwrite_an_input("-o", args.output, args.input, *args.checkpoint)
    exports = [path for path in args.checkpoint if path.is_dir()]
    if exports:
        from nmt_tie.artifacts import wrong_kind
        from nmt_tie.deploy import EXPORT_MAX_TOKENS, ExportedTranslator, is_export

        if len(args.checkpoint) > 1:
            raise UserError(f"{exports[0]}: an exported model translates alone (no ensembles of exports)")
        if not is_export(exports[0]):
            wanted = "a checkpoint (.pt) or an nmt-tie export"
            unknown = f"{exports[0]} is a directory but not an `nmt-tie export` (no nmt_tie.json)"
            raise UserError(wrong_kind(exports[0], wanted) or unknown)
    default_max_tokens = EXPORT_MAX_TOKENS if exports else SearchOptions.max_tokens
    options = SearchOptions(
        beam=args.beam,
        lenpen=args.lenpen,
        length_norm=args.length_norm,
        max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
        nbest=args.nbest,
        max_tokens=args.max_tokens or default_max_tokens,
        max_src_len=args.max_src_len,
    )
    if exports:
        if args.compile:
            raise UserError(f"{exports[0]}: --compile is for checkpoints (an export runs in CTranslate2)")
        translator = ExportedTranslator(exports[0], options, args.device, args.dtype)
    else:
        from nmt_tie.devices import resolve_device

        translator = Translator.from_checkpoints(
            args.checkpoint, options, resolve_device(args.device), args.dtype or "fp32", compile=args.compile
        )
    translate_stream(translator, args.input, args.output, args.buffer_lines)
    if args.compile:
        from nmt_tie.devices import compiled_graph_count

        # constant from the second batch on; one that grows means recompilation
        print(f"compiled graphs: {compiled_graph_count()}", file=sys.stderr)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a Transformer checkpoint for shipping (CTranslate2, int8 included)",
        description="Write a directory that `nmt-tie translate -c DIR` (or CTranslate2 itself) "
        "translates with: CTranslate2 weights with each tied matrix stored once, the SentencePiece "
        "model(s), and nmt_tie.json (config, tie mode, SHA-256 of the checkpoint).",
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument(
        "--to",
        default="ctranslate2",
        choices=["ctranslate2", "huggingface", "argos"],
        help="ctranslate2 (default): a CTranslate2 directory; huggingface: a transformers directory "
        "(AutoModelForSeq2SeqLM, AutoTokenizer, the Hub); argos: an .argosmodel package for Argos "
        "Translate and LibreTranslate",
    )
    p.add_argument(
        "--out", required=True, type=Path, metavar="PATH", help="output directory (argos: FILE.argosmodel)"
    )
    p.add_argument(
        "--quantization",
        help="weight type on disk: float32 (the default for ctranslate2), int8 (about a quarter of "
        "the size; the default for argos), "
        "int8_float32, int8_float16, int8_bfloat16, int16, float16, bfloat16",
    )
    p.add_argument(
        "--max-positions",
        type=int,
        help="rows of the position table, the longest source or output: 1024 for ctranslate2 and "
        "argos, 512 for huggingface (512 is enough for nmt-tie translate; 1 MB a table at width 256)",
    )
    p.add_argument("--beam", type=int, help="huggingface: num_beams of generation_config.json (5)")
    p.add_argument("--lenpen", type=float, help="huggingface: length_penalty, as translate's --lenpen (1.0)")
    p.add_argument("--src-code", help="argos: the source language code (default: the prepared data's)")
    p.add_argument("--tgt-code", help="argos: the target language code (default: the prepared data's)")
    p.add_argument("--force", action="store_true", help="replace an existing export")
    p.set_defaults(handler=_run_export)


# Options that only one kind of export reads: given to another, they would be ignored silently.
EXPORT_OPTIONS = {
    "--quantization": ("quantization", ("ctranslate2", "argos")),
    "--beam": ("beam", ("huggingface",)),
    "--lenpen": ("lenpen", ("huggingface",)),
    "--src-code": ("src_code", ("argos",)),
    "--tgt-code": ("tgt_code", ("argos",)),
}


def _run_export(args) -> None:
    from nmt_tie.deploy import export_ctranslate2, export_sizes

    for flag, (name, readers) in EXPORT_OPTIONS.items():
        if getattr(args, name) is not None and args.to not in readers:
            weights = " (a transformers export is float32)" if name == "quantization" else ""
            raise UserError(f"{flag} is for --to {' or '.join(readers)}, not --to {args.to}{weights}")
    if args.max_positions is not None and args.max_positions < 1:
        raise UserError(f"--max-positions {args.max_positions}: need at least 1")
    if args.to == "huggingface":
        return _run_export_huggingface(args)
    if args.to == "argos":
        return _run_export_argos(args)
    metadata = export_ctranslate2(
        args.checkpoint, args.out, args.quantization or "float32", args.force, args.max_positions or 1024
    )
    sizes = export_sizes(args.out)
    source = metadata["source_checkpoint_bytes"]
    print(
        f"{args.out}: tie {metadata['tie']}, {metadata['quantization']}, model.bin "
        f"{sizes['model_bin_bytes'] / 1e6:.1f} MB ({sizes['model_bin_bytes'] / source:.0%} of the "
        f"checkpoint's {source / 1e6:.1f} MB), directory {sizes['directory_bytes'] / 1e6:.1f} MB"
    )
    if metadata["projection_folded"]:
        print("projection P folded into the output layer: its matrix is stored apart from the embedding")


def _run_export_huggingface(args) -> None:
    from nmt_tie.hf_export import export_huggingface

    metadata = export_huggingface(
        args.checkpoint,
        args.out,
        5 if args.beam is None else args.beam,
        1.0 if args.lenpen is None else args.lenpen,
        args.force,
        args.max_positions or 512,
    )
    weights = (args.out / "model.safetensors").stat().st_size
    source = metadata["source_checkpoint_bytes"]
    print(
        f"{args.out}: {metadata['transformers_class']}, tie {metadata['tie']}, model.safetensors "
        f"{weights / 1e6:.1f} MB (the checkpoint: {source / 1e6:.1f} MB); logits equal nmt-tie's within "
        f"{metadata['largest_logit_difference']:.1e}"
    )
    for note in metadata["notes"]:
        print(note)


def _run_export_argos(args) -> None:
    from nmt_tie.argos_export import export_argos

    metadata = export_argos(
        args.checkpoint,
        args.out,
        args.quantization or "int8",
        args.src_code,
        args.tgt_code,
        args.force,
        args.max_positions or 1024,
    )
    print(
        f"{args.out}: Argos Translate package {metadata['from_code']} -> {metadata['to_code']}, "
        f"{args.out.stat().st_size / 1e6:.1f} MB ({metadata['quantization']})"
    )


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="BLEU and chrF with sacrebleu (and its signature)")
    p.add_argument("hypotheses", type=Path)
    p.add_argument("references", type=Path)
    p.add_argument("--metrics", default="bleu,chrf", help="comma-separated: bleu, chrf")
    p.add_argument("--tokenize", help="sacrebleu BLEU tokenizer (default 13a)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, help="also write the scores as JSON (for `nmt-tie compare`)")
    p.set_defaults(handler=_run_score)


def _run_score(args) -> None:
    from nmt_tie.evaluate import score_files

    refuse_to_overwrite_an_input("--out", args.out, args.hypotheses, args.references)
    results = score_files(args.hypotheses, args.references, args.metrics.split(","), args.tokenize)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for entry in results.values():
            print(f"{entry['text']}  ({entry['signature']})")


def _add_average(sub) -> None:
    p = sub.add_parser("average", help="average the weights of several checkpoints")
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(handler=_run_average)


def _run_average(args) -> None:
    from nmt_tie.checkpoint import average_checkpoints, save_atomic

    save_atomic(average_checkpoints(args.checkpoints), args.output)
    count = len(args.checkpoints)
    print(f"averaged {count} checkpoint{'' if count == 1 else 's'} into {args.output}")


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="table and plot comparing training runs (size, reduction, BLEU)",
        description="One table row per run (arch, tie, parameters, reduction against the untied twin, "
        "checkpoint size, best validation BLEU, test BLEU/chrF from *.score.json, updates, time) and "
        "one plot (BLEU against parameters, validation curves).",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run directories (save_dir of `nmt-tie train`)")
    p.add_argument("-o", "--output", type=Path, help="also write the table as Markdown")
    p.add_argument("--plot", type=Path, help="write the plot (PNG)")
    p.set_defaults(handler=_run_compare)


def _run_compare(args) -> None:
    from nmt_tie.compare import compare

    print(compare(args.runs, args.output, args.plot))


def _add_lm(sub) -> None:
    p = sub.add_parser("lm", help="word-level LSTM language models (the paper's section 5)")
    lm_sub = p.add_subparsers(dest="lm_command", required=True, metavar="{train,eval}")
    train = lm_sub.add_parser(
        "train",
        help="train an LSTM language model (resumes when the run directory has last.pt)",
        description="Train a word-level LSTM language model with truncated BPTT from a YAML config "
        "plus key=value overrides (see recipes/ptb/).",
    )
    train.add_argument("config", type=Path)
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    train.set_defaults(handler=_run_lm_train)
    evaluate = lm_sub.add_parser("eval", help="perplexity of a language model on a text file")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--text", required=True, type=Path, help="one sentence per line")
    evaluate.add_argument("--batch-size", type=int, default=1, help="parallel streams (1 = exact)")
    evaluate.add_argument("--bptt", type=int, default=35, help="steps per forward call (any is exact)")
    evaluate.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (0 = all cores). 1 by default: one stream is little work per step, and "
        "on a machine busy with training, all cores ran over 15x slower than one",
    )
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=_run_lm_eval)


def _run_lm_train(args) -> None:
    from functools import partial

    from nmt_tie.config import TrainConfig, load_config
    from nmt_tie.model.lstm_lm import LMConfig
    from nmt_tie.training.language_model import LanguageModelTask, LMDataConfig
    from nmt_tie.training.trainer import Trainer

    model_cfg, train_cfg, data_cfg = load_config(
        args.config, args.overrides, (LMConfig, TrainConfig, LMDataConfig)
    )
    Trainer(partial(LanguageModelTask, data_cfg=data_cfg), model_cfg, train_cfg).run()


def _run_lm_eval(args) -> None:
    import math

    import torch

    from nmt_tie.checkpoint import load_checkpoint
    from nmt_tie.training.language_model import batchify, load_lm, perplexity

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model, vocab = load_lm(load_checkpoint(args.checkpoint))
    data = batchify(vocab.encode_file(args.text), args.batch_size, args.text)
    nll, tokens = perplexity(model, data, args.bptt, "cpu")
    result = {"ppl": round(math.exp(nll), 2), "nll": round(nll, 4), "tokens": tokens}
    print(
        json.dumps(result) if args.json else f"{args.text}: perplexity {result['ppl']:.2f} ({tokens} tokens)"
    )


def _add_embeddings(sub) -> None:
    p = sub.add_parser(
        "embeddings",
        help="export an embedding matrix, nearest neighbours, word-similarity scores",
        description="Look at a checkpoint's input, output or tied embedding: export it (word2vec text "
        "format), print nearest neighbours by cosine, and with --eval report Spearman correlations on "
        "word-similarity sets (pairs with unknown words are skipped and counted).",
    )
    p.add_argument("checkpoint", type=Path, help="language-model or translation checkpoint")
    p.add_argument(
        "--which",
        default="output",
        help="input | output | tied | encoder-input (translation: the source side's matrix; "
        "the English similarity sets measure it for an En-X model)",
    )
    p.add_argument("--export", type=Path, help="write the matrix in word2vec text format")
    p.add_argument("--neighbours", nargs="*", default=[], metavar="WORD", help="print nearest neighbours")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--eval", type=Path, metavar="DIR", help="directory of word-similarity files")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run_embeddings)


def _run_embeddings(args) -> None:
    from nmt_tie import wordvectors

    refuse_to_overwrite_an_input("--export", args.export, args.checkpoint)
    words, matrix = wordvectors.embedding_matrix(wordvectors.load_payload(args.checkpoint), args.which)
    if args.export:
        wordvectors.export_word2vec(words, matrix, args.export)
        print(f"wrote {len(words)} x {matrix.shape[1]} to {args.export}", file=sys.stderr)
    for word in args.neighbours:
        found = wordvectors.neighbours(words, matrix, word, args.top)
        print(f"{word}: " + ", ".join(f"{w} {c:.3f}" for w, c in found))
    if args.eval:
        results = wordvectors.evaluate_all(words, matrix, args.eval)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            for name, r in results.items():
                print(
                    f"{name:<12} spearman {r['spearman']:.4f}  ({r['pairs']} pairs, {r['skipped']} skipped)"
                )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nmt-tie",
        description="Neural machine translation with tied input and output embeddings.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in ADDERS:
        add(sub)
    return parser


ADDERS = [
    _add_prepare,
    _add_data,
    _add_train,
    _add_translate,
    _add_export,
    _add_score,
    _add_average,
    _add_params,
    _add_compare,
    _add_lm,
    _add_embeddings,
]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes a positional list in one piece: KEY=VALUE overrides after a flag
        # (`nmt-tie params CONFIG --data DIR ffn_dim=512`) arrive here, and belong to it
        if isinstance(getattr(args, "overrides", None), list) and all(
            "=" in item and not item.startswith("-") for item in extra
        ):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.handler(args)
    except UserError as err:
        print(f"nmt-tie {args.command}: {err.label}: {err}", file=sys.stderr)
        sys.exit(err.exit_status)
    except KeyboardInterrupt:
        print(f"nmt-tie {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()  # e.g. `nmt-tie translate ... | head`
        sys.exit(0)
    except OSError as err:
        if err.filename is None:
            raise
        # a path the user gave that cannot be opened or written (no such directory, no
        # permission, a full disk): one line naming it, not a traceback
        print(f"nmt-tie {args.command}: error: {err.filename}: {err.strerror}", file=sys.stderr)
        sys.exit(2)
