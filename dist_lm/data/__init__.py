"""Data: text sources -> token shards -> deterministic batches."""

from dist_lm.data.loader import EvalBatches, TrainBatches
from dist_lm.data.shards import ShardedTokens, check_tokenizer, load_manifest, prepare_shards, verify_shards
from dist_lm.data.sources import bundled_path, iter_documents

__all__ = [
    "EvalBatches", "ShardedTokens", "TrainBatches", "bundled_path", "check_tokenizer", "iter_documents",
    "load_manifest", "prepare_shards", "verify_shards",
]
