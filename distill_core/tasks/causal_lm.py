"""Causal language modelling: token blocks in, the next token out; a causal LM distilled into a smaller one that
shares its tokenizer.

The task's batches (blocks with the causal shift: inputs are tokens 0..T-1, targets 1..T, every position counts),
its stored signal (per position the teacher's top-k ids and log-probabilities plus the left-out mass, or tokens
drawn from its distribution with their shares, and always its top-1 id and the log-probability of the true next
token, so the teacher's own perplexity and agreement come from the store), its metrics (held-out perplexity, gap
closed against the hard-label twin, next-token agreement and KL to the teacher, greedy tokens/s and per-token
latency at batch 1; early stopping on validation perplexity), its Great Expectations suites, its gates and how a
student serves (a pyfunc: a `prompt` column in, generated text out).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from torch import Tensor

from distill_core import checks, gates, lm, lm_data, width
from distill_core.data import SPLITS, PreparedDataset
from distill_core.errors import RecipeError, SoftLabelError, TeacherError
from distill_core.evaluate import AsDict, Speed, machine_load, size_of, tag_value
from distill_core.gates import Verdict
from distill_core.lm import CausalLM
from distill_core.modules import LoadedTeacher, TextModule, device_of, read_module
from distill_core.recipe import (
    EvalConfig,
    LMChecksConfig,
    LMDataConfig,
    LMGateConfig,
    LMSignalConfig,
    LMTeacherConfig,
    StudentConfig,
)
from distill_core.signals import HeadSignal, SignalSource, SparseSignal
from distill_core.tasks.base import Task, TaskBatch
from distill_core.tasks.classification import STUDENT_ARTIFACT, served_module

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from distill_core.soft_labels import SoftLabels

PROMPT_COLUMN, TEXT_COLUMN = "prompt", "text"
DEFAULT_NEW_TOKENS = 32
EVAL_BATCH = 8  # blocks per forward when measuring
ONLINE_CHUNK_ELEMENTS = 1 << 24  # teacher in the loop: logits made per chunk of positions (64 MiB in float32)


@dataclass
class LMReport(AsDict):
    """Everything measured about one causal LM on the test blocks; latencies are per generated token."""

    name: str
    perplexity: float
    nll: float  # mean nats per next token
    agreement: float  # share of positions whose top-1 next token is the teacher's
    kl_to_teacher: float  # KL(teacher || model) over the stored outcomes (top-k and the rest, or the draws)
    p50_ms: float
    p95_ms: float
    throughput: float  # greedy tokens per second at batch 1
    params: int
    bytes: int
    threads: int = 1
    load_average: float = 0.0
    under_load: bool = False
    compression: float = 1.0
    speedup: float = 1.0
    perplexity_ratio: float = 1.0  # perplexity / the teacher's
    gap_closed: float = 0.0  # (ppl_twin - ppl) / (ppl_twin - ppl_teacher): 1 is the teacher, 0 the twin


# --- the stored signal ---------------------------------------------------------------------------------------


def _check_vocab(teacher: CausalLM, dataset: PreparedDataset) -> None:
    tokenizer = dataset.info.get("tokenizer", {})
    digest = lm.tokenizer_digest(teacher.tokenizer)
    if tokenizer.get("digest") != digest:
        raise SoftLabelError(
            f"the teacher's tokenizer (digest {digest}, {teacher.vocab_size} tokens) is not the one the data was "
            f"tokenised with ({tokenizer.get('source')!r}, digest {tokenizer.get('digest')}, "
            f"{tokenizer.get('vocab')} tokens): set data.tokenizer to the teacher's tokenizer"
        )


@torch.inference_mode()
def sparse_signal(
    teacher: CausalLM, blocks: np.ndarray, cfg: LMSignalConfig, first_row: int = 0
) -> dict[str, np.ndarray]:
    """The stored signal of `blocks`, the split's rows from `first_row` on (the sampled draws are seeded by it),
    batch by batch: only `[batch, T, vocab]` is ever held, never more."""
    device = device_of(teacher)
    chunk = torch.as_tensor(blocks, dtype=torch.long).to(device)
    inputs, targets = chunk[:, :-1], chunk[:, 1:]
    n, t, k = len(chunk), inputs.shape[1], cfg.k
    ids = np.zeros((n, t, k), dtype=np.int32)
    logprobs = np.zeros((n, t, k), dtype=np.float16)
    extra = np.zeros((n, t, k), dtype=np.float16) if cfg.kind == "sampled" else np.zeros((n, t), dtype=np.float32)
    top1, target = np.zeros((n, t), dtype=np.int32), np.zeros((n, t), dtype=np.float32)
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + first_row)
    for start in range(0, n, cfg.batch_size):
        part = slice(start, start + cfg.batch_size)
        logits = teacher(inputs[part]).float()
        lse = torch.logsumexp(logits, dim=-1)  # log-probabilities are logits - lse: never materialised whole
        bad = ~torch.isfinite(lse).all(dim=-1)  # a NaN or infinite logit makes its position's lse so
        if bad.any():
            where = [first_row + start + int(i) for i in torch.nonzero(bad).flatten()[:5]]
            raise SoftLabelError(
                f"the teacher returned NaN or infinite logits for {int(bad.sum())} block(s) (first rows {where}); "
                "nothing was stored"
            )
        target[part] = (logits.gather(-1, targets[part].unsqueeze(-1)).squeeze(-1) - lse).cpu().numpy()
        scaled = lse if cfg.temperature == 1.0 else torch.logsumexp(logits / cfg.temperature, dim=-1)
        if cfg.kind == "top_k":
            top = logits.topk(k, dim=-1)  # the same ids at any temperature > 0
            values = top.values / cfg.temperature - scaled.unsqueeze(-1)
            top1[part] = top.indices[..., 0].cpu().numpy()
            ids[part], logprobs[part] = top.indices.cpu().numpy(), values.cpu().numpy()
            extra[part] = (-torch.expm1(torch.logsumexp(values, dim=-1))).clamp_min(0).cpu().numpy()
        else:
            top1[part] = logits.argmax(-1).cpu().numpy()
            flat = (logits / cfg.temperature - scaled.unsqueeze(-1)).reshape(-1, logits.shape[-1])
            drawn = torch.multinomial(flat.exp(), cfg.draws, replacement=True, generator=generator)
            counts = torch.zeros_like(flat).scatter_add_(1, drawn, torch.ones_like(drawn, dtype=flat.dtype))
            kept = counts.topk(k, dim=-1)  # the k most drawn (all of them when at most k distinct)
            weights = kept.values / kept.values.sum(-1, keepdim=True)
            shape = (-1, t, k)
            ids[part] = kept.indices.reshape(shape).cpu().numpy()
            logprobs[part] = flat.gather(-1, kept.indices).reshape(shape).cpu().numpy()
            extra[part] = weights.reshape(shape).cpu().numpy()
    named = "weights" if cfg.kind == "sampled" else "tail"
    return {"ids": ids, "logprobs": logprobs, named: extra, "top1": top1, "target_logprob": target}


class StoredSparseSource:
    """Rows of a stored sparse signal, as the loss reads them."""

    def __init__(self, signal: dict[str, np.ndarray], cfg: LMSignalConfig) -> None:
        self.arrays, self.cfg = signal, cfg

    def signal(self, index: Sequence[int], inputs: Sequence[Any], batch: TaskBatch) -> SparseSignal:
        rows = list(index)
        device = batch.targets.device  # where the student's batch is
        part = {name: torch.as_tensor(array[rows]).to(device) for name, array in self.arrays.items()}
        weights = part["weights"].float() if "weights" in part else None
        return SparseSignal(
            part["ids"].long(),
            part["logprobs"].float(),
            "tail" if self.cfg.reading == "rest" else "zero",
            weights=weights,
            tail=part.get("tail"),
            temperature=self.cfg.temperature,
        )


# --- measuring -----------------------------------------------------------------------------------------------


@torch.inference_mode()
def next_token_stats(
    model: TextModule, blocks: np.ndarray, signal: dict[str, np.ndarray] | None = None
) -> dict[str, float]:
    """Mean NLL of the true next tokens; with the teacher's stored signal, top-1 agreement and KL to it."""
    model.eval()
    nll, agree, kl, count, device = 0.0, 0.0, 0.0, 0, device_of(model)
    for start in range(0, len(blocks), EVAL_BATCH):
        chunk = torch.as_tensor(blocks[start : start + EVAL_BATCH], dtype=torch.long).to(device)
        log_q = F.log_softmax(model(chunk[:, :-1]).float(), dim=-1)
        nll -= float(log_q.gather(-1, chunk[:, 1:].unsqueeze(-1)).sum())
        count += chunk[:, 1:].numel()
        if signal is not None:
            log_q = log_q.cpu()  # beside the stored signal
            rows = slice(start, start + len(chunk))
            agree += float((log_q.argmax(-1).numpy() == signal["top1"][rows]).sum())
            kl += float(_kl_to_stored(log_q, {name: array[rows] for name, array in signal.items()}).sum())
    stats = {"nll": nll / max(count, 1)}
    if signal is not None:
        stats.update(agreement=agree / max(count, 1), kl_to_teacher=kl / max(count, 1))
    return stats


def _kl_to_stored(log_q: Tensor, signal: dict[str, np.ndarray]) -> Tensor:
    """KL(teacher || model) per position over what the store keeps: the top-k outcomes plus the rest bucket, or
    the sampled estimate (unbiased, so a single position may come out below 0)."""
    ids = torch.as_tensor(signal["ids"]).long()
    log_p = torch.as_tensor(signal["logprobs"]).float()
    q = log_q.gather(-1, ids)
    if "weights" in signal:
        return (torch.as_tensor(signal["weights"]).float() * (log_p - q)).sum(-1)
    p = log_p.exp()
    rest_p = torch.as_tensor(signal["tail"]).float().clamp_min(1e-8)
    rest_q = (-torch.expm1(torch.logsumexp(q, dim=-1))).clamp_min(1e-8)
    return (p * (log_p - q)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())


def _decode_times(model: CausalLM, prompt: Tensor, new_tokens: int) -> list[float]:
    """Milliseconds of each greedy decoding step after the prompt, with the key-value cache (batch 1); an exported
    student times its own loop (no cache)."""
    if not isinstance(model, CausalLM):  # export.OnnxStudent
        return list(model.decode_times(prompt, new_tokens))
    past, ids, times = None, prompt, []
    for step in range(new_tokens + 1):
        start = time.perf_counter()
        out = model.model(input_ids=ids if past is None else ids[:, -1:], cache=past, use_cache=True)
        past = out.cache
        ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
        if step:  # the first step reads the prompt: that is prefill, not per-token latency
            times.append((time.perf_counter() - start) * 1000)
    return times


@torch.inference_mode()
def generation_speed(
    models: dict[str, TextModule], blocks: np.ndarray, samples: int, new_tokens: int = 16, prompt_tokens: int = 16
) -> dict[str, Speed]:
    """Greedy generation at batch 1 on CPU, every model side by side on the same prompts (the first tokens of test
    blocks), in rotating order after a warm-up: per-token p50 / p95 latency and tokens per second."""
    prompts = [torch.as_tensor(blocks[i % len(blocks), :prompt_tokens][None], dtype=torch.long) for i in range(samples)]
    names = list(models)
    for model in models.values():
        model.eval()
        _decode_times(model, prompts[0], 2)  # type: ignore[arg-type]
    before = machine_load()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, prompt in enumerate(prompts):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name] += _decode_times(models[name], prompt, new_tokens)  # type: ignore[arg-type]
    competing, cores = max(before, machine_load()), os.cpu_count() or 1
    speeds = {}
    for name, values in times.items():
        values.sort()
        speeds[name] = Speed(
            statistics.median(values),
            values[int(0.95 * (len(values) - 1))],
            1000.0 / statistics.fmean(values),
            threads=torch.get_num_threads(),
            load_average=os.getloadavg()[0],
            under_load=competing > cores,
        )
    return speeds


# --- serving -------------------------------------------------------------------------------------------------


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if PROMPT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"the LM student expects a DataFrame with a '{PROMPT_COLUMN}' column; got {list(model_input.columns)}"
            )
        model_input = model_input[PROMPT_COLUMN]
    values = [model_input] if isinstance(model_input, str) else list(model_input)
    bad = [i for i, value in enumerate(values) if not isinstance(value, str)]
    if bad:
        raise MlflowException.invalid_parameter_value(
            f"the LM student continues strings; {len(bad)} of {len(values)} prompts are not (first: row {bad[0]})"
        )
    return values


class CausalLMModel(PythonModel):
    """A pyfunc around a pickled LM student: prompts in, their greedy continuations out."""

    def load_context(self, context: Any) -> None:
        self.module: CausalLM = read_module(context.artifacts[STUDENT_ARTIFACT]).eval()  # type: ignore[assignment]
        self.served = served_module(context, self.module)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per prompt: `text`, the continuation (max_new_tokens, default 32, greedy)."""
        new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_NEW_TOKENS))
        if not 1 <= new_tokens <= 4096:
            raise MlflowException.invalid_parameter_value(f"max_new_tokens must be in 1..4096, got {new_tokens}")
        prompts = _prompts(model_input)
        served = getattr(self, "served", self.module)  # what load_context chose (a model set by hand: its module)
        texts = [served.generate([prompt], new_tokens)[0] for prompt in prompts]  # batch 1: no padding effects
        return pd.DataFrame({TEXT_COLUMN: texts})


# --- the task ------------------------------------------------------------------------------------------------


class CausalLMTask(Task):
    name = "causal_lm"
    early_stopping = "val_perplexity"
    maximize = False
    headline = ("perplexity", "perplexity_ratio", "gap_closed", "agreement", "kl_to_teacher", "params", "speedup")
    gate_tags: ClassVar[tuple[str, ...]] = (
        "perplexity",
        "teacher_perplexity",
        "perplexity_ratio",
        "gap_closed",
        "agreement",
        "params",
        "p50_ms",
        "p95_ms",
        "speedup",
    )
    quality_name = "perplexity"
    against_teacher = "perplexity_ratio"
    columns: ClassVar[tuple[str, ...]] = (
        "name",
        "perplexity",
        "perplexity_ratio",
        "gap_closed",
        "agreement",
        "kl_to_teacher",
        "params",
        "compression",
        "p50_ms",
        "p95_ms",
        "throughput",
        "speedup",
    )

    # --- data ---
    def preparation_key(self, cfg: LMDataConfig) -> str:
        return lm_data.preparation_key(cfg)

    def prepare(self, cfg: LMDataConfig, out_dir: Path) -> PreparedDataset:
        return lm_data.prepare_lm_dataset(cfg, out_dir)

    def examples(self, dataset: PreparedDataset, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        blocks = lm_data.blocks_of(dataset, split)
        return list(blocks), blocks

    # --- students ---
    def check_fits(self, cfg: StudentConfig, teacher: TextModule) -> None:
        if not isinstance(teacher, CausalLM):
            raise TeacherError(
                f"a causal_lm recipe needs a causal LM teacher (distill_core.lm.CausalLM), got {type(teacher).__name__}"
            )
        depth, hidden = lm.teacher_depth(teacher), int(teacher.config.hidden_size)
        beyond = [layer for layer in cfg.teacher_layers if layer >= depth]
        if beyond:
            raise RecipeError(f"student '{cfg.name}': teacher_layers {beyond} beyond the teacher's {depth} layers")
        if cfg.embedding_dim is not None and cfg.embedding_dim > hidden:
            raise RecipeError(
                f"student '{cfg.name}': embedding_dim {cfg.embedding_dim} exceeds the teacher's hidden size {hidden}"
            )
        have_heads, have_ffn, group = width.llama_width(lm.decoder_layers(teacher)[cfg.teacher_layers[0]])
        width.check_width(cfg.name, cfg.heads, cfg.ffn, have_heads, have_ffn, group)

    def teacher_depth(self, teacher: TextModule) -> int:
        assert isinstance(teacher, CausalLM)
        return lm.teacher_depth(teacher)

    def build_student(
        self,
        cfg: StudentConfig,
        teacher: TextModule,
        dataset: PreparedDataset,
        texts: Sequence[Any],
        soft_labels: Any,
        log: Callable[[str], None],
    ) -> TextModule:
        self.check_fits(cfg, teacher)
        assert isinstance(teacher, CausalLM)
        calibration = torch.as_tensor(np.stack(list(texts[: width.CALIBRATION_ROWS]))[:, :-1]) if texts else None
        student = lm.build_student(teacher, cfg.teacher_layers, cfg.embedding_dim, cfg.heads, cfg.ffn, calibration)
        if student.vocab_size != teacher.vocab_size:
            raise RecipeError(
                f"student vocabulary {student.vocab_size} differs from the teacher's {teacher.vocab_size}"
            )
        params = sum(p.numel() for p in student.parameters())
        log(
            f"student {cfg.name}: teacher layers {cfg.teacher_layers}, embeddings {cfg.embedding_dim or 'full'}, "
            f"heads {cfg.heads or 'all'}, FFN channels {cfg.ffn or 'all'}, {params:,} parameters"
        )
        return student

    # --- batches and the teacher's signal ---
    def batch(self, model: TextModule, inputs: Sequence[Any], targets: Tensor) -> TaskBatch:
        blocks = targets.long()
        return TaskBatch({"input_ids": blocks[:, :-1]}, blocks[:, 1:])  # every position counts: no mask to apply

    def teacher_inputs(self, teacher: TextModule, inputs: Sequence[Any], batch: TaskBatch) -> dict[str, Tensor]:
        return batch.inputs  # the student's own tokens: teacher and student share the tokenizer

    def online_signal(self, teacher: TextModule, inputs: dict[str, Tensor]) -> HeadSignal:
        """The full-vocabulary teacher as hidden states and head: the loss makes its logits in chunks of
        positions that hold about ONLINE_CHUNK_ELEMENTS each, never `[B, T, vocab]` at once."""
        assert isinstance(teacher, CausalLM)
        chunk = max(1, ONLINE_CHUNK_ELEMENTS // teacher.vocab_size)
        return HeadSignal(teacher.hidden(**inputs), teacher.head, chunk)

    def predict(self, model: TextModule, inputs: Sequence[Any]) -> np.ndarray:
        blocks = np.stack(list(inputs))
        with torch.inference_mode():
            return np.concatenate(
                [
                    model(torch.as_tensor(blocks[i : i + EVAL_BATCH, :-1])).argmax(-1).numpy()
                    for i in range(0, len(blocks), EVAL_BATCH)
                ]
            )

    def check_teacher(self, teacher: LoadedTeacher, dataset: PreparedDataset) -> None:
        if not isinstance(teacher.module, CausalLM):
            raise TeacherError(
                f"teacher {teacher.identity} is a {type(teacher.module).__name__}, not a causal LM: register a "
                "causal LM with distill_core.lm.CausalLM (see the README, bring your own LM teacher)"
            )
        _check_vocab(teacher.module, dataset)

    def signal_key(self, cfg: LMSignalConfig) -> dict[str, Any]:
        parts: dict[str, Any] = {"kind": cfg.kind, "k": cfg.k, "temperature": cfg.temperature}
        if cfg.kind == "sampled":
            parts.update(draws=cfg.draws, seed=cfg.seed)
        return parts

    def label_shard(
        self, teacher: LoadedTeacher, inputs: Sequence[Any], start: int, cfg: LMSignalConfig
    ) -> dict[str, np.ndarray]:
        module = teacher.module.eval()
        assert isinstance(module, CausalLM)
        return sparse_signal(module, np.stack(list(inputs)), cfg, start)

    def stored_source(self, signal: Any, cfg: LMSignalConfig) -> SignalSource:
        return StoredSparseSource(signal, cfg)

    def signal_change(self, old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> np.ndarray:
        """Per block, the mean over its positions of the total variation between the two stored distributions, over
        the ids either one stored (an id one of them left out counts as 0 there), a few blocks at a time."""
        moved = np.zeros(len(old["ids"]), dtype=np.float64)
        for start in range(0, len(moved), 64):
            rows = slice(start, start + 64)
            old_ids, new_ids = old["ids"][rows], new["ids"][rows]
            p_old, p_new = (np.exp(s["logprobs"][rows].astype(np.float64)) for s in (old, new))
            same = old_ids[..., :, None] == new_ids[..., None, :]  # [blocks, T, k old, k new]
            new_at_old = (same * p_new[..., None, :]).sum(-1)
            only_new = p_new * ~same.any(-2)
            moved[rows] = (0.5 * (np.abs(p_old - new_at_old).sum(-1) + only_new.sum(-1))).mean(-1)
        return moved

    # --- metrics ---
    def validate(self, model: TextModule, inputs: Sequence[Any], targets: np.ndarray) -> float:
        return math.exp(next_token_stats(model, targets)["nll"])

    def agreement(self, model: TextModule, inputs: Sequence[Any], signal: dict[str, np.ndarray]) -> float:
        return next_token_stats(model, np.stack(list(inputs)), signal)["agreement"]

    @torch.inference_mode()
    def parity(self, model: TextModule, exported: Any, inputs: Sequence[Any]) -> tuple[float, float]:
        blocks, same, count, diff = np.stack(list(inputs)), 0, 0, 0.0
        for start in range(0, len(blocks), EVAL_BATCH):
            chunk = torch.as_tensor(blocks[start : start + EVAL_BATCH, :-1], dtype=torch.long)
            mine, theirs = model(chunk).float(), exported(chunk).float()
            same += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
            count += mine.shape[0] * mine.shape[1]
            diff = max(diff, float((mine - theirs).abs().max()))
        return same / max(count, 1), diff

    def signal_score(self, signal: dict[str, np.ndarray], targets: np.ndarray) -> float:
        return math.exp(-float(np.mean(signal["target_logprob"])))

    def quality_problem(self, score: float, teacher_score: float, gate_cfg: LMGateConfig) -> str | None:
        ratio = score / max(teacher_score, 1e-9)
        if gate_cfg.max_perplexity_ratio is not None and ratio > gate_cfg.max_perplexity_ratio:
            return (
                f"validation perplexity ratio {ratio:.3g} > {gate_cfg.max_perplexity_ratio:.3g} "
                f"(perplexity {score:.2f}, teacher {teacher_score:.2f})"
            )
        return None

    def chance(self, targets: np.ndarray) -> float:
        return float(np.unique(targets).size)  # a model that learned nothing: about uniform over the tokens seen

    def did_not_learn(self, train_value: float, chance: float) -> str | None:
        if train_value < 0.5 * chance:
            return None
        return (
            f"did not learn: train-split perplexity {train_value:.1f} is near chance ({chance:.0f}, uniform over the "
            "tokens in the train split); raise students[].lr or train.epochs"
        )

    def measure_speed(self, models: dict[str, TextModule], inputs: Sequence[Any], cfg: EvalConfig) -> dict[str, Speed]:
        return generation_speed(models, np.stack(list(inputs)), max(5, cfg.latency_samples // 10))

    def evaluate(
        self,
        name: str,
        model: TextModule,
        inputs: Sequence[Any],
        targets: np.ndarray,
        teacher_signal: Any,
        speed: Speed,
        outputs: Any = None,
    ) -> LMReport:
        if outputs is not None:  # the teacher itself: its stored signal holds what it says about the test blocks
            stats = {"nll": -float(np.mean(outputs["target_logprob"])), "agreement": 1.0, "kl_to_teacher": 0.0}
        else:
            stats = next_token_stats(model, targets, teacher_signal)
        size = size_of(model)
        return LMReport(
            name=name,
            perplexity=math.exp(stats["nll"]),
            nll=stats["nll"],
            agreement=stats["agreement"],
            kl_to_teacher=stats["kl_to_teacher"],
            params=size["params"],
            bytes=size["bytes"],
            **speed.report_fields(),
            gap_closed=1.0 if outputs is not None else 0.0,
        )

    def relative_to(self, report: Any, teacher: Any, twin: Any = None) -> LMReport:
        report = replace(
            report,
            compression=teacher.params / max(report.params, 1),
            speedup=teacher.p50_ms / max(report.p50_ms, 1e-9),
            perplexity_ratio=report.perplexity / max(teacher.perplexity, 1e-9),
        )
        if twin is not None and twin is not report:
            gap = twin.perplexity - teacher.perplexity
            report.gap_closed = (twin.perplexity - report.perplexity) / gap if abs(gap) > 1e-9 else 0.0
        return report

    def quality(self, report: Any) -> float:
        return -report.perplexity  # higher is better: the lower perplexity

    def figures(
        self,
        name: str,
        model: TextModule,
        inputs: Sequence[Any],
        targets: np.ndarray,
        teacher_signal: Any,
        teacher_name: str = "teacher",
    ) -> dict[str, Figure]:
        return {}

    # --- data checks (Great Expectations) ---
    def check_data(self, dataset: PreparedDataset, docs_dir: Path, cfg: LMChecksConfig) -> checks.CheckResult:
        import great_expectations.expectations as gxe

        tables: dict[str, tuple[pd.DataFrame, list[Any]]] = {}
        for split in SPLITS:
            frame = dataset.split(split)
            frame = frame.assign(text_length=frame["text"].astype(str).str.strip().str.len())
            expectations: list[Any] = [
                gxe.ExpectColumnValuesToNotBeNull(column="text"),
                gxe.ExpectColumnValuesToBeBetween(column="text_length", min_value=1),
                gxe.ExpectColumnValuesToBeUnique(column="text", mostly=1.0 - cfg.max_duplicate_share),
                gxe.ExpectTableRowCountToBeBetween(min_value=1),
            ]
            tables[f"{split}_documents"] = (frame, expectations)
        counts = pd.DataFrame({"split": list(SPLITS), "blocks": [dataset.counts[s] for s in SPLITS]})
        tables["blocks"] = (counts, [gxe.ExpectColumnValuesToBeBetween(column="blocks", min_value=cfg.min_blocks)])
        return checks.run_suite("dataset", tables, docs_dir, run_name=f"dataset-{dataset.digest[:12]}")

    def check_signal(
        self, labels: SoftLabels, dataset: PreparedDataset, docs_dir: Path, cfg: LMChecksConfig
    ) -> checks.CheckResult:
        """Per position: ids inside the vocabulary, stored mass at most 1 + max_mass_error, finite values; a
        signal per block of the split."""
        import great_expectations.expectations as gxe

        vocab = int(dataset.info["tokenizer"]["vocab"])
        tables: dict[str, tuple[pd.DataFrame, list[Any]]] = {}
        for split in ("transfer", "validation", "test"):
            signal = labels.signal[split]
            assert isinstance(signal, dict)
            mass = np.exp(signal["logprobs"].astype(np.float64)).sum(-1)
            if "tail" in signal:
                mass = mass + signal["tail"]
            frame = pd.DataFrame(
                {
                    "min_id": signal["ids"].min(-1).reshape(-1),
                    "max_id": signal["ids"].max(-1).reshape(-1),
                    "mass": mass.reshape(-1)
                    if "tail" in signal
                    else np.exp(signal["logprobs"].astype(np.float64)).max(-1).reshape(-1),
                    "finite": np.isfinite(signal["logprobs"].astype(np.float32)).all(-1).reshape(-1)
                    & np.isfinite(signal["target_logprob"]).reshape(-1),
                }
            )
            expectations = [
                gxe.ExpectColumnValuesToBeBetween(column="min_id", min_value=0),
                gxe.ExpectColumnValuesToBeBetween(column="max_id", max_value=vocab - 1),
                gxe.ExpectColumnValuesToBeBetween(column="mass", min_value=0, max_value=1 + cfg.max_mass_error),
                gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
                gxe.ExpectTableRowCountToEqual(value=int(dataset.counts[split]) * int(dataset.info["block_size"])),
            ]
            tables[split] = (frame, expectations)
        return checks.run_suite("soft_labels", tables, docs_dir, run_name=f"soft_labels-{labels.key[:12]}")

    def check_evaluation(self, reports: list[Any], docs_dir: Path) -> checks.CheckResult:
        import great_expectations.expectations as gxe

        columns = list(LMReport.__dataclass_fields__)
        frame = pd.DataFrame([r.as_dict() for r in reports], columns=None if reports else columns)
        expectations: list[Any] = [
            gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=False),
            gxe.ExpectColumnValuesToBeUnique(column="name"),
            *(gxe.ExpectColumnValuesToNotBeNull(column=column) for column in columns),
            gxe.ExpectColumnValuesToBeBetween(column="perplexity", min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="agreement", min_value=0, max_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="params", min_value=0, strict_min=True),
            gxe.ExpectColumnValuesToBeBetween(column="p50_ms", min_value=0, strict_min=True),
        ]
        return checks.run_suite("evaluation", {"models": (frame, expectations)}, docs_dir)

    # --- gates and the registry ---
    def judge(self, candidate: str, report: Any, teacher: Any, gate_cfg: LMGateConfig, champion: Any) -> Verdict:
        reasons: list[str] = []
        ratio = report.perplexity / max(teacher.perplexity, 1e-9)
        bounds = [
            ("perplexity ratio to the teacher", ratio, gate_cfg.max_perplexity_ratio, False),
            ("agreement with the teacher", report.agreement, gate_cfg.min_agreement, True),
            ("gap closed", report.gap_closed, gate_cfg.min_gap_closed, True),
        ]
        for what, value, bound, at_least in bounds:
            if bound is not None and (value < bound if at_least else value > bound):
                reasons.append(f"{what} {value:.4g} {'<' if at_least else '>'} {bound:.4g}")
        size = gates.size_and_latency(
            report.params, report.bytes, report.p95_ms, teacher.params, gate_cfg, "p95 ms per token"
        )
        reasons += gates.exceeded(size)
        if champion is not None and report.perplexity > champion.perplexity * (1 + gate_cfg.max_regression):
            reasons.append(
                f"perplexity {report.perplexity:.3f} regresses from the champion's {champion.perplexity:.3f} by more "
                f"than {gate_cfg.max_regression:.1%}"
            )
        return Verdict(candidate, report, reasons)

    def beats(self, candidate: Any, champion: Any) -> bool:
        return champion is None or candidate.perplexity < champion.perplexity

    def report_tags(self, report: Any) -> dict[str, str]:
        teacher = report.perplexity / max(report.perplexity_ratio, 1e-9)
        values = {"teacher_perplexity": teacher, **{k: v for k, v in report.as_dict().items() if k in self.gate_tags}}
        return {field: tag_value(values[field]) for field in self.gate_tags}

    def summary(self, report: Any) -> str:
        return (
            f"perplexity {report.perplexity:.2f} ({report.perplexity_ratio:.2f}x the teacher's, "
            f"{report.gap_closed:.0%} of the gap to its hard-label twin closed), {report.params:,} parameters "
            f"({report.compression:.1f}x smaller), {report.speedup:.1f}x faster greedy generation at batch 1"
        )

    def notes(self, candidate: str, report: Any) -> list[str]:
        if report.perplexity_ratio < 1.0:
            return [f"{candidate} has a lower perplexity than its teacher ({report.perplexity_ratio:.2f}x)"]
        return []

    # --- the stand-in teacher ---
    def stand_in_teacher(
        self, cfg: LMTeacherConfig, dataset: PreparedDataset, log: Callable[[str], None]
    ) -> tuple[TextModule, dict[str, str], dict[str, float]]:
        from distill_core.lm_teacher import stand_in

        return stand_in(cfg, dataset, log)

    def stand_in_versions(self, version: int) -> tuple[str, dict[str, Any]]:
        if version == 1:
            return "teacher v1: SmolLM2-135M-Instruct as packaged", {"finetune_steps": 0}
        return f"teacher v{version}: SmolLM2 fine-tuned on the train split's blocks", {}

    # --- serving ---
    def python_model(self) -> PythonModel:
        return CausalLMModel()

    def signature(self, model: TextModule) -> ModelSignature:
        return ModelSignature(
            inputs=Schema([ColSpec("string", PROMPT_COLUMN)]),
            outputs=Schema([ColSpec("string", TEXT_COLUMN)]),
            params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_NEW_TOKENS)]),
        )

    def input_example(self, model: TextModule, inputs: Sequence[Any]) -> pd.DataFrame:
        """The first tokens of test blocks, decoded: prompts of the model's own domain."""
        assert isinstance(model, CausalLM)
        prompts = [model.tokenizer.decode(list(block[:12]), skip_special_tokens=True) for block in list(inputs)[:2]]
        return pd.DataFrame({PROMPT_COLUMN: [p for p in prompts if p.strip()] or ["def fibonacci(n):"]})


CAUSAL_LM = CausalLMTask()
