"""Export to transformers: LlamaForCausalLM and AutoTokenizer loaded from the export match ours."""

import os
import stat
from pathlib import Path

import pytest
import torch

from dist_lm.config import ModelConfig, RunConfig, config_to_dict
from dist_lm.export import export_to_hf
from dist_lm.model import TransformerLM
from dist_lm.tokenizer import load_tokenizer
from dist_lm.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tokenizers" / "tinystories-10k"


@pytest.fixture
def checkpoint(tmp_path):
    cfg = RunConfig(model=ModelConfig(vocab_size=7040, seq_len=64, d_model=64, num_layers=2, num_heads=4,
                                      rope_theta=500.0, norm_eps=1e-6))
    cfg.data.tokenizer_dir = str(TOKENIZER)
    torch.manual_seed(0)
    model = TransformerLM(cfg.model)
    with torch.no_grad():  # non-trivial norm gains, so a wrong name mapping cannot hide behind ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    state = {"config": config_to_dict(cfg), "tokenizer_fingerprint": load_tokenizer(TOKENIZER).fingerprint()}
    return save_checkpoint(tmp_path / "run", 10, model.state_dict(), {}, state), model


def test_llama_from_export_gives_our_logits(checkpoint, tmp_path):
    import transformers  # an oracle from the [dev] extra

    path, model = checkpoint
    out = export_to_hf(path, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 7040, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model.eval()(idx), atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Once upon a time, Tom saw 3 red balls.<|endoftext|>"
    assert tok(text)["input_ids"] == load_tokenizer(TOKENIZER).encode(text)
    assert tok.eos_token == "<|endoftext|>"


def test_export_refuses_to_overwrite_and_a_wrong_tokenizer(checkpoint, tmp_path):
    path, _ = checkpoint
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_to_hf(path, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not the one"):
        export_to_hf(path, tmp_path / "x", tokenizer_dir=ROOT / "tokenizers" / "gpt2")


@pytest.mark.skipif(os.name != "posix", reason="permission bits are a POSIX notion")
@pytest.mark.parametrize("umask", [0o022, 0o002], ids=oct)
def test_export_files_get_the_umask_modes(checkpoint, tmp_path, umask):
    # An export is made to be shared: model.safetensors must be as readable as config.json, as the umask says.
    path, _ = checkpoint
    old = os.umask(umask)
    try:
        out = export_to_hf(path, tmp_path / "exports" / "hf")
    finally:
        os.umask(old)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in [tmp_path / "exports", out, *out.iterdir()]}
    assert modes == {"exports": oct(0o777 & ~umask), "hf": oct(0o777 & ~umask),
                     **{f: oct(0o666 & ~umask) for f in files}}


def test_export_refuses_a_damaged_checkpoint_naming_the_file(checkpoint, tmp_path):
    path, _ = checkpoint
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 100] = os.urandom(100)  # bit rot: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"checkpoint file {weights} is corrupt \\(its sha256 is "):
        export_to_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
