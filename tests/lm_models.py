"""A tiny causal LM built from the packaged teacher's config and tokenizer: the real vocabulary and architecture,
small enough to train in seconds (where SmolLM2's own weights would be too slow for the suite)."""

from __future__ import annotations

import numpy as np
import torch

from distill_core.lm import SMOLLM2, CausalLM, load_tokenizer
from distill_core.lm_teacher import finetune

PADDING = 64  # extra vocabulary rows beyond the tokenizer, as padded checkpoints have them


def tiny_lm(layers: int = 4, hidden: int = 64, seed: int = 0, padded: bool = True) -> CausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(SMOLLM2)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + (PADDING if padded else 0),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=100_000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CausalLM(LlamaForCausalLM(config).eval(), tokenizer)


def trained_tiny_lm(blocks: np.ndarray, steps: int = 60, seed: int = 0, **kwargs) -> CausalLM:
    """A tiny LM that has learned something of the blocks' text: a teacher worth distilling."""
    return finetune(tiny_lm(seed=seed, **kwargs), blocks, steps, lr=3e-3, batch_size=8, seed=seed, log=lambda _: None)
