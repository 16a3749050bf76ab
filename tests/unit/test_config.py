"""Config loading: YAML + overrides, type checks, impossible values, round trips."""

from pathlib import Path

import pytest

from dist_lm.config import (
    ModelConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
    flatten_config,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    for path in CONFIGS.glob("*.yaml"):
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig), path


def test_seed_config_matches_the_seed():
    cfg = load_config(CONFIGS / "tinystories_seed.yaml")
    m, o = cfg.model, cfg.optim
    assert (m.vocab_size, m.seq_len, m.d_model, m.num_layers, m.num_heads, m.rope_theta) == (10000, 256, 512, 12, 8,
                                                                                              10000.0)
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.warmup_steps, o.min_lr, o.cosine_steps, o.grad_clip) == (
        1e-4, (0.9, 0.95), 1e-8, 1e-4, 2000, 1e-6, 10000, 1.0)
    assert cfg.train.batch_size == 32
    assert m.ffn_dim() == 1408  # 8/3 * 512 = 1365.3, rounded up to a multiple of 64


def test_yaml_values_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  d_model: 64\n  num_heads: 4\noptim:\n  lr: 1e-3\n  warmup_steps: 10\n")
    cfg = load_config(path, ["optim.lr=3e-4", "train.compile=true", "optim.betas=[0.8, 0.9]", "name=x"])
    assert cfg.model.d_model == 64 and cfg.model.head_dim() == 16
    assert cfg.optim.lr == 3e-4  # YAML 1.1 reads 1e-3 as a string; we accept it as a float, then override
    assert cfg.train.compile is True
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.name == "x" and cfg.output_dir() == Path("runs/x")
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML's bool `no`


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("model:\n  d_modle: 64\n", [], "unknown config key model.d_modle"),
        ("modle:\n  d_model: 64\n", [], "unknown config key modle"),
        ("", ["train.max_step=3"], "accepted keys: "),
        ("model:\n  num_layers: two\n", [], "model.num_layers='two' must be an integer"),
        ("train:\n  compile: 1\n", [], "train.compile=1 must be true or false"),
        ("train:\n  mixed_precision: fp8\n", [], "one of 'launcher', 'no', 'bf16', 'fp16'"),
        ("model:\n  d_model: 100\n  num_heads: 3\n", [], "num_heads=3 is not accepted: must divide model.d_model"),
        ("optim:\n  warmup_steps: 500\n  cosine_steps: 100\n", [], "optim.warmup_steps=500 is not accepted"),
        ("optim:\n  betas: [0.9]\n", [], "optim.betas"),
        ("optim:\n  min_lr: 1.0\n  lr: 0.1\n", [], "optim.min_lr=1.0"),
        ("train:\n  batch_size: 0\n", [], "train.batch_size=0"),
        ("", ["train.compile_mode=fast"], "one of 'model', 'blocks', 'cudagraphs'"),
        ("", ["train.ddp_bucket_mb=0"], "train.ddp_bucket_mb=0 is not accepted"),
        ("", ["train.fsdp_group_blocks=0"], "train.fsdp_group_blocks=0 is not accepted"),
        ("", ["train.fsdp_unit=layer"], "one of 'block', 'group', 'model'"),
        ("model: 3\n", [], "config section model must be a mapping"),
        ("", ["optim.lr"], "must look like section.key=value"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ValueError, match=None) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)


def test_unknown_key_lists_accepted(tmp_path):
    with pytest.raises(ValueError) as err:
        load_config(write(tmp_path, "optim:\n  learning_rate: 1\n"))
    assert "learning_rate" in str(err.value) and "warmup_steps" in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(None, ["model.d_ff=96", "optim.betas=[0.85, 0.99]", "data.val_fraction=0.1"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    flat = flatten_config(cfg)
    assert flat["optim.lr"] == cfg.optim.lr and flat["model.d_ff"] == 96 and flat["optim.betas"] == [0.85, 0.99]


def test_ffn_dim_rounding():
    assert ModelConfig(d_model=768).ffn_dim() == 2048
    assert ModelConfig(d_model=512, d_ff=1344).ffn_dim() == 1344
