"""benchmarks/render.py: the README's result blocks are what benchmarks/results/ renders (the repository's own check),
a known table renders to a known text, hand edits and missing files are caught, and what the benchmarks' --save
writes is what the renderer reads."""

import doctest
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import render  # noqa: E402

SCALING_ROWS = [
    {"shape": "124m", "system": "dist_lm DDP", "num_gpus": 2, "tokens_per_s_per_gpu": 494000.0,
     "tokens_per_s_1gpu": 534000.0, "efficiency": 0.9251, "peak_mem_GiB": 9.1},
    {"shape": "124m", "system": "dist_lm FSDP2", "num_gpus": 2, "tokens_per_s_per_gpu": 511500.0,
     "tokens_per_s_1gpu": 534000.0, "efficiency": 0.9579, "peak_mem_GiB": 7.55, "ours_over_hf": 1.29},
]
README = "# T\n\nintro\n\n<!-- results:demo -->\nstale text\n<!-- /results:demo -->\n\nafter\n"
EXPECTED = """# T

intro

<!-- results:demo -->
**Demo**: 2026-01-02, 2x GPU X (a note); torch 2.0.
`python benchmarks/bench_scaling.py --part dist_lm`

| shape | system | GPUs | tok/s/GPU | 1 GPU tok/s | efficiency | GiB/GPU | ours/HF per GPU |
|---|---|---|---|---|---|---|---|
| 124m | dist_lm DDP | 2 | 494.0k | 534.0k | 92.5% | 9.10 | - |
|  | dist_lm FSDP2 | 2 | 511.5k | 534.0k | 95.8% | 7.55 | 1.29x |

Targets: DDP ≥95%: 92.5%, **NOT met**; FSDP2 ≥90%: 95.8%, **met**; 8 GPUs: undecided.
Rows as measured.
<!-- /results:demo -->

after
"""


def write_demo(folder: Path) -> Path:
    return render.write_results(
        folder / "demo.json", title="Demo", date="2026-01-02",
        hardware={"gpu": "GPU X", "gpu_count": 2, "note": "a note"}, versions={"torch": "2.0"},
        commands=["python benchmarks/bench_scaling.py --part dist_lm"],
        tables={"scaling": SCALING_ROWS},
        targets=[{"target": "DDP ≥95%", "result": "92.5%", "met": False},
                 {"target": "FSDP2 ≥90%", "result": "95.8%", "met": True}, {"target": "8 GPUs", "met": None}],
        notes=["Rows as measured."])


def run(tmp_path: Path, *extra: str) -> int:
    root = tmp_path / "ROOT.md"  # the project README's summary block, rendered too
    if not root.exists():
        root.write_text("# project\n<!-- results:summary -->\n<!-- /results:summary -->\n")
    return render.main(["--readme", str(tmp_path / "README.md"), "--results", str(tmp_path / "results"),
                        "--root-readme", str(root), "--summary", "demo", "--plot", str(tmp_path / "scaling.png"),
                        *extra])


def test_the_repositorys_readme_is_what_its_results_render():
    assert render.main(["--check"]) == 0, "run: python benchmarks/render.py"


def test_a_known_results_file_renders_to_a_known_block(tmp_path):
    write_demo(tmp_path / "results")
    (tmp_path / "README.md").write_text(README)
    assert run(tmp_path, "--check") == 1  # the stale block is reported, and nothing is written
    assert (tmp_path / "README.md").read_text() == README and not (tmp_path / "scaling.png").exists()

    assert run(tmp_path) == 0
    assert (tmp_path / "README.md").read_text() == EXPECTED
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run(tmp_path, "--check") == 0
    assert run(tmp_path) == 0 and (tmp_path / "README.md").read_text() == EXPECTED  # rendering again changes nothing


def test_check_catches_a_hand_edited_cell_and_a_block_without_its_file(tmp_path):
    write_demo(tmp_path / "results")
    (tmp_path / "README.md").write_text(EXPECTED.replace("| 92.5% |", "| 95.2% |"))
    assert run(tmp_path, "--check") == 1

    (tmp_path / "README.md").write_text(EXPECTED + "<!-- results:gone -->\n<!-- /results:gone -->\n")
    assert run(tmp_path, "--check") == 1
    (tmp_path / "README.md").write_text("# no blocks\n")  # a results file without its block
    assert run(tmp_path, "--check") == 1


def test_a_results_file_the_renderer_cannot_show_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        render.write_results(tmp_path / "x.json", title="x", hardware={}, versions={}, commands=[],
                             tables={"no_such_table": []})
    with pytest.raises(ValueError, match="tokens_per_sec"):
        render.write_results(tmp_path / "x.json", title="x", hardware={}, versions={}, commands=[],
                             tables={"scaling": [{"shape": "124m", "tokens_per_sec": 1.0}]})
    path = write_demo(tmp_path)
    data = json.loads(path.read_text())
    data["format"] = 0
    with pytest.raises(ValueError, match="format"):
        render.check_results(data, str(path))


def test_a_target_names_the_command_that_measures_it_in_the_summary():
    runs = {"x": {"title": "X", "date": "2026-01-02", "hardware": {"cpu": "a CPU"}, "versions": {}, "tables": {},
                  "format": render.FORMAT, "commands": ["python b.py --shapes a", "python b.py --shapes b"],
                  "targets": [{"target": "at a", "met": True},
                              {"target": "at b", "met": None, "command": "python b.py --shapes b"}]}}
    rows = render.render_summary(runs, {"x": "X"}).splitlines()[2:]
    assert rows[0].endswith("`python b.py --shapes a` |") and rows[1].endswith("`python b.py --shapes b` |")
    runs["x"]["targets"][1]["command"] = "python b.py --shapes c"
    with pytest.raises(ValueError, match="shapes c"):
        render.check_results(runs["x"], "x.json")


def test_cells_ranges_lists_marks_and_format_overrides():
    rows = [{"pair": "a", "early_abs_diff": {"low": 2.9e-6, "high": 5.6e-5}, "max_abs_diff": 0.448,
             "final_1gpu": [3.2337, 3.2332], "marks": {"pair": "*"}}]
    assert render.table("parity", rows, {"max_abs_diff": ".3f"}) == [
        "| pair | max abs diff | first 12 steps, abs diff | final 1 GPU |", "|---|---|---|---|",
        "| a* | 0.448 | 2.9e-6 - 5.6e-5 | 3.2337 / 3.2332 |"]


@pytest.mark.parametrize("module", ["render", "bench_train", "bench_optim", "bench_attention"])
def test_module_doctests(module):
    """The docstring examples: the renderer's cells, and each GPU benchmark's conversion of its rows for --save."""
    result = doctest.testmod(__import__(module))
    assert result.attempted > 0 and result.failed == 0


def test_what_the_gpu_benchmarks_save_renders(tmp_path):
    """The rows bench_train, bench_optim and bench_attention write with --save (measured on a GPU, so built here
    from made-up measurements) are rows the renderer shows, targets checked."""
    import bench_attention
    import bench_optim
    import bench_train

    train = bench_train.results_rows([
        {"shape": "124m", "system": s, "tokens_per_s": tps, "step_ms": ms, "mfu": 0.3, "peak_mem_GiB": 9.0,
         "warmup_s": 20.0, "batch": 16}
        for s, tps, ms in (("hf-compiled", 400e3, 40.0), ("ours-compiled", 480e3, 33.0))])
    optim = bench_optim.results_rows(
        [{"optimizer": "ours fused (triton)", "ms": 0.76, "ms_repeat": 0.76, "host_ms": 0.8},
         {"optimizer": "torch fused", "ms": 0.78, "ms_repeat": 0.78, "host_ms": 0.3}], 0.68)
    impl = {"fwd_tflops": 300.0, "bwd_tflops": 250.0, "fwd_bwd_tflops": 260.0}
    attention = bench_attention.results_rows([
        {"head_dim": 64, "causal": True, "seq": seq, "rel_err_vs_flash": 1e-3, "ours": impl,
         "flash": {k: v / 1.5 for k, v in impl.items()}, "cudnn": {"error": "refused"}} for seq in (256, 1024)])
    for name, tables, targets in (
            ("train", {"train": train}, bench_train.target_rows(train)),
            ("optim", {"optim": optim}, []),
            ("attention", {"attention": attention}, bench_attention.target_rows(attention))):
        render.write_results(tmp_path / "results" / f"{name}.json", title=name, hardware={"gpu": "G"},
                             versions={}, commands=["python x"], tables=tables, targets=targets)
    (tmp_path / "README.md").write_text("".join(f"<!-- results:{n} -->\n<!-- /results:{n} -->\n"
                                                for n in ("train", "optim", "attention")))
    assert run(tmp_path, "--summary", "train,attention") == 0
    summary = (tmp_path / "ROOT.md").read_text()  # the project README's table lists the targets, with the command
    assert "| Training step, 1 GPU | ≥1.15x HF compiled at 124m | 1.20x | yes | 1x G, " in summary, summary
    assert "| `python x` |" in summary, summary
    text = (tmp_path / "README.md").read_text()
    assert "| 124m | hf-compiled | 400k | 30.0% | 40.00 | 1.00x | 9.00 | 20.0 |" in text, text
    assert "≥1.15x HF compiled at 124m: 1.20x, **met**" in text, text
    assert "| ours fused (triton) | 0.760 | 0.760 | 0.800 | 0.97x | 89% |" in text, text
    assert "| 64 | yes | 1,024 | 300 / 250 / 260 | 200 / 167 / 173 | 1.50 / 1.50 | 1.0e-3 |" in text, text
    assert "causal, seq ≥1k: forward ≥1.3x flash: 1.50x-1.50x, **met**" in text, text


def test_bench_scalings_rows_become_a_results_file_with_efficiency_and_targets(tmp_path):
    """scaling_common.results: the worker rows of the parts (1 GPU, DDP, FSDP2 at 2 GPUs) against their 1-GPU run,
    and the issue's targets computed from them; parity comparisons with the first steps' range and the late offset."""
    import scaling_common

    def row(topology, gpus, tps, gib):
        return {"system": "dist_lm", "shape": "124m", "topology": topology, "num_gpus": gpus, "compiled": True,
                "variant": "", "baseline_key": "k", "tokens_per_s_per_gpu": tps, "peak_mem_GiB": gib,
                "warmup_s": 20.0, "compile": "cudagraphs"}

    meta = {"date": "2026-01-02 10:00 UTC", "gpu": "GPU X", "gpu_count": 2, "versions": {"torch": "2.0"},
            "command": "python benchmarks/bench_scaling.py --part dist_lm --quick"}
    losses = [3.0 + 0.01 * i for i in range(20)]
    other = [v - 0.02 * (i >= 10) for i, v in enumerate(losses)]  # apart by 0.02 over the second half
    comparison = {"pair": "2 GPUs DDP vs 1 GPU accum 2", "steps": 20, "max_abs_diff": 0.02, "max_at_step": 15,
                  "mean_abs_diff": 0.01, "final_1gpu": losses[-1], "final_ngpu": other[-1], "losses_1gpu": losses,
                  "losses_ngpu": other}
    parts = {"dist_lm": {"meta": meta, "rows": [row("single", 1, 500e3, 8.5), row("ddp", 2, 470e3, 9.0),
                                                 row("fsdp", 2, 480e3, 7.5)]},
             "parity": {"meta": {**meta, "date": "2026-01-03 09:00 UTC", "command": "python x --part parity"},
                        "rows": [], "comparisons": [comparison]}}
    data = scaling_common.results(parts)
    assert data["date"] == "2026-01-03" and data["hardware"] == {"gpu": "GPU X", "gpu_count": 2}
    assert data["commands"] == ["python benchmarks/bench_scaling.py --part dist_lm --quick", "python x --part parity"]
    ddp, fsdp = data["tables"]["scaling"]
    assert (ddp["system"], ddp["efficiency"], ddp["tokens_per_s_1gpu"], ddp["peak_mem_GiB_1gpu"]) == (
        "dist_lm DDP", 0.94, 500e3, 8.5)
    assert fsdp["system"] == "dist_lm FSDP2" and fsdp["efficiency"] == 0.96
    assert [(t["target"], t["result"], t["met"]) for t in data["targets"]] == [
        ("DDP ≥95% at 2 GPUs, 124m", "94.0%", False),
        ("FSDP2 ≥90% at 2 GPUs, 124m, with less memory per GPU than DDP", "96.0%, 7.50 vs DDP's 9.00 GiB", True)]
    (parity,) = data["tables"]["parity"]
    assert parity["early_abs_diff"] == {"low": 0.0, "high": pytest.approx(0.02)}
    assert parity["late_mean_diff"] == pytest.approx(0.02)
    render.write_results(tmp_path / "scaling.json", title="t", **data)  # the renderer takes it as it is
