"""Bad input to launch/train.py: one clear line naming the problem and the fix, exit 2, nothing overwritten."""

from pathlib import Path

from conftest import ROOT, launch, ok, tiny_run

from dist_lm.tokenizer import Tokenizer, train_bpe


def one_line_error(proc, *fragments: str, status: int = 2) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


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
