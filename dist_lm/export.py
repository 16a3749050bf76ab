"""Export a checkpoint to a Hugging Face transformers model directory (Llama layout) + tokenizer.json.

Design decisions:
- Our architecture is Llama's (pre-norm RMSNorm, RoPE in the rotate-half layout, SwiGLU, no biases,
  untied head) and our parameter names are Llama's inside each block, so the export is a rename of the
  outer prefixes with no weight permutation: `blocks.N.` -> `model.layers.N.`, `embed_tokens` /
  `norm` -> `model.embed_tokens` / `model.norm`; `lm_head` stays.
- Written with safetensors and a hand-made config.json, so exporting needs neither transformers nor
  a GPU; loading the result is `LlamaForCausalLM.from_pretrained(dir)` (tested against our logits).
- The tokenizer goes along as `tokenizer.json` (our byte-level BPE in Hugging Face's format) plus a
  tokenizer_config.json naming `<|endoftext|>` as bos/eos, so `AutoTokenizer.from_pretrained(dir)` works.
- The weights are read through checkpoint.load_model_state, which checks them against the sizes and SHA-256
  recorded in state.json: a damaged checkpoint is refused with one line naming the file, never exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dist_lm.config import config_from_dict
from dist_lm.errors import UserError
from dist_lm.tokenizer import load_tokenizer
from dist_lm.tokenizer.formats import hf_tokenizer_json
from dist_lm.train.checkpoint import INFERENCE_KEYS, load_model_state, load_state, save_tensors


def hf_name(name: str) -> str:
    """Our parameter name -> the transformers Llama name."""
    if name.startswith("blocks."):
        return "model.layers." + name[len("blocks."):]
    if name.startswith(("embed_tokens.", "norm.")):
        return "model." + name
    return name  # lm_head.weight


def llama_config(model_cfg, eos_id: int) -> dict:
    """config.json of the equivalent LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.ffn_dim(),
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_heads,
        "num_key_value_heads": model_cfg.num_heads,
        "head_dim": model_cfg.head_dim(),
        "max_position_embeddings": model_cfg.seq_len,
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": model_cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": model_cfg.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def export_to_hf(checkpoint: str | Path, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                 dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write `out_dir/` with model.safetensors, config.json, tokenizer.json, tokenizer_config.json."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) or another directory")
    state = load_state(checkpoint, INFERENCE_KEYS)
    cfg = config_from_dict(state["config"])
    tokenizer = load_tokenizer(tokenizer_dir or cfg.data.tokenizer_dir)
    if tokenizer.fingerprint() != state.get("tokenizer_fingerprint"):
        raise UserError(f"tokenizer {tokenizer_dir or cfg.data.tokenizer_dir} is not the one {checkpoint} was "
                        "trained with; pass the original tokenizer directory")
    weights = {hf_name(k): v.to(dtype).contiguous() for k, v in load_model_state(checkpoint, state).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(weights, out_dir / "model.safetensors")  # group-readable where the umask says so
    config = llama_config(cfg.model, tokenizer.eot_id)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}, indent=2))
    hf_json = hf_tokenizer_json(tokenizer.vocab, tokenizer.merges, tokenizer.special_ids)
    (out_dir / "tokenizer.json").write_text(json.dumps(hf_json, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": None, "model_max_length": cfg.model.seq_len, "clean_up_tokenization_spaces": False,
    }, indent=2))
    return out_dir
