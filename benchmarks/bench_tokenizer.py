"""Tokenizer benchmark: dist_lm vs Hugging Face `tokenizers` (training) and tiktoken (encoding), same process.

    python benchmarks/bench_tokenizer.py [--repeat 3] [--save benchmarks/results/tokenizer.json]

Prints, on the bundled TinyStories sample and on tests/fixtures/corpus.en:
- training time of ours (1 and 2 workers, split into pre-tokenization and merges) and of HF's
  byte-level BpeTrainer at the same vocab size and specials, with the ratio and bytes/token;
- encode MB/s of ours (1 process, cold and warm cache; N processes via encode_batch), of tiktoken
  and of HF `tokenizers`, all with GPT-2's files, and of ours with the shipped tinystories-10k;
  "cold" is a fresh Tokenizer per run (empty pre-token cache), timed from the encode call;
- where a cold encode spends its time: regex, BPE of the distinct pre-tokens (whole-token words are a
  lookup, the rest run the merge loop), cache lookups;
- peak memory growth of `encode_iterable` over a file 1x and 10x the sample (fresh subprocess each).
Times are the best of `--repeat` runs, to damp noise from other work on a shared machine.
The tables are printed as benchmarks/README.md shows them. `--save PATH` also writes the results file
(benchmarks/render.py's format, with the targets checked); saved over benchmarks/results/tokenizer.json, a run
updates the README's tables through `python benchmarks/render.py`. Name the machine with `--machine` (the CPU
model is not portable to read from Python).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

import regex
import tiktoken

from dist_lm.tokenizer import Tokenizer, load_tokenizer
from dist_lm.tokenizer.formats import CHAR_TO_BYTE
from dist_lm.tokenizer.pretokenize import PRETOKEN_RE
from dist_lm.tokenizer.train import train_bpe_with_stats
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render import command_line, package_versions, table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "dist_lm" / "data" / "samples" / "tinystories_sample.txt"
CORPUS_EN = ROOT / "tests" / "fixtures" / "corpus.en"
GPT2_DIR = ROOT / "tests" / "fixtures" / "gpt2"
SHIPPED = ROOT / "tokenizers" / "tinystories-10k"
EOT = "<|endoftext|>"


def best_of(repeat: int, fn):
    """(best seconds, last result) over `repeat` calls."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def hf_train(path: Path, vocab_size: int) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(path)], trainer)
    return tok


def bench_training(path: Path, vocab_size: int, repeat: int) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    rows = []
    t_hf, hf = best_of(repeat, lambda: hf_train(path, vocab_size))
    hf_bpt = n_bytes / len(hf.encode(text).ids)
    for workers in (1, 2):
        runs = [train_bpe_with_stats(path, vocab_size, [EOT], num_workers=workers, progress=False)
                for _ in range(repeat)]
        stats = min((r[2] for r in runs), key=lambda s: s.pretokenize_s + s.merge_s)
        total = stats.pretokenize_s + stats.merge_s
        rows.append({"corpus": path.name, "trainer": f"ours, {workers} worker(s)", "time_s": total,
                     "pretokenize_s": stats.pretokenize_s, "merges_s": stats.merge_s, "vs_hf": total / t_hf,
                     "vocab": stats.vocab_size, "bytes_per_token": stats.bytes_per_token})
    rows.append({"corpus": path.name, "trainer": "HF tokenizers BpeTrainer", "time_s": t_hf, "vs_hf": 1.0,
                 "vocab": hf.get_vocab_size(), "bytes_per_token": hf_bpt})
    return rows


def tiktoken_gpt2() -> tiktoken.Encoding:
    from tiktoken_ext.openai_public import r50k_pat_str

    raw = json.loads((GPT2_DIR / "gpt2_vocab.json").read_text(encoding="utf-8"))
    ranks = {bytes(CHAR_TO_BYTE[c] for c in s): i for s, i in raw.items() if s != EOT}
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: raw[EOT]})


def bench_encode(path: Path, repeat: int, num_workers: int) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    docs = text.split(EOT) if EOT in text else text.splitlines(keepends=True)
    gpt2_files = (GPT2_DIR / "gpt2_vocab.json", GPT2_DIR / "gpt2_merges.txt", [EOT])
    tik = tiktoken_gpt2()
    with tempfile.TemporaryDirectory() as d:
        Tokenizer.from_files(*gpt2_files).save(d)  # our export of GPT-2, for HF tokenizers
        hf = HFTokenizer.from_file(str(Path(d) / "tokenizer.json"))

    def cold():
        tok = Tokenizer.from_files(*gpt2_files)  # fresh, empty pre-token cache
        t = time.perf_counter()
        tok.encode(text)
        return time.perf_counter() - t

    t_cold = min(cold() for _ in range(repeat))
    ours = Tokenizer.from_files(*gpt2_files)
    ours.encode(text)
    t_warm, ids = best_of(repeat, lambda: ours.encode(text))
    # 4x the text for the pool, so that starting it (~0.1 s) is not most of what is measured
    t_multi, _ = best_of(repeat, lambda: ours.encode_batch(docs * 4, num_workers=num_workers))
    t_multi /= 4
    t_tik, ids_tik = best_of(repeat, lambda: tik.encode(text, allowed_special="all"))
    t_hf, enc_hf = best_of(repeat, lambda: hf.encode(text))
    assert ids == ids_tik == enc_hf.ids, "ids differ: run the tests"
    shipped = load_tokenizer(SHIPPED)
    shipped.encode(text)
    t_shipped, _ = best_of(repeat, lambda: shipped.encode(text))
    rows = [
        ("ours, 1 process, cold cache (GPT-2)", t_cold),
        ("ours, 1 process, warm cache (GPT-2)", t_warm),
        (f"ours, encode_batch num_workers={num_workers}, text x4 (GPT-2)", t_multi),
        ("ours, 1 process, warm cache (tinystories-10k)", t_shipped),
        ("tiktoken, 1 thread (GPT-2)", t_tik),
        ("HF tokenizers encode (GPT-2 tokenizer.json)", t_hf),
    ]
    return [{"corpus": path.name, "encoder": name, "mb_per_s": mb / t, "vs_tiktoken": t_tik / t} for name, t in rows]


def cold_split(path: Path, repeat: int) -> dict:
    """One row: a cold encode's time split into its phases (best of `repeat` each, fresh tokenizer per run)."""
    text = path.read_text(encoding="utf-8")
    gpt2_files = (GPT2_DIR / "gpt2_vocab.json", GPT2_DIR / "gpt2_merges.txt", [EOT])
    best: dict[str, float] = {}
    for _ in range(repeat):
        tok = Tokenizer.from_files(*gpt2_files)
        times = {}
        t = time.perf_counter()
        parts = tok._special_re.split(text)[::2]
        words = [PRETOKEN_RE.findall(p) for p in parts]
        times["regex"] = time.perf_counter() - t
        t = time.perf_counter()
        distinct = set(chain.from_iterable(words))
        # what a cache miss does: a whole-token word is a lookup, any other word runs the merge loop
        cache = {w: tok._whole_words.get(w) or tok._bpe(w) for w in distinct}
        times["bpe"] = time.perf_counter() - t
        t = time.perf_counter()
        for w in words:
            list(chain.from_iterable(map(cache.__getitem__, w)))
        times["lookup"] = time.perf_counter() - t
        tok = Tokenizer.from_files(*gpt2_files)
        t = time.perf_counter()
        tok.encode(text)
        times["total"] = time.perf_counter() - t
        best = {k: min(best.get(k, float("inf")), v) for k, v in times.items()}
    ms = {k: v * 1e3 for k, v in best.items()}
    return {"corpus": path.name, "regex_ms": ms["regex"], "bpe_ms": ms["bpe"], "distinct": len(distinct),
            "lookup_ms": ms["lookup"], "total_ms": ms["total"]}


# RSS high-water mark can hide growth behind the loading peak, so the child also reports tracemalloc's
# peak of Python allocations made while streaming (the cache included: it is part of what grows).
_MEM_CHILD = """
import resource, sys, tracemalloc
from dist_lm.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
t0 = tracemalloc.get_traced_memory()[0]
with open(sys.argv[2], encoding="utf-8") as f:
    n = sum(1 for _ in tok.encode_iterable(f))
peak_py = tracemalloc.get_traced_memory()[1] - t0
tracemalloc.stop()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(n, (peak - base) / 1024, peak_py / 2**20)
"""


def bench_memory(repeats: tuple[int, ...] = (1, 10)) -> list[dict]:
    rows = []
    sample = SAMPLE.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as d:
        for k in repeats:
            path = Path(d) / f"x{k}.txt"
            path.write_text(sample * k, encoding="utf-8")
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            out = subprocess.run([sys.executable, "-c", _MEM_CHILD, str(SHIPPED), str(path)], env=env,
                                 capture_output=True, text=True, check=True).stdout.split()
            rows.append({"input": f"encode_iterable, sample x{k}", "mb": path.stat().st_size / 1e6, "ids": int(out[0]),
                         "rss_growth_mb": float(out[1]), "python_peak_mb": float(out[2])})
    return rows


def targets(training: list[dict], encoding: list[dict], memory: list[dict]) -> list[dict]:
    """The issue's targets, checked against the rows."""
    train_x = [r["vs_hf"] for r in training if r["trainer"].startswith("ours")]
    ours = [r for r in encoding if r["encoder"].startswith("ours")]
    hf = {r["corpus"]: r["mb_per_s"] for r in encoding if r["encoder"].startswith("HF")}
    enc_x = [r["vs_tiktoken"] for r in ours]
    hf_x = [r["vs_tiktoken"] for r in encoding if r["encoder"].startswith("HF")]
    mem = max(max(r["rss_growth_mb"], r["python_peak_mb"]) for r in memory)
    return [
        {"target": "training time ≤10x HF tokenizers", "result": f"{min(train_x):.2f}x-{max(train_x):.2f}x",
         "met": max(train_x) <= 10},
        {"target": "encode ≥0.25x tiktoken and never below HF tokenizers",
         "result": f"ours {min(enc_x):.2f}x-{max(enc_x):.2f}x, HF tokenizers {min(hf_x):.2f}x-{max(hf_x):.2f}x",
         "met": min(enc_x) >= 0.25 and all(r["mb_per_s"] >= hf[r["corpus"]] for r in ours)},
        {"target": "encode_iterable memory ≤100 MB", "result": f"at most {mem:.1f} MB (RSS growth or Python "
         "allocations) at 1x and 10x the sample", "met": mem <= 100},
    ]


def main() -> None:
    p = argparse.ArgumentParser(description="dist_lm tokenizer benchmark")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=10000)
    p.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--save", type=Path, default=None, help="also write the results file here (benchmarks/results/)")
    p.add_argument("--machine", default="", help="what the machine is, for the results file (e.g. the CPU model)")
    args = p.parse_args()
    # "stopped at vocab N": expected on these small corpora, and the table shows the vocab reached.
    logging.getLogger("dist_lm.tokenizer.train").setLevel(logging.ERROR)

    machine = f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, {platform.system()}"
    versions = {"python": platform.python_version(), "regex": regex.__version__,
                **package_versions("tokenizers", "tiktoken")}
    print(f"machine: {machine}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    tables = {}
    sections = (("tokenizer_training", f"Training (vocab {args.vocab_size} asked, specials [{EOT}], best of "
                 f"{args.repeat})", lambda: [r for path in (SAMPLE, CORPUS_EN)
                                             for r in bench_training(path, args.vocab_size, args.repeat)]),
                ("tokenizer_encoding", f"Encoding (best of {args.repeat})",
                 lambda: [r for path in (SAMPLE, CORPUS_EN)
                          for r in bench_encode(path, args.repeat, args.num_workers)]),
                ("tokenizer_cold_split", f"Cold encode time split (GPT-2, best of {args.repeat} per phase)",
                 lambda: [cold_split(path, args.repeat) for path in (SAMPLE, CORPUS_EN)]),
                ("tokenizer_memory", "encode_iterable peak RSS growth (tinystories-10k, file lines)", bench_memory))
    for kind, caption, run in sections:
        tables[kind] = run()
        print(f"\n### {caption}\n")
        print("\n".join(table(kind, tables[kind])))
    checked = targets(tables["tokenizer_training"], tables["tokenizer_encoding"], tables["tokenizer_memory"])
    print()
    for t in checked:
        print(f"{t['target']}: {t['result']} -> {'met' if t['met'] else 'NOT met'}")
    if args.save:
        write_results(args.save, title="Tokenizer: dist_lm vs HF tokenizers (training) and tiktoken (encoding)",
                      hardware={"cpu": args.machine or machine}, versions=versions,
                      commands=[command_line("benchmarks/bench_tokenizer.py")], tables=tables, targets=checked,
                      notes=[f"Vocab {args.vocab_size} asked, specials [{EOT}]; every row the best of {args.repeat}."])
        print(f"wrote {args.save}")


if __name__ == "__main__":
    main()
