"""The CPU attention fallback warning, in a real 2-process `accelerate launch` (DDP over gloo): said once."""

from conftest import launch, ok, tiny_run

WARNING = "attention backend='auto' uses sdpa"


def test_two_ranks_print_the_fallback_warning_once(tmp_path, sample_shards):
    # Evaluation and training both run attention, on both ranks: once per rank and call would be many lines.
    proc = ok(launch(tiny_run(tmp_path / "r", sample_shards, "train.max_steps=3", "train.batch_size=4"),
                     accelerate_config="cpu_ddp.yaml", cwd=tmp_path))
    output = proc.stdout + proc.stderr
    assert output.count(WARNING) == 1, output[-5000:]
