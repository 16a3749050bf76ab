"""The Transformer LM, its attention dispatch and sampling.

>>> import torch
>>> from dist_lm.config import ModelConfig
>>> model = TransformerLM(ModelConfig(vocab_size=64, seq_len=16, d_model=32, num_layers=1, num_heads=2))
>>> model(torch.zeros(1, 4, dtype=torch.long)).shape
torch.Size([1, 4, 64])
"""


from dist_lm.model.attention import attention, reference_attention
from dist_lm.model.generation import KVCache, filter_logits, generate, sample_next, sample_text
from dist_lm.model.transformer import RMSNorm, TransformerBlock, TransformerLM, apply_rope, rope_tables

__all__ = [
    "KVCache",
    "RMSNorm",
    "TransformerBlock",
    "TransformerLM",
    "apply_rope",
    "attention",
    "filter_logits",
    "generate",
    "reference_attention",
    "rope_tables",
    "sample_next",
    "sample_text",
]
