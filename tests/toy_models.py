"""Plain torch modules that stand in for a team's own teacher (the bring-your-own path)."""

import os

import torch
from torch import nn

from distill_core.model_io import log_teacher
from distill_core.modules import WrappedTeacher
from distill_core.names import PROMOTION_REASON
from distill_core.registry import Ledger
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


class KillingTeacher(BagTeacher):
    """A teacher whose process dies (as in an out-of-memory kill or a lost node) on a batch that holds `text`, for as
    long as the file `switch` exists."""

    def __init__(self, text: str, switch: str):
        super().__init__()
        self.ids, self.switch = hashed_ngrams(text, 1, self.bag.num_embeddings), switch

    def forward(self, ids, offsets):
        bounds = [*offsets.tolist(), len(ids)]
        rows = [ids[bounds[r] : bounds[r + 1]].tolist() for r in range(len(offsets))]
        if os.path.exists(self.switch) and self.ids in rows:
            os._exit(137)
        return super().forward(ids, offsets)


def register_toy_teacher(
    env, small_dataset, seed: int = 0, epochs: int = 40, poison: str | None = None, shuffled: bool = False
) -> str:
    """A plain torch teacher (hashed words), trained for a moment on the real reviews (or, shuffled, on labels
    that say nothing), registered."""
    torch.manual_seed(seed)
    module = BagTeacher(poison=None)
    tokenizer = WordHashTokenizer()
    train = small_dataset.split("train")
    batch = tokenizer(train["text"].tolist())
    labels = torch.tensor(train["label"].to_numpy())
    if shuffled:
        labels = labels[torch.randperm(len(labels))]
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(module(**batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.poison = poison
    teacher = WrappedTeacher(module, tokenizer, labels=small_dataset.labels)
    # env["artifacts"] = None: wherever the tracking server puts artifacts (its proxied store)
    location = env["artifacts"] if "artifacts" in env else (env["tmp"] / "teacher-artifacts").as_uri()
    return log_teacher(teacher, env["teacher"], env["tracking_uri"], artifact_location=location)[1]


def one_student_recipe(teacher: str, student: str) -> dict:
    """A recipe that distills a toy teacher into one small bag student in seconds (for whole-stack tests)."""
    return {
        "name": "toy",
        "student_registered_name": student,
        "data": {"max_rows": 300},
        "teacher": {"registered_name": teacher},
        "students": [{"name": "bag", "family": "embedding_bag", "buckets": 2048, "dim": 8, "lr": 0.1}],
        "train": {"epochs": 3, "batch_size": 32, "eval_every": 100},
        "evaluation": {"latency_samples": 10, "throughput_batch": 8, "hard_label_baseline": False},
        "gates": {"min_retention": 0.5, "max_param_ratio": 10.0, "max_regression": 0.5},
    }


def champion_by_the_rule(student_versions, ledger: Ledger) -> str | None:
    """The champion the promotion rule gives, replayed in the order the runs were judged: compare-and-promote is
    serialised, and the ledger records each passing student's alias move in that order (registration order can
    differ when runs overlap). Each decision must also have been made against the champion the one before it
    left, which is what serialising means: a run that read a stale champion fails here, naming itself."""
    passing = {str(v.version): v for v in student_versions if v.tags["distill.gate"] == "passed"}
    if not passing:
        return None
    model = next(iter(passing.values())).name
    judged = list(dict.fromkeys(m["version"] for m in ledger.alias_history(model) if m["version"] in passing))
    assert sorted(judged) == sorted(passing), f"passing students {sorted(passing)} but alias moves for {judged}"
    champion, best = None, -1.0
    for version in judged:
        said = passing[version].tags[PROMOTION_REASON]
        compared = "there was no champion" if champion is None else f"champion v{champion} "
        assert compared in said, f"v{version} was judged after v{champion} became champion, yet: {said!r}"
        accuracy = float(passing[version].tags["distill.accuracy"])
        if accuracy > best:
            champion, best = version, accuracy
    return champion
