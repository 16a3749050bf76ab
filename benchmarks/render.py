"""The benchmarks' results: benchmarks/results/*.json -> the tables of benchmarks/README.md and a scaling plot.

    python benchmarks/render.py            # rewrite the README's result blocks in place, draw results/scaling.png
    python benchmarks/render.py --check    # exit 1 when a README block differs from what results/ renders

A results file is one measurement: when, on what, with which versions, by which command(s), the rows as measured
and the targets. A benchmark writes one with `--save PATH` (on the device: `--save $OUT/NAME.json`); copying it
over benchmarks/results/NAME.json and running this script updates the README. The format (version 1):

    {"format": 1, "title": "...", "date": "YYYY-MM-DD",
     "hardware": {"gpu": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "note": "..."}   (or {"cpu": "..."}),
     "versions": {"torch": "2.11.0+cu130", ...}, "commands": ["python benchmarks/..."],
     "tables": {KIND: [row, ...]},              KIND one of TABLES below; a row is a dict of the column keys
     "targets": [{"target": "...", "result": "...", "met": true | false | null}],   (a target may name its
                                                "command", one of commands, where they measure different things)
     "notes": ["..."], "formats": {KEY: FMT}, "source": "..."}
                                                optional: notes print under the tables, formats override a
                                                column's format (Column.fmt), source does not print

Design decisions:
- Rows hold numbers as measured, in their own units (tokens/s, fractions for percentages and MFU); how a column
  shows them (decimals, "k", "%", "x") is decided here, in TABLES, so a benchmark's --save and a transcription of
  older results render the same way, and a README cell is never typed by hand.
- A cell is a number, a list (several runs of one thing: "a / b"), {"low": a, "high": b} (a range: "a-b"), a string,
  a bool (yes / no), or missing (a column no row has is left out; a missing cell shows "-"). A row's "marks" maps
  a column key to a footnote mark appended to that cell.
- The README's block between `<!-- results:NAME -->` and `<!-- /results:NAME -->` is results/NAME.json rendered:
  everything between the markers is replaced, so a hand edit there is lost on the next render and --check
  reports it. Every results file must have its block and every block its file.
- The plot is drawn from every "scaling" table (default variants only); --check does not read it (matplotlib's
  bytes vary across versions), so it is redrawn by a plain run.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
ROOT_README = HERE.parent / "README.md"
RESULTS = HERE / "results"
FORMAT = 1


@dataclass(frozen=True)
class Column:
    label: str
    keys: tuple[str, ...]
    """One key, or several shown in one cell as "a / b / c"."""
    fmt: str = "s"
    """s (as is), d (integer, thousands separated), kN (thousands, N decimals, "k"), %N (a fraction as a
    percentage), +%N (the same, signed), xN (a ratio), eN (scientific, short exponent), else a format() spec."""
    group: bool = False
    """Show a value once for a run of equal values (the first row of a group), blank below it."""


def col(label: str, keys: str | tuple[str, ...], fmt: str = "s", group: bool = False) -> Column:
    return Column(label, (keys,) if isinstance(keys, str) else keys, fmt, group)


# Per table kind: its columns, in order. A benchmark's --save writes rows with these keys.
TABLES: dict[str, list[Column]] = {
    "tokenizer_training": [
        col("corpus", "corpus", group=True), col("trainer", "trainer"), col("time s", "time_s", ".3f"),
        col("pre-tok s", "pretokenize_s", ".3f"), col("merges s", "merges_s", ".3f"), col("vs HF", "vs_hf", "x2"),
        col("vocab", "vocab", "d"), col("bytes/token", "bytes_per_token", ".3f")],
    "tokenizer_encoding": [
        col("corpus", "corpus", group=True), col("encoder", "encoder"), col("MB/s", "mb_per_s", ".2f"),
        col("vs tiktoken", "vs_tiktoken", "x2")],
    "tokenizer_cold_split": [
        col("corpus", "corpus"), col("regex ms", "regex_ms", ".1f"),
        col("BPE of distinct pre-tokens ms", "bpe_ms", ".1f"), col("distinct pre-tokens", "distinct", "d"),
        col("cache lookups ms", "lookup_ms", ".1f"),
        col("whole cold encode ms", "total_ms", ".1f")],
    "tokenizer_memory": [
        col("input", "input"), col("MB", "mb", ".0f"), col("ids", "ids", "d"),
        col("peak RSS growth MB", "rss_growth_mb", ".1f"), col("peak Python allocations MB", "python_peak_mb", ".1f")],
    "attention": [
        col("head_dim", "head_dim", "d"), col("causal", "causal"), col("seq", "seq", "d"),
        col("ours fwd / bwd / f+b", ("ours_fwd", "ours_bwd", "ours_fwd_bwd"), ".0f"),
        col("flash fwd / bwd / f+b", ("flash_fwd", "flash_bwd", "flash_fwd_bwd"), ".0f"),
        col("cuDNN fwd / bwd / f+b", ("cudnn_fwd", "cudnn_bwd", "cudnn_fwd_bwd"), ".0f"),
        col("x flash fwd / bwd", ("x_flash_fwd", "x_flash_bwd"), ".2f"),
        col("x cuDNN fwd / bwd", ("x_cudnn_fwd", "x_cudnn_bwd"), ".2f"), col("err", "rel_err", "e1")],
    "attention_memory": [
        col("shape (B, H, S, D)", "shape"), col("implementation", "impl"),
        col("peak MiB above inputs", "peak_mib", ",.0f")],
    "train": [
        col("shape", "shape", group=True), col("system", "system"), col("tokens/s", "tokens_per_s", "k0"),
        col("MFU", "mfu", "%1"), col("step ms", "step_ms", ".2f"), col("vs HF compiled", "vs_hf_compiled", "x2"),
        col("step vs default", "vs_default", "+%1"), col("peak GiB", "peak_mem_GiB", ".2f"),
        col("warm-up + compile s", "warmup_s", ".1f"), col("error", "error")],
    "optim": [
        col("optimizer", "optimizer"), col("step ms", "step_ms", ".3f"), col("repeat", "repeat_ms", ".3f"),
        col("host ms/step", "host_ms", ".3f"), col("vs torch fused", "vs_torch_fused", "x2"),
        col("of floor", "of_floor", "%0")],
    "scaling": [
        col("shape", "shape", group=True), col("system", "system"), col("variant", "variant"),
        col("compile", "compile"), col("GPUs", "num_gpus", "d"), col("tok/s/GPU", "tokens_per_s_per_gpu", "k1"),
        col("1 GPU tok/s", "tokens_per_s_1gpu", "k1"), col("efficiency", "efficiency", "%1"),
        col("GiB/GPU", "peak_mem_GiB", ".2f"), col("GiB 1 GPU", "peak_mem_GiB_1gpu", ".2f"),
        col("ours/HF 1 GPU", "ours_over_hf_1gpu", "x2"), col("ours/HF per GPU", "ours_over_hf", "x2"),
        col("warm-up s", "warmup_s", ".1f"), col("error", "error")],
    "scaling_calls": [
        col("call", "call", "d", group=True), col("shape", "shape"), col("1 GPU tok/s", "tokens_per_s_1gpu", "k1"),
        col("DDP tok/s/GPU", "tokens_per_s_per_gpu", "k1"), col("efficiency", "efficiency", "%1")],
    "scaling_one_rank": [
        col("shape", "shape", group=True), col("run", "run"), col("step ms", "step_ms", ".2f"),
        col("tok/s", "tokens_per_s", "k1"), col("of 1 GPU", "of_1gpu", "%1"), col("peak GiB", "peak_mem_GiB", ".2f"),
        col("profiled compute ms/step", "compute_ms", ".2f"), col("idle ms/step", "idle_ms", ".2f")],
    "parity": [
        col("pair", "pair"), col("steps", "steps", "d"), col("max abs diff", "max_abs_diff", ".4f"),
        col("at step", "max_at_step", "d"), col("mean abs diff", "mean_abs_diff", ".4f"),
        col("first 12 steps, abs diff", "early_abs_diff", "e1"), col("second half, mean (1 GPU - other)",
                                                                  "late_mean_diff", "+.4f"),
        col("final 1 GPU", "final_1gpu", ".4f"), col("final other", "final_ngpu", ".4f"), col("error", "error")],
    "generate": [
        col("shape", "shape", group=True), col("batch", "batch", "d", group=True), col("system", "system"),
        col("tokens/s", "tokens_per_s", ",.0f"), col("TTFT ms", "ttft_ms", ".1f"),
        col("ours / HF static", "ours_over_hf_static", "x2"), col("match", "match", "%0"),
        col("warm-up s", "warmup_s", ".1f"), col("error", "error")],
    "tracking": [
        col("shape", "shape", group=True), col("tracking", "mode"), col("steps", "steps", "d"),
        col("tokens/s (mean)", "tokens_per_s", "k1"), col("cost vs off (median of pairs)", "overhead", "+%2"),
        col("each run tok/s", "runs", "k1"), col("wall s", "wall_s", ".0f")],
    "comm": [
        col("collective", "collective"), col("dtype", "dtype"), col("MiB", "mib", ",.0f"), col("ms", "ms", ".2f"),
        col("bus GB/s", "busbw_gbs", ",.0f")],
    "comm_overlap": [
        col("setting", "setting"), col("all-reduce ms", "all_reduce_ms", ".3f"),
        col("chain alone ms", "chain_ms", ".3f"), col("chain beside ms", "chain_beside_ms", ".3f"),
        col("slowdown ms", "slowdown_ms", "+.3f"), col("share of the all-reduce", "share", "%0")],
}
# A file with several tables prints each under its caption (a file of one table has its title).
CAPTIONS = {"tokenizer_training": "Training", "tokenizer_encoding": "Encoding",
            "tokenizer_cold_split": "Cold encode by phase (GPT-2)",
            "tokenizer_memory": "encode_iterable memory (tinystories-10k, a file's lines)",
            "attention": "TFLOP/s, bf16; x = ours / theirs; err = |ours - flash| / |flash|",
            "attention_memory": "Peak memory of one forward+backward, causal, bf16",
            "scaling": "Weak scaling: tokens/s per GPU at N GPUs against 1 GPU, per-GPU batch fixed",
            "parity": "Loss parity: per-step train/loss against 1 GPU x accumulation N, same global batch",
            "comm": "Collectives",
            "comm_overlap": "A matmul chain beside one all-reduce"}


# ---------------------------------------------------------------------------------------------------------------
# Writing (the benchmarks' --save)


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that ran, as one would type it again (`--save PATH` left out: it changes no measurement).

    >>> command_line("benchmarks/bench_optim.py", ["--rep", "300", "--save", "x.json"])
    'python benchmarks/bench_optim.py --rep 300'
    """
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--save":
            skip = True
        elif not a.startswith("--save="):
            kept.append(a)
    return shlex.join(["python", script, *kept])


def package_versions(*names: str) -> dict[str, str]:
    """{name: installed version} ("missing" when not installed), in the order given."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def write_results(path: Path | str, *, title: str, hardware: dict, versions: dict, commands: Sequence[str],
                  tables: dict[str, list[dict]], targets: Sequence[dict] = (), notes: Sequence[str] = (),
                  date: str | None = None, **extra) -> Path:
    """Write one results file (the format in the module docstring); `extra` keys are kept, not rendered."""
    data = {"format": FORMAT, "title": title,
            "date": date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "hardware": hardware, "versions": versions, "commands": list(commands), "tables": tables,
            "targets": list(targets), "notes": list(notes), **extra}
    check_results(data, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return path


def check_results(data: dict, where: str) -> None:
    """Refuse a file this renderer cannot show, naming what is wrong."""
    if data.get("format") != FORMAT:
        raise ValueError(f"{where}: format {data.get('format')!r}, this renderer reads format {FORMAT}")
    for key in ("title", "date", "hardware", "versions", "commands", "tables"):
        if key not in data:
            raise ValueError(f"{where}: no {key!r} (format in benchmarks/render.py's docstring)")
    stray = [t["command"] for t in data.get("targets", []) if "command" in t and t["command"] not in data["commands"]]
    if stray:
        raise ValueError(f"{where}: target command(s) {stray} are not among the file's commands")
    unknown = [k for k in data["tables"] if k not in TABLES]
    if unknown:
        raise ValueError(f"{where}: table kind(s) {unknown} unknown; known: {sorted(TABLES)}")
    for kind, rows in data["tables"].items():
        known = {k for c in TABLES[kind] for k in c.keys} | {"marks"}
        for row in rows:
            extra = set(row) - known
            if extra:
                raise ValueError(f"{where}: a {kind} row has key(s) {sorted(extra)} that no column shows; "
                                 f"columns: {sorted(known - {'marks'})}")


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _number(v: float, fmt: str) -> str:
    if fmt == "d":
        return f"{int(v):,}"
    if fmt[0] == "k":
        return f"{v / 1e3:,.{fmt[1:]}f}k"
    if fmt.startswith("+%"):
        return f"{100 * v:+.{fmt[2:]}f}%"
    if fmt[0] == "%":
        return f"{100 * v:.{fmt[1:]}f}%"
    if fmt[0] == "x":
        return f"{v:.{fmt[1:]}f}x"
    if fmt[0] == "e":
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{v:.{fmt[1:]}e}").replace("e+", "e")
    return format(v, fmt)


def cell(value, fmt: str) -> str:
    """One value as the README shows it.

    >>> cell(494000.0, "k1"), cell(0.9253, "%1"), cell([32.97, 32.99], ".2f")
    ('494.0k', '92.5%', '32.97 / 32.99')
    >>> cell({"low": 2.9e-6, "high": 5.6e-5}, "e1"), cell(None, ".2f"), cell(True, "s")
    ('2.9e-6 - 5.6e-5', '-', 'yes')
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " / ".join(cell(v, fmt) for v in value)
    if isinstance(value, dict):
        sep = " - " if fmt[0] == "e" else "-"
        return f"{cell(value['low'], fmt)}{sep}{cell(value['high'], fmt).lstrip('+')}"
    return _number(value, fmt)


def table(kind: str, rows: list[dict], formats: dict[str, str] | None = None) -> list[str]:
    """Markdown lines of one table: the columns of TABLES[kind] that some row has. `formats` (column key -> format)
    overrides a column's format: a transcription keeps the decimals its source printed."""
    shown = [c for c in TABLES[kind] if any(r.get(k) is not None for r in rows for k in c.keys)]
    formats = formats or {}
    lines = ["| " + " | ".join(c.label for c in shown) + " |", "|" + "---|" * len(shown)]
    last: dict[str, str] = {}
    for r in rows:
        cells = []
        for c in shown:
            marks = r.get("marks", {})
            text = " / ".join(cell(r.get(k), formats.get(k, c.fmt)) + marks.get(k, "") for k in c.keys)
            if c.group:
                text, last[c.label] = ("" if last.get(c.label) == text else text), text
            cells.append(text.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def hardware_text(hw: dict) -> str:
    if hw.get("gpu"):
        text = f"{hw.get('gpu_count', 1)}x {hw['gpu']}"
    else:
        text = hw.get("cpu", "?")
    return text + (f" ({hw['note']})" if hw.get("note") else "")


def render_block(data: dict) -> str:
    """The README block of one results file, without its markers: a line of what, when, on what, with which
    versions; the command (a code block when there are several); the tables; the targets and notes, one paragraph."""
    versions = ", ".join(f"{k} {v}" for k, v in data["versions"].items())
    out = [f"**{data['title']}**: {data['date']}, {hardware_text(data['hardware'])}; {versions}."]
    commands = data["commands"]
    out += [f"`{commands[0]}`"] if len(commands) == 1 else ["```bash", *commands, "```"]
    for kind, rows in data["tables"].items():
        out.append("")
        if len(data["tables"]) > 1:
            out += [f"*{CAPTIONS.get(kind, kind)}*", ""]
        out += table(kind, rows, data.get("formats"))
    if data.get("targets"):
        verdicts = {True: "**met**", False: "**NOT met**", None: "undecided"}
        out += ["", "Targets: " + "; ".join(
            f"{t['target']}: " + (f"{t['result']}, " if t.get("result") else "") + verdicts[t.get("met")]
            for t in data["targets"]) + "."]
    if data.get("notes"):  # the targets' paragraph goes on with them
        out += ([] if data.get("targets") else [""]) + data["notes"]
    return "\n".join(out)


def load_results(folder: Path = RESULTS) -> dict[str, dict]:
    results = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        check_results(data, str(path))
        results[path.stem] = data
    return results


MARKER = re.compile(r"<!-- results:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->", re.S)


def render_readme(text: str, results: dict[str, dict]) -> str:
    """`text` with every marked block replaced by its results file rendered."""
    found = [m.group("name") for m in MARKER.finditer(text)]
    missing_files = sorted(set(found) - set(results))
    missing_blocks = sorted(set(results) - set(found))
    if missing_files or missing_blocks or len(found) != len(set(found)):
        raise ValueError(f"README blocks without a results file: {missing_files}; results files without a block: "
                         f"{missing_blocks}; blocks more than once: {sorted({n for n in found if found.count(n) > 1})}")
    return MARKER.sub(lambda m: f"<!-- results:{m['name']} -->\n{render_block(results[m['name']])}\n"
                                f"<!-- /results:{m['name']} -->", text)


# The results whose targets make the project README's one table (its block `<!-- results:summary -->`), in order, each
# with its name there; the other files go deeper into one of these (more calls, 4 GPUs, the noise floor, a knob) and
# stay in benchmarks/README.md.
SUMMARY = {"train": "Training step, 1 GPU", "attention": "Attention kernel", "optim": "AdamW step",
           "generate": "Generation, 1 GPU", "tracking": "MLflow tracking", "scaling": "Data parallel, 2 GPUs",
           "scaling_parity": "Loss parity, 2 GPUs", "tokenizer": "Tokenizer (CPU)"}
SUMMARY_MARKER = re.compile(r"<!-- results:summary -->\n.*?<!-- /results:summary -->", re.S)


def render_summary(results: dict[str, dict], names: dict[str, str] = SUMMARY) -> str:
    """One table of the targets of the results files `names` (file -> its name in the table): what was promised,
    what was measured, on what, and the command that measures it again (the target's own "command" where a file
    holds several runs, else the file's first).

    >>> print(render_summary({"x": {"title": "X", "date": "2026-01-02", "hardware": {"cpu": "a CPU"},
    ...     "commands": ["python benchmarks/x.py"], "targets": [{"target": "t", "result": "1.2x", "met": True}]}},
    ...     {"x": "The x"}))
    | benchmark | target | measured | met | on | to measure again |
    |---|---|---|---|---|---|
    | The x | t | 1.2x | yes | a CPU, 2026-01-02 | `python benchmarks/x.py` |
    """
    verdicts = {True: "yes", False: "**no**", None: "undecided"}
    lines = ["| benchmark | target | measured | met | on | to measure again |", "|---|---|---|---|---|---|"]
    for name, label in names.items():
        data = results[name]
        hw = data["hardware"]
        on = f"{hw.get('gpu_count', 1)}x {hw['gpu']}" if hw.get("gpu") else hw.get("cpu", "?")
        for t in data.get("targets", []):
            lines.append(f"| {label} | {t['target']} | {t.get('result', '')} | {verdicts[t.get('met')]} | "
                         f"{on}, {data['date']} | `{t.get('command', data['commands'][0])}` |")
    return "\n".join(lines)


def render_root_readme(text: str, results: dict[str, dict], names: dict[str, str] = SUMMARY) -> str:
    """The project README with its summary block (the targets of `names`) rendered; it must have exactly one."""
    if len(SUMMARY_MARKER.findall(text)) != 1:
        raise ValueError("needs exactly one <!-- results:summary --> ... <!-- /results:summary --> block")
    missing = [n for n in names if n not in results]
    if missing:
        raise ValueError(f"the summary names results files that do not exist: {missing}")
    body = render_summary(results, names)
    return SUMMARY_MARKER.sub(lambda _: f"<!-- results:summary -->\n{body}\n<!-- /results:summary -->", text)


# ---------------------------------------------------------------------------------------------------------------
# Scaling plot


def plot_scaling(results: dict[str, dict], path: Path) -> Path | None:
    """Weak-scaling efficiency against GPU count, one panel per shape: a colour per system, a line style per results
    file (default variants only: a variant is not what a user gets); the targets (DDP 95%, FSDP2 90%) dashed."""
    series: dict[str, dict[tuple[str, str], list[tuple[int, float]]]] = {}
    for data in results.values():
        for r in data["tables"].get("scaling", []):
            if r.get("variant") or r.get("efficiency") is None:
                continue
            key = (r["system"], f"{data['title']} ({data['date']})")
            series.setdefault(r["shape"], {}).setdefault(key, [(1, 100.0)]).append(
                (r["num_gpus"], 100 * r["efficiency"]))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    keys = {k for lines in series.values() for k in lines}
    systems = sorted({s for s, _ in keys})
    sources = sorted({f for _, f in keys})
    colours = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(systems)}
    styles = {f: ("-", "--", ":", "-.")[i % 4] for i, f in enumerate(sources)}
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6), squeeze=False, sharey=True)
    for ax, (shape, lines) in zip(axes[0], sorted(series.items())):
        for (system, source), points in sorted(lines.items()):
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", markersize=3, color=colours[system], linestyle=styles[source])
        for target, name in ((95, "DDP target"), (90, "FSDP2 target")):
            ax.axhline(target, color="grey", linestyle=(0, (2, 2)), linewidth=0.7)
            ax.annotate(name, (1, target), xytext=(2, 2), textcoords="offset points", fontsize=6, color="grey")
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("GPUs (fixed batch per GPU)", fontsize=8)
        ax.set_xticks(sorted({x for pts in lines.values() for x, _ in pts}))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tokens/s per GPU, % of 1 GPU", fontsize=8)
    handles = [Line2D([], [], color=colours[s], marker="o", markersize=3, label=s) for s in systems]
    handles += [Line2D([], [], color="black", linestyle=styles[f], label=f) for f in sources]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=6.5, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.05 * ((len(handles) + 1) // 2), 1, 1))  # room for the legend rows
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a README is not up to date")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--root-readme", type=Path, default=ROOT_README,
                   help="the project README, whose summary block is rendered too")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of results/*.json")
    p.add_argument("--summary", default=",".join(SUMMARY),
                   help="the results files whose targets the project README's table lists, in order")
    p.add_argument("--plot", type=Path, default=None, help="the scaling plot's PNG (default: RESULTS/scaling.png)")
    args = p.parse_args(argv)
    results = load_results(args.results)
    stale = 0
    summary = {name: SUMMARY.get(name, name) for name in args.summary.split(",") if name}
    for readme, render in ((args.readme, render_readme),
                           (args.root_readme, lambda text, res: render_root_readme(text, res, summary))):
        text = readme.read_text()
        try:
            new = render(text, results)
        except ValueError as exc:
            print(f"{readme}: {exc}", file=sys.stderr)
            return 1
        if args.check and new != text:
            diff = difflib.unified_diff(text.splitlines(), new.splitlines(), str(readme), "rendered", lineterm="")
            print("\n".join(diff), file=sys.stderr)
            print(f"{readme} differs from what {args.results} renders: run python benchmarks/render.py",
                  file=sys.stderr)
            stale += 1
        elif not args.check and new != text:
            readme.write_text(new)
    if args.check:
        if not stale:
            print(f"{args.readme}, {args.root_readme}: {len(results)} result blocks up to date")
        return 1 if stale else 0
    plot = plot_scaling(results, args.plot or args.results / "scaling.png")
    print(f"{args.readme}, {args.root_readme}: {len(results)} result blocks rendered"
          + (f"; plot {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
