"""Generate text from a checkpoint.

One prompt, streamed to the terminal as it is produced:
    python launch/generate.py --checkpoint runs/demo --prompt "Once upon a time" --max-new-tokens 200 \\
        --temperature 0.8 --top-p 0.95 --seed 0
Many prompts, batched, one JSON line per prompt in the input order (stdout, or --output FILE):
    python launch/generate.py --checkpoint runs/demo --prompts-file prompts.jsonl --batch-size 32 --temperature 0
    -> {"prompt": ..., "completion": ..., "prompt_tokens": n, "completion_tokens": m}
A prompts file holds one prompt per line: a JSON string, or an object with a "prompt" string; blank lines are
skipped. --checkpoint takes a step_* directory or a run directory (its latest checkpoint); the tokenizer must be
the one the checkpoint was trained with (its fingerprint is checked). Completions stop at the end-of-text token.
"""


import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import torch

from dist_lm.cli import run_main
from dist_lm.config import config_from_dict
from dist_lm.errors import UserError
from dist_lm.model import TransformerLM
from dist_lm.model.generation import cast_for_inference, generate_batch
from dist_lm.tokenizer import load_tokenizer
from dist_lm.train.checkpoint import (
    INFERENCE_KEYS,
    find_checkpoint,
    load_model_state,
    load_model_weights,
    load_state,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PROMPT = "Once upon a time"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="step_* directory, or a run directory")
    parser.add_argument("--prompt", default=None, help=f"one prompt, streamed (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--prompts-file", type=Path, help="JSON lines of prompts; writes JSON lines of completions")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (--prompts-file)")
    parser.add_argument("--output", type=Path, help="write the JSON lines here instead of stdout")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the one in the checkpoint's config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights and KV cache")
    args = parser.parse_args()
    if args.prompts_file is not None and args.prompt is not None:
        raise UserError("pass either --prompt or --prompts-file, not both")
    if args.prompts_file is None and args.output is not None:
        raise UserError("--output is for --prompts-file's JSON lines; a single --prompt streams to the terminal")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be >= 1")
    return args


def load_model(args: argparse.Namespace):
    """(model on args.device in args.dtype, eval mode; its tokenizer), the fingerprint checked."""
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
    return cast_for_inference(model, DTYPES[args.dtype]), tokenizer


def read_prompts(path: Path) -> list[str]:
    """The prompts of a JSON-lines file (a string, or {"prompt": string} per line), in order."""
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path} does not exist (or is not a file); give a JSON-lines file "
                                'with one prompt per line, e.g. "Once upon a time"')
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not JSON ({exc.msg}); each line is a JSON string or "
                            '{"prompt": "..."}') from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"{path}:{number}: no prompt text (got {line.strip()[:60]}); each line is a non-empty "
                            'JSON string or {"prompt": "..."}')
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"--prompts-file {path} holds no prompts; write one JSON string per line")
    return prompts


def complete_file(model, tokenizer, args: argparse.Namespace, out: TextIO) -> None:
    """Decode --prompts-file in batches of --batch-size; one JSON line per prompt, in the input order."""
    prompts = read_prompts(args.prompts_file)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        ids = [tokenizer.encode(p) for p in batch]
        new = generate_batch(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, eos_id=tokenizer.eot_id, generator=generator,
                             num_valid_ids=tokenizer.vocab_size)
        for prompt, prompt_ids, completion in zip(batch, ids, new):
            out.write(json.dumps({"prompt": prompt, "completion": tokenizer.decode(completion),
                                  "prompt_tokens": len(prompt_ids), "completion_tokens": len(completion)},
                                 ensure_ascii=False) + "\n")
        out.flush()


class Streamer:
    """Writes the text of a growing list of ids as it grows. A piece is held back while the text ends inside a UTF-8
    character (a byte-level token can split one), so what is written adds up to tokenizer.decode(all ids)."""

    def __init__(self, tokenizer, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.shown = ""

    def add(self, new_ids: list[int]) -> None:
        self.ids += new_ids
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._show(text)

    def finish(self) -> None:
        self._show(self.tokenizer.decode(self.ids))
        self.out.write("\n")
        self.out.flush()

    def _show(self, text: str) -> None:
        self.out.write(text[len(self.shown):])  # decoding more ids only appends (bytes concatenate)
        self.out.flush()
        self.shown = text


def stream_one(model, tokenizer, args: argparse.Namespace) -> None:
    """Print the prompt, then its continuation as it is produced (one host read per token), then a newline."""
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    if not prompt:
        raise UserError(f"the prompt is empty; pass some text to continue, e.g. {DEFAULT_PROMPT!r}")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    streamer = Streamer(tokenizer, sys.stdout)
    streamer.out.write(prompt)
    generate_batch(model, [tokenizer.encode(prompt)], args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.eot_id, generator=generator,
                   num_valid_ids=tokenizer.vocab_size, sync_every=1, on_tokens=lambda rows: streamer.add(rows[0]))
    streamer.finish()


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args)
    if args.prompts_file is None:
        stream_one(model, tokenizer, args)
        return
    if args.output is None:
        complete_file(model, tokenizer, args, sys.stdout)
        return
    with open(args.output, "w", encoding="utf-8") as out:
        complete_file(model, tokenizer, args, out)


if __name__ == "__main__":
    run_main(main)
