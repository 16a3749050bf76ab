"""Bad input to launch/train.py, generate.py and export_hf.py: one clear line naming the problem and the fix,
exit 2, nothing overwritten."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TOKENIZER, checkout_env, launch, ok, tiny_run

from dist_lm.config import ModelConfig, RunConfig, config_to_dict
from dist_lm.model import TransformerLM
from dist_lm.tokenizer import Tokenizer, load_tokenizer, train_bpe
from dist_lm.train.checkpoint import save_checkpoint


def one_line_error(proc, *fragments: str, status: int = 2) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    # run_dir/.lock names whoever holds the run directory (dist_lm.train.lock), so every attempt rewrites it, refused
    # or not; what must stay untouched is the rest.
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_missing_config_file(tmp_path):
    proc = launch([], config=tmp_path / "nope.yaml", cwd=tmp_path)
    # `accelerate launch -q` turns our status 2 into its own 1, but passes the one line through.
    one_line_error(proc, "config file not found", "nope.yaml", status=1)


def test_unknown_key_and_impossible_value(tmp_path, sample_shards):
    proc = launch(tiny_run(tmp_path / "r", sample_shards, "optim.learnig_rate=1"), cwd=tmp_path, accelerate_config=None)
    one_line_error(proc, "unknown config key optim.learnig_rate", "accepted keys")
    proc = launch(tiny_run(tmp_path / "r", sample_shards, "model.num_heads=3"), cwd=tmp_path, accelerate_config=None)
    one_line_error(proc, "model.num_heads=3", "must divide model.d_model=32")
    assert not (tmp_path / "r").exists()  # nothing written for a run that never started


def test_missing_data(tmp_path, sample_shards):
    proc = launch(tiny_run(tmp_path / "r", sample_shards, f"data.data_dir={tmp_path / 'none'}",
                           f"data.source={tmp_path / 'corpus.txt'}"), cwd=tmp_path, accelerate_config=None)
    one_line_error(proc, "no token shards in", "prepare_data.py")
    proc = launch(tiny_run(tmp_path / "r", sample_shards, f"data.tokenizer_dir={tmp_path / 'no-tok'}"),
                  cwd=tmp_path, accelerate_config=None)
    one_line_error(proc, "no-tok")


def test_shards_made_with_another_tokenizer(tmp_path, sample_shards):
    vocab, merges = train_bpe(ROOT / "tests" / "fixtures" / "corpus.en", 300, ["<|endoftext|>"])
    Tokenizer(vocab, merges, ["<|endoftext|>"]).save(tmp_path / "other-tok")
    proc = launch(tiny_run(tmp_path / "r", sample_shards, f"data.tokenizer_dir={tmp_path / 'other-tok'}"),
                  cwd=tmp_path, accelerate_config=None)
    one_line_error(proc, "were made with tokenizer", "data.tokenizer_dir")


def test_resume_without_checkpoint_and_fresh_start_over_one(tmp_path, sample_shards):
    run = tmp_path / "r"
    proc = launch(tiny_run(run, sample_shards, "train.resume=latest"), cwd=tmp_path, accelerate_config=None)
    one_line_error(proc, "holds no checkpoint", "train.resume")
    ok(launch(tiny_run(run, sample_shards, "train.max_steps=3"), cwd=tmp_path, accelerate_config=None))
    before = snapshot(run)
    proc = launch(tiny_run(run, sample_shards), cwd=tmp_path, accelerate_config=None)
    one_line_error(proc, "already holds checkpoints", "train.resume=latest")
    assert snapshot(run) == before
    proc = launch(tiny_run(run, sample_shards, f"train.resume={run}"), cwd=tmp_path, accelerate_config=None)
    one_line_error(proc, "not a checkpoint", "step_0000003")


def test_corrupt_checkpoint_is_reported_and_left_alone(tmp_path, sample_shards):
    run = tmp_path / "r"
    ok(launch(tiny_run(run, sample_shards, "train.max_steps=3"), cwd=tmp_path, accelerate_config=None))
    weights = run / "checkpoints" / "step_0000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = snapshot(run)
    proc = launch(tiny_run(run, sample_shards, "train.resume=latest"), cwd=tmp_path, accelerate_config=None)
    one_line_error(proc, "is corrupt", "earlier checkpoint")
    assert snapshot(run) == before


def test_resume_with_another_model_shape(tmp_path, sample_shards):
    run = tmp_path / "r"
    ok(launch(tiny_run(run, sample_shards, "train.max_steps=3"), cwd=tmp_path, accelerate_config=None))
    proc = launch(tiny_run(run, sample_shards, "train.resume=latest", "model.d_model=64"), cwd=tmp_path,
                  accelerate_config=None)
    one_line_error(proc, "model.d_model=32", "same model config")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with one checkpoint of a tiny model, saved in-process (no training needed)."""
    cfg = RunConfig(model=ModelConfig(vocab_size=7040, seq_len=32, d_model=32, num_layers=1, num_heads=2))
    cfg.data.tokenizer_dir = str(TOKENIZER)
    run = tmp_path_factory.mktemp("gen") / "run"
    state = {"config": config_to_dict(cfg), "tokenizer_fingerprint": load_tokenizer(TOKENIZER).fingerprint()}
    save_checkpoint(run, 3, TransformerLM(cfg.model).state_dict(), {}, state)
    return run


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / name), *args], cwd=cwd, env=checkout_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["generate.py", "export_hf.py"])
def test_missing_or_file_checkpoint(tmp_path, run_dir, name):
    out = ["--out", str(tmp_path / "hf")] if name == "export_hf.py" else []
    proc = script(name, "--checkpoint", str(tmp_path / "nope"), *out, cwd=tmp_path)
    one_line_error(proc, f"--checkpoint {tmp_path / 'nope'} does not exist", "run directory")
    a_file = run_dir / "checkpoints" / "step_0000003" / "state.json"
    proc = script(name, "--checkpoint", str(a_file), *out, cwd=tmp_path)
    one_line_error(proc, "state.json is a file", "step_* directory")
    assert not (tmp_path / "hf").exists()


def test_generate_speaks_of_the_prompt(tmp_path, run_dir):
    proc = script("generate.py", "--checkpoint", str(run_dir), "--prompt", "", cwd=tmp_path)
    assert "prompt_ids" not in proc.stderr
    one_line_error(proc, "the prompt is empty", "Once upon a time")
    proc = ok(script("generate.py", "--checkpoint", str(run_dir), "--prompt", "Once upon a time",
                     "--max-new-tokens", "5", cwd=tmp_path))  # the same checkpoint works with a prompt
    assert proc.stdout.startswith("Once upon a time")


@pytest.mark.parametrize("value, shown", [("null", "is null"), ("17", "is a int ('17')")])
def test_prepare_data_names_the_jsonl_line_whose_text_is_not_text(tmp_path, value, shown):
    src = tmp_path / "corpus.jsonl"
    src.write_text('{"text": "Tom saw a ball."}\n{"text": "Sam said hello."}\n{"text": ' + value + "}\n"
                   '{"text": "The end."}\n')
    proc = script("prepare_data.py", "--source", str(src), "--tokenizer", str(TOKENIZER), "--out",
                  str(tmp_path / "shards"), cwd=tmp_path)
    one_line_error(proc, f"{src}:3: field 'text' (data.text_field) {shown}, not text")
    assert not (tmp_path / "shards").exists()
