"""The LM teacher team's stand-in: SmolLM2-135M-Instruct as packaged (v1), or fine-tuned on the train split's
blocks (later versions: a better teacher for this domain, its held-out perplexity lower)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from distill_core.data import PreparedDataset
from distill_core.lm import CausalLM, load_smollm2
from distill_core.lm_data import blocks_of
from distill_core.modules import TextModule
from distill_core.names import DATASET_DIGEST, tag
from distill_core.recipe import LMTeacherConfig


def finetune(
    model: CausalLM,
    blocks: np.ndarray,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> CausalLM:
    """Next-token cross-entropy on the blocks for `steps` updates (AdamW, linear decay), in place."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))
    model.train()
    for step in range(steps):
        rows = torch.randint(len(blocks), (batch_size,), generator=generator)
        chunk = torch.as_tensor(blocks[rows.numpy()], dtype=torch.long)
        logits = model(chunk[:, :-1]).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == steps - 1:
            log(f"teacher fine-tune step {step + 1}/{steps} loss {loss.item():.3f}")
    return model.eval()


@torch.inference_mode()
def perplexity(model: TextModule, blocks: np.ndarray, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        chunk = torch.as_tensor(blocks[start : start + batch_size], dtype=torch.long)
        logits = model(chunk[:, :-1]).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(total / max(count, 1))


def stand_in(
    cfg: LMTeacherConfig, dataset: PreparedDataset, log: Callable[[str], None] = print
) -> tuple[TextModule, dict[str, str], dict[str, float]]:
    """The packaged SmolLM2, fine-tuned for cfg.finetune_steps on the train split (0: as packaged), its weights
    rounded to float16 (what the registry stores: 270 MB a version instead of 540); with its validation and test
    perplexity."""
    torch.manual_seed(cfg.seed)
    teacher = load_smollm2()
    if cfg.finetune_steps:
        finetune(teacher, blocks_of(dataset, "train"), cfg.finetune_steps, cfg.lr, cfg.batch_size, cfg.seed, log)
    teacher.round_to_storage(torch.float16)
    metrics = {
        f"{split}_perplexity": perplexity(teacher, blocks_of(dataset, split)) for split in ("validation", "test")
    }
    log(f"teacher perplexity: validation {metrics['validation_perplexity']:.2f}, test {metrics['test_perplexity']:.2f}")
    tags = {DATASET_DIGEST: dataset.digest, tag("finetune_steps"): str(cfg.finetune_steps)}
    return teacher, tags, metrics
