"""Students to ONNX, fp32 and int8, in a folder that runs without torch (edge_runtime.py travels inside it).

Each student family exports as a graph of its own: a transformer classifier takes `input_ids` and
`attention_mask` (a pruned vocabulary's id map inside the graph), the n-gram bag takes padded bucket `ids` and their
`mask` (Gather and a masked mean: no EmbeddingBag operator), a causal LM takes `input_ids` and gives next-token
logits at the `positions` asked for (generation reads the whole sequence each step, no key-value cache, and asks
for the last position only). torch.onnx's dynamo
exporter writes it with dynamic batch and sequence axes, traced at batch 2 (a dimension of size 1 cannot be dynamic)
and on a copy of the student (exporting a transformers model changes the original's attention code). onnxruntime's
dynamic quantization makes the int8 variant: MatMul and Gather weights (embeddings included) stored as int8, a
scale per output channel, activations quantised per call (a tied output layer gets its own int8 copy of the
embedding: `_untied`).

`OnnxStudent` shows an export to the pipeline as a torch student looks (tokenize, call, eval), so each task's own
metrics and the one latency function measure both alike.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_core import edge_runtime
from distill_core.errors import DistillError
from distill_core.modules import TextClassifier, TextModule, content_digest, tokenizer_definition

ONNX_FORMATS = tuple(edge_runtime.FILES)  # onnx, onnx-int8
OPSET = 18
RUNTIME, EXAMPLE = "runtime.py", "example.py"


class ExportError(DistillError):
    """A student could not be exported to ONNX, or its export does not behave as the student does."""


class _EncoderGraph(nn.Module):
    def __init__(self, student: TextClassifier) -> None:
        super().__init__()
        self.student = student

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        id_map = getattr(self.student, "id_map", None)
        if id_map is not None and id_map.numel():  # a pruned vocabulary: tokenizer ids to the student's rows
            input_ids = id_map[input_ids]
        return self.student(input_ids=input_ids, attention_mask=attention_mask)


class _BagGraph(nn.Module):
    def __init__(self, student: Any) -> None:
        super().__init__()
        self.student = student

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        rows = F.embedding(ids, self.student.bag.weight) * mask.unsqueeze(-1)  # Gather, padding zeroed
        return self.student.head(rows.sum(1) / mask.sum(1, keepdim=True))  # EmbeddingBag's mean


class _LMGraph(nn.Module):
    def __init__(self, student: Any) -> None:
        super().__init__()
        self.student = student

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        # the output layer only where asked: generating, the last position (at this vocabulary the output layer is
        # most of the work, and every position of a cacheless step would pay it); measuring, every position
        return self.student.head(self.student.hidden(input_ids)[:, positions])


def _backend(tokenizer: Any) -> Any:
    """A transformers tokenizer's `tokenizers` definition, for the folder's tokenizer.json."""
    definition = tokenizer_definition(tokenizer)
    if definition is None:
        raise ExportError(f"{type(tokenizer).__name__} is not a fast tokenizer: the export needs its tokenizer.json")
    return definition


def graph_of(student: TextModule, examples: Sequence[str]) -> tuple[nn.Module, dict[str, Tensor], dict[str, Any]]:
    """The exportable graph of a student, its example inputs (batch 2 or more) and what the runtime needs to feed
    it (config.json)."""
    from distill_core.lm import CausalLM
    from distill_core.students import EmbeddingBagStudent

    student = copy.deepcopy(student).eval()
    texts = [*examples, *examples][:2] if len(examples) < 2 else list(examples[:4])
    if isinstance(student, EmbeddingBagStudent):
        ids = torch.tensor([[1, 2, 3], [4, 5, 0]], dtype=torch.long)
        mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
        inputs = {"inputs": "hashed_ngrams", "ngrams": student.ngrams, "buckets": student.buckets}
        return _BagGraph(student), {"ids": ids, "mask": mask}, {"task": "classification", **inputs}
    if isinstance(student, TextClassifier):
        batch = student.tokenizer(texts, padding=True, truncation=True, max_length=student.max_length,
                                  return_tensors="pt")  # fmt: skip
        config = {"task": "classification", "inputs": "wordpiece", "max_length": student.max_length,
                  "pad_id": int(student.tokenizer.pad_token_id), "tokenizer": _backend(student.tokenizer)}  # fmt: skip
        feed = {k: batch[k] for k in ("input_ids", "attention_mask")}
        return _EncoderGraph(student), feed, config
    if isinstance(student, CausalLM):
        eos = student.model.generation_config.eos_token_id
        eos_ids = sorted({*([eos] if isinstance(eos, int) else eos or []), student.tokenizer.eos_token_id} - {None})
        ids = torch.randint(0, student.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
        config = {"task": "causal_lm", "inputs": "tokens", "eos_token_ids": eos_ids,
                  "tokenizer": _backend(student.tokenizer)}  # fmt: skip
        return _LMGraph(student), {"input_ids": ids, "positions": torch.tensor([1, 4, 7])}, config
    raise ExportError(
        f"{type(student).__name__} has no ONNX graph here: the exported families are the transformer and n-gram bag "
        "classifiers and causal LMs (set deploy.export: false to skip the export)"
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's and quantizer's advice (torchvision missing, run pre-processing) is not the user's concern."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def export(student: TextModule, folder: Path, examples: Sequence[str]) -> Path:
    """Export the student into `folder`: model.onnx, model.int8.onnx, tokenizer.json (if it has one), runtime.py,
    example.py and config.json, written last. A complete folder of the same weights is reused as it is; a partial
    one is never left looking complete (everything is built beside it, then moved in)."""
    digest = content_digest(student)
    config_path = folder / edge_runtime.CONFIG
    if config_path.is_file() and json.loads(config_path.read_text()).get("content_digest") == digest:
        return folder
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph, inputs, config = graph_of(student, examples)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    axes = {name: {0: torch.export.Dim(name)} if x.ndim == 1 else {0: batch, 1: seq} for name, x in inputs.items()}
    fp32, int8 = partial / edge_runtime.FILES["onnx"], partial / edge_runtime.FILES["onnx-int8"]
    try:
        with _quiet():
            torch.onnx.export(graph, (), str(fp32), kwargs=inputs, input_names=list(inputs), output_names=["logits"],
                              dynamic_shapes=axes, dynamo=True, external_data=False, opset_version=OPSET,
                              verbose=False)  # fmt: skip
            # per channel: on the LM demo's student, perplexity +2.2% over fp32 against +5.3% per tensor, 7% slower
            untied = _untied(fp32, partial / "untied.onnx")
            quantize_dynamic(str(untied), str(int8), weight_type=QuantType.QInt8, per_channel=True)
            untied.unlink()  # only the int8 model needed it
    except Exception as err:  # the exporter's errors are many kinds; each names the operator or guard that failed
        shutil.rmtree(partial, ignore_errors=True)
        raise ExportError(f"{type(student).__name__} did not export to ONNX: {type(err).__name__}: {err}") from err
    tokenizer = config.pop("tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(str(partial / edge_runtime.TOKENIZER))
    here = Path(__file__).parent
    shutil.copyfile(here / "edge_runtime.py", partial / RUNTIME)
    shutil.copyfile(here / "edge_example.py", partial / EXAMPLE)
    config.update(
        labels=list(student.labels),
        files=dict(edge_runtime.FILES),
        format="onnx",
        examples=[str(e) for e in examples[:3]],
        content_digest=digest,
        export_seconds=round(time.perf_counter() - start, 2),
    )
    (partial / edge_runtime.CONFIG).write_text(json.dumps(config, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def _untied(fp32: Path, out: Path) -> Path:
    """The graph with each weight it reads through a Transpose stored transposed: a causal LM's output layer reads
    its tied embedding so, and the quantizer, which quantises only a MatMul whose weight is stored, would otherwise
    keep that MatMul in float and dequantise the whole int8 embedding matrix for it on every call. The int8 model
    then holds the embedding twice (as the Gather's and the output layer's int8 weights); the fp32 one, once."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32))
    stored = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type == "Transpose" and node.input[0] in stored:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            weight = numpy_helper.to_array(stored[node.input[0]])
            transposed = np.ascontiguousarray(weight.transpose(perm))
            model.graph.initializer.append(numpy_helper.from_array(transposed, node.output[0]))
            model.graph.node.remove(node)
    onnx.save(model, str(out))
    return out


def with_format(folder: Path, out: Path, fmt: str) -> Path:
    """A copy of an exported folder holding one format, which its config names as the one to load."""
    config = json.loads((folder / edge_runtime.CONFIG).read_text())
    if fmt not in config["files"]:
        raise ExportError(f"{folder} holds formats {sorted(config['files'])}, not {fmt}")
    out.mkdir(parents=True, exist_ok=True)
    keep = {config["files"][fmt], edge_runtime.TOKENIZER, RUNTIME, EXAMPLE}
    for path in folder.iterdir():
        if path.name in keep:
            shutil.copyfile(path, out / path.name)
    config.update(format=fmt, files={fmt: config["files"][fmt]})
    (out / edge_runtime.CONFIG).write_text(json.dumps(config, indent=2))
    return out


class OnnxStudent:
    """An exported student in one format, seen as the pipeline sees a torch student: `tokenize`, a call on those
    inputs (torch tensors or numpy arrays) giving torch logits, `labels`, `eval`; `size_bytes` is its file's. A
    causal LM's `generate` and `decode_times` run the runtime's greedy loop."""

    def __init__(self, folder: Path, fmt: str, threads: int | None = None, params: int = 0) -> None:
        self.runtime = edge_runtime.load(folder, fmt, threads)
        self.labels = tuple(self.runtime.config["labels"])
        self.params = params  # the torch student's (the ONNX file's weights are the same ones, maybe quantised)

    def eval(self) -> OnnxStudent:
        return self

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, np.ndarray]:
        return self.runtime.tokenize(list(texts))

    def __call__(self, input_ids: Any = None, **inputs: Any) -> Tensor:
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        if isinstance(self.runtime, edge_runtime.Generator):  # next-token logits at every position
            inputs.setdefault("positions", np.arange(inputs["input_ids"].shape[1]))
        feed = {k: v.numpy() if isinstance(v, Tensor) else v for k, v in inputs.items()}
        feed = {k: v.astype(np.float32 if k == "mask" else np.int64, copy=False) for k, v in feed.items()}
        return torch.from_numpy(self.runtime(**feed))

    def size_bytes(self) -> int:
        return self.runtime.size_bytes()

    def generate(self, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
        assert isinstance(self.runtime, edge_runtime.Generator)
        return [self.runtime.generate(p, max_new_tokens) for p in prompts]

    def decode_times(self, prompt: Tensor, new_tokens: int) -> list[float]:
        """Milliseconds of each greedy step after the prompt (batch 1), as the runtime generates."""
        assert isinstance(self.runtime, edge_runtime.Generator)
        ids, times = prompt.numpy().astype(np.int64), []
        for step in range(new_tokens + 1):
            start = time.perf_counter()
            token = self.runtime.next_token(ids)
            ids = np.concatenate([ids, [[token]]], axis=1)
            if step:
                times.append((time.perf_counter() - start) * 1000)
        return times
