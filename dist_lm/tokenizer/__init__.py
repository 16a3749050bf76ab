"""Byte-level BPE tokenizer, from scratch: training, encoding, GPT-2 and Hugging Face formats.

Layers: `pretokenize` (GPT-2 regex, special tokens, safe stream cuts) -> `train` (parallel counts,
incremental merges) -> `bpe` (the Tokenizer) with `formats` (vocab.json/merges.txt, tokenizer.json).
"""

from dist_lm.tokenizer.bpe import Tokenizer, load_tokenizer
from dist_lm.tokenizer.train import train_bpe

__all__ = ["Tokenizer", "load_tokenizer", "train_bpe"]
