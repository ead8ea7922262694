"""Student families: a small transformer initialised from teacher layers, and a hashed n-gram embedding bag."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from distill_core import width
from distill_core.edge_runtime import hashed_ngrams  # one home: the exported bag's runtime tokenizes the same way
from distill_core.errors import RecipeError
from distill_core.modules import Batch, TextClassifier, TextModule, load_minilm, minilm_path
from distill_core.recipe import StudentConfig


class TransformerStudent(TextClassifier):
    """DistilBERT-style: fewer layers copied from the teacher, an optionally pruned and factorised vocabulary."""

    def __init__(
        self,
        encoder: Any,
        tokenizer: object,
        labels: tuple[str, ...],
        id_map: Tensor | None,
        max_length: int,
    ):
        super().__init__(encoder, tokenizer, labels, max_length)
        self.id_map: Tensor
        self.register_buffer("id_map", id_map if id_map is not None else torch.empty(0, dtype=torch.long))

    def tokenize(self, texts: list[str], max_length: int | None = None) -> Batch:
        batch = super().tokenize(texts, max_length)
        if self.id_map.numel():
            batch["input_ids"] = self.id_map[batch["input_ids"]]
        return batch


def _kept_wordpieces(tokenizer: object, texts: Iterable[str], max_length: int) -> Tensor:
    """Teacher vocabulary ids that occur in the texts, plus every special token."""
    ids: set[int] = set(tokenizer.all_special_ids)  # type: ignore[attr-defined]
    texts = list(texts)
    for start in range(0, len(texts), 2048):
        enc = tokenizer(texts[start : start + 2048], truncation=True, max_length=max_length)  # type: ignore[operator]
        for row in enc["input_ids"]:
            ids.update(row)
    return torch.tensor(sorted(ids), dtype=torch.long)


def _copies_teacher(teacher: TextModule) -> bool:
    """Whether a transformer student copies this teacher's own encoder (else the packaged MiniLM's)."""
    return isinstance(teacher, TextClassifier) and hasattr(teacher.encoder, "encoder")


def source_depth(teacher: TextModule) -> int:
    """The layers a transformer student can copy: the teacher's own encoder's, else the packaged MiniLM's."""
    if _copies_teacher(teacher):
        return int(teacher.encoder.config.num_hidden_layers)  # type: ignore[union-attr,arg-type]
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(minilm_path()).num_hidden_layers)


def check_fits(cfg: StudentConfig, teacher: TextModule, source_config: Any = None) -> None:
    """Refuse a transformer student the encoder it is built from cannot give: layers it does not have, embeddings
    wider than its hidden size. Cheap (a config), so runs check it before they claim a teacher version."""
    if cfg.family != "transformer":
        return
    if source_config is None:
        if _copies_teacher(teacher):
            source_config = teacher.encoder.config  # type: ignore[union-attr]
        else:
            from transformers import AutoConfig

            source_config = AutoConfig.from_pretrained(minilm_path())
    what = "teacher" if _copies_teacher(teacher) else "packaged MiniLM (the teacher has no BERT encoder to copy)"
    n_layers, hidden = source_config.num_hidden_layers, source_config.hidden_size
    if _copies_teacher(teacher) and max(cfg.teacher_layers) < n_layers:
        layer = teacher.encoder.encoder.layer[cfg.teacher_layers[0]]  # type: ignore[union-attr,index]
        width.check_width(cfg.name, cfg.heads, cfg.ffn, *width.bert_width(layer))
    elif cfg.heads is not None or cfg.ffn is not None:
        heads, channels = source_config.num_attention_heads, source_config.intermediate_size
        width.check_width(cfg.name, cfg.heads, cfg.ffn, heads, channels)
    if max(cfg.teacher_layers) >= n_layers:
        raise RecipeError(
            f"student '{cfg.name}': teacher_layers {cfg.teacher_layers} out of range; the {what} "
            f"encoder has layers 0..{n_layers - 1}"
        )
    if cfg.embedding_dim is not None and cfg.embedding_dim > hidden:
        raise RecipeError(
            f"student '{cfg.name}': embedding_dim {cfg.embedding_dim} is larger than the {what} encoder's hidden "
            f"size {hidden}; factorised embeddings must be narrower (or drop embedding_dim for full-width ones)"
        )


@torch.no_grad()
def _word_rows(teacher: TextModule, source: Any) -> tuple[Tensor, Tensor | None]:
    """The word embeddings a student is cut from, one full-width row each, and the map from tokenizer ids to those
    rows when the source is itself a pruned student (an assistant, an earlier generation; None: row = id). A
    factorised source gives the product of its two factors."""
    embedding = source.embeddings.word_embeddings
    first: Any = embedding[0] if isinstance(embedding, nn.Sequential) else embedding  # the (first) factor: a row an id
    rows = embedding(torch.arange(first.num_embeddings)).detach()
    id_map = getattr(teacher, "id_map", None)
    return rows, id_map if id_map is not None and id_map.numel() else None


def build_transformer_student(
    cfg: StudentConfig,
    teacher: TextModule,
    labels: tuple[str, ...],
    texts: list[str],
    max_length: int,
    log: Callable[[str], None] = print,
) -> TransformerStudent:
    """Copy the teacher's embeddings and chosen layers into a smaller encoder of the same kind."""
    from transformers import BertModel

    if _copies_teacher(teacher):
        assert isinstance(teacher, TextClassifier)
        source, tokenizer = teacher.encoder, teacher.tokenizer
    else:
        log(f"teacher {type(teacher).__name__} has no BERT encoder to copy: initialising from packaged MiniLM")
        source, tokenizer = load_minilm()
    check_fits(cfg, teacher, source.config)
    hidden = source.config.hidden_size
    rows, source_map = _word_rows(teacher, source)
    vocab = len(source_map) if source_map is not None else len(rows)  # the tokenizer's ids
    keep = _kept_wordpieces(tokenizer, texts, max_length) if cfg.prune_vocab else None
    chosen = keep if keep is not None else torch.arange(vocab)
    words = rows[source_map[chosen] if source_map is not None else chosen]

    config = copy.deepcopy(source.config)
    config.num_hidden_layers = len(cfg.teacher_layers)
    config.vocab_size = words.shape[0]
    encoder = BertModel(config, add_pooling_layer=False)
    encoder.embeddings.load_state_dict(
        {k: v for k, v in source.embeddings.state_dict().items() if not k.startswith("word_embeddings")},
        strict=False,
    )
    for student_index, teacher_index in enumerate(cfg.teacher_layers):  # a narrower source keeps its widths
        width.load_layer(encoder.encoder.layer[student_index], source.encoder.layer[teacher_index])
    if cfg.heads is not None or cfg.ffn is not None:
        starts = range(0, min(len(texts), width.CALIBRATION_ROWS), 32)
        encoded = [tokenizer(texts[i : i + 32], truncation=True, max_length=max_length, padding=True,
                             return_tensors="pt") for i in starts]  # fmt: skip
        batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in encoded]
        if source_map is not None:  # a pruned source reads its own rows
            batches = [{**b, "input_ids": source_map[b["input_ids"]]} for b in batches]
        width.prune_bert_layers(source, list(encoder.encoder.layer), cfg.teacher_layers, batches, cfg.heads, cfg.ffn)
    if cfg.embedding_dim is not None and cfg.embedding_dim < hidden:
        # Factorised embeddings V×e then e×H, initialised from the teacher's by truncated SVD.
        u, s, vh = torch.linalg.svd(words, full_matrices=False)
        e = min(cfg.embedding_dim, words.shape[0])  # a rank cannot exceed the number of kept wordpieces
        small = nn.Embedding(words.shape[0], e, padding_idx=None)
        small.weight.data.copy_(u[:, :e] * s[:e])
        project = nn.Linear(e, hidden, bias=False)
        project.weight.data.copy_(vh[:e].T)
        encoder.embeddings.word_embeddings = nn.Sequential(small, project)  # type: ignore[assignment]
    else:
        encoder.embeddings.word_embeddings.weight.data.copy_(words)
    id_map = None
    if keep is not None:
        unk = int((keep == tokenizer.unk_token_id).nonzero()[0, 0])
        id_map = torch.full((vocab,), unk, dtype=torch.long)
        id_map[keep] = torch.arange(len(keep))
    student = TransformerStudent(encoder, tokenizer, labels, id_map, max_length)
    if isinstance(teacher, TextClassifier):
        student.head.load_state_dict(teacher.head.state_dict())
    return student


class EmbeddingBagStudent(TextModule):
    """fastText-style: the mean of hashed word n-gram embeddings, then a linear layer."""

    def __init__(self, labels: tuple[str, ...], buckets: int, dim: int, ngrams: int):
        super().__init__()
        self.labels = tuple(labels)
        self.buckets, self.ngrams = buckets, ngrams
        self.bag = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.head = nn.Linear(dim, len(labels))
        nn.init.normal_(self.bag.weight, std=0.1)

    def tokenize(self, texts: list[str], max_length: int | None = None) -> Batch:
        rows = [hashed_ngrams(t, self.ngrams, self.buckets) for t in texts]
        offsets = torch.tensor([0] + [len(r) for r in rows[:-1]], dtype=torch.long).cumsum(0)
        return {"ids": torch.tensor([i for r in rows for i in r], dtype=torch.long), "offsets": offsets}

    def forward(self, ids: Tensor, offsets: Tensor) -> Tensor:
        return self.head(self.bag(ids, offsets))


def build_student(
    cfg: StudentConfig,
    teacher: TextModule,
    labels: tuple[str, ...],
    texts: list[str],
    max_length: int,
    log: Callable[[str], None] = print,
) -> TextModule:
    """A fresh student of the configured family and size."""
    if cfg.family == "transformer":
        return build_transformer_student(cfg, teacher, labels, texts, max_length, log)
    return EmbeddingBagStudent(labels, cfg.buckets, cfg.dim, cfg.ngrams)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
