"""Text for a causal LM: documents split by document, tokenised and packed into fixed-length token blocks.

Documents, not blocks, are assigned to train / validation / test, so no text is shared across splits. Each split's
documents are joined with the tokenizer's end-of-text token and cut into blocks of block_size + 1 tokens that
overlap by one (every position has its next token as target). The transfer split is the train split's blocks:
what the teacher labels and the student learns from. The folder holds each split's documents (parquet) and blocks
(.npy, int32) and dataset.json, written last, with a digest over the tokenizer, the blocks and the documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from distill_core.data import SPLITS, PreparedDataset
from distill_core.errors import DatasetError
from distill_core.lm import load_tokenizer, tokenizer_digest
from distill_core.recipe import LMDataConfig

BLOCKS = "token_blocks"  # dataset.json "layout" of a prepared LM folder
PYDOC_TOPICS = "pydoc_topics"


def _pydoc_topics() -> list[str]:
    """The Python reference's help topics, as shipped in the standard library (79 documents, 465k characters)."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def source_fingerprint(source: str) -> str:
    if source == PYDOC_TOPICS:
        import sys

        return f"{PYDOC_TOPICS}@python{sys.version_info.major}.{sys.version_info.minor}"
    path = Path(source)
    if not path.is_file():
        raise DatasetError(f"data source '{source}' is neither a built-in corpus ({PYDOC_TOPICS}) nor a file")
    return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()


def load_documents(source: str) -> list[str]:
    """The corpus as documents: a built-in one, a .txt file (documents separated by blank lines), or a .csv /
    .parquet file with a `text` column (one document per row)."""
    if source == PYDOC_TOPICS:
        return _pydoc_topics()
    path = Path(source)
    if not path.is_file():
        raise DatasetError(f"data source '{source}' is neither a built-in corpus ({PYDOC_TOPICS}) nor a file")
    if path.suffix == ".txt":
        return [doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\n")]
    if path.suffix in (".csv", ".parquet"):
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        if "text" not in frame.columns:
            raise DatasetError(f"data file {path} lacks a 'text' column; it has {list(frame.columns)}")
        return frame["text"].fillna("").astype(str).str.strip().tolist()
    raise DatasetError(f"data file {path} must be .txt, .csv or .parquet")


def preparation_key(cfg: LMDataConfig) -> str:
    settings = cfg.model_dump(mode="json", exclude={"dvc", "source"})
    parts = {"layout": BLOCKS, "source": source_fingerprint(cfg.source), **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def split_documents(documents: list[str], cfg: LMDataConfig) -> dict[str, list[str]]:
    """Whole documents to train / validation / test (seeded); empty documents are refused by number."""
    empty = [i for i, doc in enumerate(documents) if not doc.strip()]
    if empty:
        raise DatasetError(f"data source '{cfg.source}' has {len(empty)} empty document(s) (first: {empty[:5]})")
    if cfg.max_documents is not None:
        documents = documents[: cfg.max_documents]
    n = len(documents)
    n_test, n_val = max(1, round(n * cfg.test_fraction)), max(1, round(n * cfg.validation_fraction))
    if n - n_test - n_val < 1:
        raise DatasetError(f"data source '{cfg.source}' has {n} documents: too few to split by document")
    order = np.random.default_rng(cfg.seed).permutation(n)
    parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {split: [documents[i] for i in sorted(index)] for split, index in parts.items()}


def pack(documents: list[str], tokenizer: Any, block_size: int) -> np.ndarray:
    """The documents' tokens, each document ended by the end-of-text token, as blocks [N, block_size + 1]."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    flat = np.asarray(ids, dtype=np.int32)
    if len(flat) < block_size + 1:
        return np.zeros((0, block_size + 1), dtype=np.int32)
    windows = np.lib.stride_tricks.sliding_window_view(flat, block_size + 1)[::block_size]
    return np.ascontiguousarray(windows)


def _cap(blocks: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` blocks, drawn evenly over the split (seeded), in their order."""
    if limit is None or len(blocks) <= limit:
        return blocks
    keep = np.sort(np.random.default_rng(seed).choice(len(blocks), size=limit, replace=False))
    return blocks[keep]


def blocks_digest(root: Path, meta: dict[str, Any]) -> str:
    """The digest of a prepared LM folder: tokenizer, block size, every split's blocks and documents."""
    h = hashlib.sha256(f"{meta['tokenizer']['digest']}:{meta['block_size']}\n".encode())
    for split in SPLITS:
        blocks = np.load(root / f"{split}.blocks.npy", allow_pickle=False)
        h.update(f"{split}:{blocks.shape}\n".encode())
        h.update(np.ascontiguousarray(blocks, dtype=np.int32).tobytes())
        for text in pd.read_parquet(root / f"{split}.parquet")["text"].tolist():
            h.update(f"{text}\x1e".encode())
    return h.hexdigest()[:32]


def prepare_lm_dataset(cfg: LMDataConfig, out_dir: str | Path) -> PreparedDataset:
    """Load, split by document, tokenise and pack; dataset.json goes last."""
    out = Path(out_dir)
    tokenizer = load_tokenizer(cfg.tokenizer)
    documents = split_documents(load_documents(cfg.source), cfg)
    documents["transfer"] = documents["train"]
    limits = {"train": cfg.train_blocks, "transfer": cfg.train_blocks}
    blocks = {
        split: _cap(pack(docs, tokenizer, cfg.block_size), limits.get(split, cfg.eval_blocks), cfg.seed)
        for split, docs in documents.items()
    }
    for split, array in blocks.items():
        if len(array) == 0:
            raise DatasetError(
                f"split '{split}' has no block of {cfg.block_size + 1} tokens: lower data.block_size or add text"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)
    writer = f"{os.getpid()}-{threading.get_ident()}"
    for split in SPLITS:
        frame = pd.DataFrame({"text": documents[split]})
        tmp = out / f".{split}.parquet.{writer}.tmp"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, out / f"{split}.parquet")
        tmp = out / f".{split}.blocks.{writer}.tmp.npy"
        np.save(tmp, blocks[split], allow_pickle=False)
        os.replace(tmp, out / f"{split}.blocks.npy")
    meta: dict[str, Any] = {
        "layout": BLOCKS,
        "source": cfg.source,
        "labels": [],
        "tokenizer": {"source": cfg.tokenizer, "digest": tokenizer_digest(tokenizer), "vocab": len(tokenizer)},
        "block_size": cfg.block_size,
        "counts": {split: len(blocks[split]) for split in SPLITS},
        "documents": {split: len(documents[split]) for split in SPLITS},
        "tokens": {split: int(blocks[split].shape[0] * cfg.block_size) for split in SPLITS},
    }
    meta["digest"] = blocks_digest(out, meta)
    tmp = out / f".dataset.json.{writer}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "dataset.json")
    return PreparedDataset(out, (), meta["digest"], meta["counts"], info=meta)


def blocks_of(dataset: PreparedDataset, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; splits are {SPLITS}")
    return np.load(dataset.root / f"{split}.blocks.npy", allow_pickle=False).astype(np.int64)
