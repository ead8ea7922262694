"""Plain torch modules that stand in for a team's own teacher (the bring-your-own path)."""

import torch
from torch import nn

from distill_core.students import hashed_ngrams


class WordHashTokenizer:
    """A picklable callable tokenizer: texts → hashed word ids and offsets."""

    def __init__(self, buckets: int = 512):
        self.buckets = buckets

    def __call__(self, texts):
        rows = [hashed_ngrams(t, 1, self.buckets) for t in texts]
        offsets = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0)
        return {"ids": torch.tensor([i for r in rows for i in r]), "offsets": offsets}


class BagTeacher(nn.Module):
    """Any module that maps a batch to logits."""

    def __init__(self, classes: int = 2, buckets: int = 512, poison: str | None = None, extra_classes: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(buckets, 8)
        self.out = nn.Linear(8, classes + extra_classes)
        self.poison = poison  # a word whose texts get NaN logits: a broken teacher

    def forward(self, ids, offsets):
        logits = self.out(self.bag(ids, offsets))
        if self.poison is not None:
            rows = torch.zeros(len(offsets), dtype=torch.bool)
            poisoned = hashed_ngrams(self.poison, 1, self.bag.num_embeddings)[0]
            bounds = [*offsets.tolist(), len(ids)]
            for r in range(len(offsets)):
                rows[r] = bool((ids[bounds[r] : bounds[r + 1]] == poisoned).any())
            logits = torch.where(rows[:, None], torch.full_like(logits, float("nan")), logits)
        return logits
