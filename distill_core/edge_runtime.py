"""An exported student, run with onnxruntime, numpy and tokenizers alone: no torch, no distill_core.

This file travels inside every exported folder as `runtime.py`, beside the model files and `config.json` (what
the model reads and says); the pipeline runs exported students through this same file (parity, the latency
gates, serving), so what ships is what was measured. `example.py` in the folder shows it in use.

    model = load("folder")                        # the format the gates passed (config.json's "format")
    model.predict(["a fine film"])                # a classifier: [(label, probability), ...]
    model.generate("def fibonacci(n):", 16)       # a causal LM: the greedy continuation
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

CONFIG = "config.json"  # written last: a folder without it is not a complete export
TOKENIZER = "tokenizer.json"
FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}  # the exported formats, by name
_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def hashed_ngrams(text: str, ngrams: int, buckets: int) -> list[int]:
    """Stable bucket ids of a text's word n-grams (crc32, not Python's salted hash): the n-gram bag's tokens."""
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i : i + n]) for n in range(1, ngrams + 1) for i in range(len(words) - n + 1)]
    return [zlib.crc32(g.encode()) % buckets for g in grams] or [0]


def session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session; `threads` intra-op threads (None: onnxruntime's default, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    # no busy-waiting between calls: spinning threads would take the cores from whatever is measured beside it
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Exported:
    """One exported model: its config, its onnxruntime session and its tokenizer."""

    def __init__(self, folder: str | Path, fmt: str | None = None, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.config: dict[str, Any] = json.loads((self.folder / CONFIG).read_text())
        self.format = fmt or self.config["format"]
        files = self.config["files"]
        if self.format not in files:
            raise ValueError(f"{self.folder} holds formats {sorted(files)}, not {self.format!r}")
        self.path = self.folder / files[self.format]
        self.session = session(self.path, threads)
        self.tokenizer: Any = None
        if (self.folder / TOKENIZER).is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER))

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        """The graph's first output (logits) for named numpy inputs."""
        return self.session.run(None, inputs)[0]

    def size_bytes(self) -> int:
        return self.path.stat().st_size


class Classifier(Exported):
    """Texts in, logits over `labels` out."""

    @property
    def labels(self) -> list[str]:
        return list(self.config["labels"])

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The graph's inputs for a batch of texts, padded to its longest."""
        if self.config["inputs"] == "hashed_ngrams":  # the n-gram bag: bucket ids and a mask of the real ones
            rows = [hashed_ngrams(t, self.config["ngrams"], self.config["buckets"]) for t in texts]
            ids = np.zeros((len(rows), max(map(len, rows))), np.int64)
            mask = np.zeros(ids.shape, np.float32)
            for i, row in enumerate(rows):
                ids[i, : len(row)], mask[i, : len(row)] = row, 1.0
            return {"ids": ids, "mask": mask}
        self.tokenizer.enable_truncation(self.config["max_length"])
        self.tokenizer.enable_padding(pad_id=self.config["pad_id"])
        encoded = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encoded], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
        }

    def logits(self, texts: list[str]) -> np.ndarray:
        return self(**self.tokenize(texts))

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """Each text's label and its probability."""
        logits = self.logits(texts).astype(np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        return [(self.labels[i], float(p[i])) for i, p in zip(probs.argmax(1), probs, strict=True)]


class Generator(Exported):
    """Token ids and the positions to predict after in, next-token logits there out; greedy generation without a
    key-value cache (each step reads the whole sequence again, and asks for the last position's logits only)."""

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """One prompt's token ids (generation is batch 1)."""
        return {"input_ids": np.array([self.tokenizer.encode(texts[0]).ids], np.int64)}

    def next_token(self, ids: np.ndarray) -> int:
        """The greedy next token after `ids` ([1, T])."""
        return int(self(input_ids=ids, positions=np.array([ids.shape[1] - 1], np.int64))[0, -1].argmax())

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """The greedy continuation of the prompt (the new text only), stopping at the end-of-text token."""
        ids = self.tokenize([prompt])["input_ids"]
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = self.next_token(ids)
            if token in self.config["eos_token_ids"]:
                break
            new.append(token)
            ids = np.concatenate([ids, [[token]]], axis=1)
        return str(self.tokenizer.decode(new, skip_special_tokens=True))


def load(folder: str | Path, fmt: str | None = None, threads: int | None = None) -> Classifier | Generator:
    """The exported model in `folder`, in format `fmt` (default: the one its config names)."""
    config = json.loads((Path(folder) / CONFIG).read_text())
    kind = Generator if config["task"] == "causal_lm" else Classifier
    return kind(folder, fmt, threads)
