"""Export a checkpoint to a Hugging Face transformers directory (Llama layout):
`python launch/export_hf.py --checkpoint runs/demo --out exports/demo`, then
`LlamaForCausalLM.from_pretrained("exports/demo")` and `AutoTokenizer.from_pretrained("exports/demo")`."""

import argparse

import torch

from dist_lm.cli import run_main
from dist_lm.export import export_to_hf
from dist_lm.train.checkpoint import find_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="step_* directory, or a run directory (its latest)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint config's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    args = parser.parse_args()
    path = find_checkpoint(args.checkpoint, "--checkpoint")  # a step_* or run directory
    out = export_to_hf(path, args.out, tokenizer_dir=args.tokenizer, dtype=getattr(torch, args.dtype),
                       overwrite=args.overwrite)
    print(f"exported {path} -> {out}")


if __name__ == "__main__":
    run_main(main)
