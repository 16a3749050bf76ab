"""Train a byte-level BPE tokenizer on a text file and save it as a tokenizer directory.

    python launch/train_tokenizer.py --input dist_lm/data/samples/tinystories_sample.txt \
        --vocab-size 10000 --out tokenizers/tinystories-10k

Writes vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and a README.md card.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dist_lm.tokenizer.bpe import Tokenizer
from dist_lm.tokenizer.train import train_bpe_with_stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="UTF-8 text file (documents separated by special tokens)")
    p.add_argument("--vocab-size", type=int, required=True, help="256 bytes + specials + merges")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"], help="default: <|endoftext|>")
    p.add_argument("--num-workers", type=int, default=None, help="counting processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def card(name: str, input_path: str, requested: int, stats, tok: Tokenizer) -> str:
    short = "" if stats.vocab_size >= requested else (
        f"\nAsked for {requested:,}; training stopped at {stats.vocab_size:,} because every pre-token of the "
        f"corpus had become a single token (no pair left to merge): the corpus is too small for more.\n"
    )
    specials = f"specials {tok.special_tokens} at ids {sorted(tok.special_ids.values())}"
    timing = (f"{stats.pretokenize_s + stats.merge_s:.2f} s ({stats.num_workers} worker(s); "
              f"pre-tokenize {stats.pretokenize_s:.2f} s, merges {stats.merge_s:.2f} s)")
    return f"""# {name}

Byte-level BPE (GPT-2 pre-tokenization), trained by `dist_lm.tokenizer` with
`python launch/train_tokenizer.py --input {input_path} --vocab-size {requested} --out <dir>`.

| | |
|---|---|
| corpus | `{input_path}` ({stats.corpus_bytes:,} bytes) |
| vocab size | {tok.vocab_size:,} (256 bytes, {specials}, {stats.num_merges:,} merges) |
| training time | {timing} |
| bytes/token on the corpus | {stats.bytes_per_token:.3f} |
| fingerprint | `{tok.fingerprint()}` |
{short}
Files: `vocab.json` + `merges.txt` (GPT-2 format), `tokenizer.json` (Hugging Face `tokenizers`),
`tokenizer_config.json`. Load with `dist_lm.tokenizer.load_tokenizer(dir)`,
`tokenizers.Tokenizer.from_file(dir + "/tokenizer.json")` or
`transformers.PreTrainedTokenizerFast(tokenizer_file=dir + "/tokenizer.json")`.
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    vocab, merges, stats = train_bpe_with_stats(
        args.input, args.vocab_size, args.special_tokens, num_workers=args.num_workers, progress=not args.no_progress
    )
    tok = Tokenizer(vocab, merges, args.special_tokens)
    out = Path(args.out)
    tok.save(out)
    (out / "README.md").write_text(card(out.name, os.fspath(args.input), args.vocab_size, stats, tok), encoding="utf-8")
    print(stats.summary(), file=sys.stderr)
    print(f"saved {tok} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
