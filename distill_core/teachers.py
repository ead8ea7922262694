"""The teacher's side: the stand-in teacher trainer (MiniLM fine-tuned on the train split, for the teams that have
no teacher yet and for the demo), and what a team imports to register its own teacher.

`WrappedTeacher` and `log_teacher` are imported from here by users (README, "Bring your own teacher"), and teachers
pickled by earlier releases name `distill_core.teachers.TextClassifier` / `WrappedTeacher`: their homes are
distill_core.modules and distill_core.model_io.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from distill_core.data import PreparedDataset
from distill_core.model_io import load_teacher, log_teacher
from distill_core.modules import (
    TextClassifier,
    WrappedTeacher,
    length_batches,
    load_minilm,
    mean_pool,
)
from distill_core.recipe import TeacherConfig

__all__ = [
    "TextClassifier",
    "WrappedTeacher",
    "load_teacher",
    "log_teacher",
    "train_teacher",
]


def _shuffled_batches(n: int, size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + size] for i in range(0, n, size)]


@torch.inference_mode()
def _pooled(model: TextClassifier, texts: list[str], batch_size: int = 128) -> Tensor:
    out = torch.zeros(len(texts), model.encoder.config.hidden_size)
    for batch in length_batches(texts, batch_size):
        enc = model.tokenize([texts[i] for i in batch])
        out[batch] = mean_pool(model.encoder(**enc).last_hidden_state, enc["attention_mask"])
    return out


def _freeze_below(model: TextClassifier, trainable_layers: int | None) -> None:
    """Freeze the embeddings and all but the top `trainable_layers` encoder layers (None: train everything)."""
    if trainable_layers is None:
        return
    layers = model.encoder.encoder.layer
    model.encoder.embeddings.requires_grad_(False)
    for index, layer in enumerate(layers):
        layer.requires_grad_(index >= len(layers) - trainable_layers)


def train_teacher(dataset: PreparedDataset, cfg: TeacherConfig, log: Callable[[str], None] = print) -> TextClassifier:
    """Fine-tune MiniLM (all, the top layers, or only a head on frozen features): the teacher team's stand-in."""
    encoder, tokenizer = load_minilm()
    # Seeded after loading: whether loading draws from torch's generator depends on what is installed (with
    # accelerate, transformers builds the model on the meta device and draws nothing), the head's start must not.
    torch.manual_seed(cfg.seed)
    model = TextClassifier(encoder, tokenizer, dataset.labels, cfg.max_length)
    train = dataset.split("train")
    texts, labels = train["text"].tolist(), torch.tensor(train["label"].to_numpy())
    head_only = cfg.trainable_layers == 0
    features = _pooled(model, texts) if head_only else None  # frozen encoder: encode once, fit the head
    _freeze_below(model, cfg.trainable_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(cfg.seed)
    total = max(1, int(math.ceil(len(texts) / cfg.batch_size) * cfg.epochs))
    warmup = 0.06 * total + 1
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (total - s) / total)
    )
    step, started = 0, time.perf_counter()
    model.train()
    while step < total:
        for batch in _shuffled_batches(len(texts), cfg.batch_size, generator):
            if features is not None:
                logits = model.head(features[batch])
            else:
                logits = model(**model.tokenize([texts[i] for i in batch]))
            loss = nn.functional.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0 or step == total:
                log(f"teacher step {step}/{total} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
            if step >= total:
                break
    model.requires_grad_(True)
    return model.eval()
