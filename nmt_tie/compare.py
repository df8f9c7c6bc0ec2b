"""`nmt-tie compare`: one table and one plot over training runs.

Reads only what runs wrote: `config.yaml` (the resolved config), `log.jsonl` (validation
records), `best.pt` (its size on disk), `*.score.json` files written by
`nmt-tie score --out` (test BLEU/chrF), and exports made by `nmt-tie export` into
sub-directories of the run (the smallest is what ships). Parameter counts come from the
config, so the table shows the untied twin's size and the reduction for every run; the
shipped size is also given as a share of the untied twin in float32 (4 bytes a parameter).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nmt_tie.artifacts import METADATA_FILE, refuse_to_overwrite_an_input, wrong_kind
from nmt_tie.config import build_configs
from nmt_tie.deploy import export_sizes, read_metadata
from nmt_tie.errors import UserError
from nmt_tie.report import count_unique, meta_model, mode_config
from nmt_tie.training.metrics import read_log


@dataclass
class RunSummary:
    name: str
    path: Path
    pair: str
    arch: str
    tie: str
    seed: int
    params: int
    untied_params: int
    checkpoint_bytes: int | None
    best_valid_bleu: float | None
    updates: int
    minutes: float
    valid_curve: list[tuple[int, float]]
    tests: dict[str, dict] = field(default_factory=dict)  # test name -> {"bleu": x, "chrf": y}
    shipped: tuple[str, int] | None = None  # (quantization, model.bin bytes) of the smallest export
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (update, training nll)
    sources: list[Path] = field(default_factory=list)  # the files read: a report must not replace one

    @property
    def reduction(self) -> float:
        return 1 - self.params / self.untied_params

    @property
    def group(self) -> tuple[str, str, str, int]:
        """Runs that differ only in their seed."""
        return (self.pair, self.arch, self.tie, self.params)


def summarize_run(path: Path) -> RunSummary:
    path = Path(path)
    config_file = path / "config.yaml"
    if not config_file.is_file():
        unknown = f"{path} is not a run directory (no config.yaml)"
        raise UserError(wrong_kind(path, "a run directory") or unknown)
    values = yaml.safe_load(config_file.read_text())
    model_cfg, train_cfg = build_configs(values, str(config_file))
    params = count_unique(meta_model(model_cfg))
    untied = count_unique(meta_model(mode_config(model_cfg, "none")))
    records = read_log(path)
    valid = [r for r in records if r.get("type") == "valid"]
    bleus = [r["bleu"] for r in valid if "bleu" in r]
    best = path / "best.pt"
    tests = {}
    score_files = sorted(path.glob("*.score.json"))
    for score_file in score_files:
        scores = json.loads(score_file.read_text())
        tests[score_file.name.removesuffix(".score.json")] = {k: v["score"] for k, v in scores.items()}
    pair = _pair_of(train_cfg.data)
    export_dirs = [meta.parent for meta in sorted(path.glob(f"*/{METADATA_FILE}"))]
    export_dirs = [export for export in export_dirs if (export / "model.bin").is_file()]
    exports = [(read_metadata(d)["quantization"], export_sizes(d)["model_bin_bytes"]) for d in export_dirs]
    return RunSummary(
        name=path.name,
        path=path,
        pair=pair,
        arch=model_cfg.arch,
        tie=model_cfg.tie,
        seed=train_cfg.seed,
        params=params,
        untied_params=untied,
        checkpoint_bytes=best.stat().st_size if best.exists() else None,
        best_valid_bleu=max(bleus) if bleus else None,
        updates=max((r.get("update", 0) for r in records), default=0),
        minutes=max((r.get("elapsed", 0.0) for r in records), default=0.0) / 60,
        valid_curve=[(r["update"], r["bleu"]) for r in valid if "bleu" in r],
        tests=tests,
        shipped=min(exports, key=lambda e: e[1]) if exports else None,
        train_curve=[(r["update"], r["nll"]) for r in records if r.get("type") == "train" and "nll" in r],
        sources=[
            *(config_file, path / "log.jsonl", best, *score_files),
            *(export / name for export in export_dirs for name in (METADATA_FILE, "model.bin")),
        ],
    )


def _pair_of(data_dir: str) -> str:
    stats = Path(data_dir) / "stats.json"
    if stats.is_file():
        loaded = json.loads(stats.read_text())
        return f"{loaded['src_lang']}-{loaded['tgt_lang']}"
    return "?"


def format_or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def comparison_table(runs: list[RunSummary]) -> str:
    """Markdown: one row per run, then (with several seeds) mean ± standard deviation."""
    test_names = sorted({name for run in runs for name in run.tests})
    header = ["run", "pair", "arch", "tie", "seed", "params", "reduction", "checkpoint MB", "valid BLEU"]
    for name in test_names:
        header += [f"{name} BLEU", f"{name} chrF"]
    shipping = any(run.shipped for run in runs)
    if shipping:
        header += ["shipped MB", "of untied fp32"]
    header += ["updates", "minutes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        row = [
            run.name,
            run.pair,
            run.arch,
            run.tie,
            str(run.seed),
            f"{run.params:,}",
            f"{run.reduction:.1%}",
            format_or_dash(run.checkpoint_bytes and run.checkpoint_bytes / 1e6, ".1f"),
            format_or_dash(run.best_valid_bleu, ".2f"),
        ]
        for name in test_names:
            scores = run.tests.get(name, {})
            row += [format_or_dash(scores.get("bleu"), ".2f"), format_or_dash(scores.get("chrf"), ".2f")]
        if shipping:
            row += _shipped_cells(run)
        row += [str(run.updates), f"{run.minutes:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    groups = _groups(runs)
    if any(len(members) > 1 for members in groups.values()):
        lines += [
            "",
            "| pair | arch | tie | runs | params | reduction | valid BLEU"
            + "".join(f" | {name} BLEU | {name} chrF" for name in test_names)
            + " |",
        ]
        lines.append("|" + "---|" * (7 + 2 * len(test_names)))
        for (pair, arch, tie, _), members in groups.items():
            row = [
                pair,
                arch,
                tie,
                str(len(members)),
                f"{members[0].params:,}",
                f"{members[0].reduction:.1%}",
                mean_spread([m.best_valid_bleu for m in members if m.best_valid_bleu is not None]),
            ]
            for name in test_names:
                scored = [m.tests[name] for m in members if name in m.tests]
                row += [mean_spread([s["bleu"] for s in scored]), mean_spread([s["chrf"] for s in scored])]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _shipped_cells(run: RunSummary) -> list[str]:
    if run.shipped is None:
        return ["-", "-"]
    quantization, size = run.shipped
    return [f"{size / 1e6:.1f} ({quantization})", f"{size / (4 * run.untied_params):.1%}"]


def _groups(runs: list[RunSummary]) -> dict[tuple, list[RunSummary]]:
    groups: dict[tuple, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


TIE_COLORS = {"none": "tab:red", "decoder": "tab:orange", "src-tgt": "tab:purple", "all": "tab:green"}
ARCH_MARKERS = {"transformer": "o", "rnn": "s"}


def right_panel_curves(
    runs: list[RunSummary],
) -> tuple[str, str, str | None, list[tuple[RunSummary, list[tuple[int, float]]]]]:
    """(title, y label, marker, [(run, curve)]) of the plot's right panel: validation BLEU
    curves; or, where no run was validated more than once (`make demo` validates at the end
    only), the training curves, which a run always logs. Validation points get a marker: a run
    validated once is a point, not an invisible line of length zero."""
    if any(len(run.valid_curve) > 1 for run in runs) or not any(run.train_curve for run in runs):
        curves = [(run, run.valid_curve) for run in runs if run.valid_curve]
        return "validation curves", "validation BLEU", "o", curves
    return (
        "training curves (each run validated once, at its end)",
        "training cross-entropy per target token (nats)",
        None,
        [(run, run.train_curve) for run in runs if run.train_curve],
    )


def comparison_plot(runs: list[RunSummary], path: Path) -> None:
    """BLEU against parameters (left) and validation BLEU (or training) curves (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (pair, arch, tie, _), members in _groups(runs).items():
        scores = [_headline_bleu(m) for m in members]
        scores = [s for s in scores if s is not None]
        if not scores:
            continue
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        left.errorbar(
            members[0].params / 1e6,
            statistics.mean(scores),
            yerr=spread,
            fmt=ARCH_MARKERS.get(arch, "^"),
            color=TIE_COLORS.get(tie, "black"),
            capsize=4,
            markersize=8,
            label=f"{pair} {arch} tie={tie}",
        )
    left.set_xlabel("parameters (millions, each tensor once)")
    left.set_ylabel("BLEU (test if scored, else best validation)")
    left.set_title("BLEU against model size")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    title, label, marker, curves = right_panel_curves(runs)
    for run, curve in curves:
        updates, values = zip(*curve, strict=True)
        style = "-" if run.arch == "transformer" else "--"
        right.plot(
            updates,
            values,
            style,
            marker=marker,
            markersize=3,
            color=TIE_COLORS.get(run.tie, "black"),
            alpha=0.8,
            label=run.name,
        )
    right.set_xlabel("updates")
    right.set_ylabel(label)
    right.set_title(title)
    right.grid(alpha=0.3)
    if len(runs) <= 12:
        right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _headline_bleu(run: RunSummary) -> float | None:
    if run.tests:
        first = sorted(run.tests)[0]
        value = run.tests[first].get("bleu")
        if value is not None and not math.isnan(value):
            return value
    return run.best_valid_bleu


def compare(run_dirs: list[Path], report: Path | None = None, plot: Path | None = None) -> str:
    if plot is not None:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if plot.suffix.lstrip(".").lower() not in formats:
            raise UserError(f"--plot {plot}: name a file ending in one of .{', .'.join(sorted(formats))}")
    runs = [summarize_run(Path(d)) for d in run_dirs]
    if not runs:
        raise UserError("no run directories given")
    for flag, output in (("-o", report), ("--plot", plot)):
        refuse_to_overwrite_an_input(flag, output, *(source for run in runs for source in run.sources))
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.path)
    table = comparison_table(runs)
    if report is not None:
        text = "# nmt-tie comparison\n\n" + table + "\n"
        if plot is not None:
            text += f"\n![BLEU against parameters and validation curves]({plot.name})\n"
        Path(report).write_text(text)
    if plot is not None:
        comparison_plot(runs, Path(plot))
    return table
