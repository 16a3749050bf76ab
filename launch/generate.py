"""Generate text from a checkpoint: `python launch/generate.py --checkpoint runs/demo
--prompt "Once upon a time" --max-new-tokens 200 --temperature 0.8 --top-p 0.95 --seed 0`.
--checkpoint takes a step_* directory or a run directory (its latest checkpoint)."""


import argparse

import torch

from dist_lm.cli import run_main
from dist_lm.config import config_from_dict
from dist_lm.errors import UserError
from dist_lm.model import TransformerLM, sample_text
from dist_lm.tokenizer import load_tokenizer
from dist_lm.train.checkpoint import (
    INFERENCE_KEYS,
    find_checkpoint,
    load_model_state,
    load_model_weights,
    load_state,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="step_* directory, or a run directory")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the one in the checkpoint's config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    path = find_checkpoint(args.checkpoint, "--checkpoint")  # a step_* or run directory
    state = load_state(path, INFERENCE_KEYS)
    cfg = config_from_dict(state["config"])
    tokenizer = load_tokenizer(args.tokenizer or cfg.data.tokenizer_dir)
    if tokenizer.fingerprint() != state.get("tokenizer_fingerprint"):
        raise UserError(f"tokenizer {args.tokenizer or cfg.data.tokenizer_dir} is not the one {path} was trained "
                        "with; pass --tokenizer with the original tokenizer directory")
    model = TransformerLM(cfg.model)
    load_model_weights(model, load_model_state(path, state), path)  # checked against state.json's sha256
    model.to(args.device).eval()
    text = sample_text(model, tokenizer, args.prompt, args.max_new_tokens, seed=args.seed,
                       temperature=args.temperature, top_p=args.top_p)
    print(text)


if __name__ == "__main__":
    run_main(main)
