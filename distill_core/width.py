"""Width pruning from the teacher's own weights (Minitron, Muralidharan et al. 2024): every attention head and FFN
channel of the layers a student copies is ranked by its activation on a calibration sample, in the teacher's own
forward pass, and the student keeps the strongest ones. Both student families of a transformer use it: a BERT
encoder's layers (the classifier) and a Llama-style decoder's (the causal LM, whose heads go by key-value group)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from distill_core.errors import RecipeError

CALIBRATION_ROWS = 256  # the first transfer rows: their activations rank the heads and channels


class ActivationEnergy:
    """The mean square of each input channel of some Linear layers over the positions that count, while forward
    passes run (`mask` says, per batch, which positions count; None: all)."""

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        self.layers = layers
        self.sums: dict[str, Tensor] = {}
        self.count = 0.0
        self.mask: Tensor | None = None

    @contextmanager
    def recording(self) -> Iterator[ActivationEnergy]:
        handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in self.layers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach().float()
            weight = torch.ones(x.shape[:-1]) if self.mask is None else self.mask.float()
            self.sums[name] = self.sums.get(name, 0) + (x.square() * weight[..., None]).flatten(0, -2).sum(0)

        return hook

    def counted(self, mask: Tensor | None, positions: int) -> None:
        """Set the mask of the next forward pass and count its positions."""
        self.mask = mask
        self.count += float(mask.sum()) if mask is not None else float(positions)

    def energy(self, name: str) -> Tensor:
        return self.sums[name] / max(self.count, 1.0)


def strongest(scores: Tensor, keep: int) -> Tensor:
    """The indices of the `keep` largest scores, in their original order (ties: the earlier one)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def head_channels(heads: Tensor, head_dim: int) -> Tensor:
    """The channels of these heads in a [heads x head_dim] projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def keep_outputs(layer: nn.Linear, rows: Tensor) -> nn.Linear:
    """A Linear with only these output channels (rows of its weight, and of its bias)."""
    out = nn.Linear(layer.in_features, len(rows), bias=layer.bias is not None)
    out.weight.data.copy_(layer.weight.data[rows])
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.data[rows])
    return out


def keep_inputs(layer: nn.Linear, columns: Tensor) -> nn.Linear:
    """A Linear that reads only these input channels (columns of its weight)."""
    out = nn.Linear(len(columns), layer.out_features, bias=layer.bias is not None)
    out.weight.data.copy_(layer.weight.data[:, columns])
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.data)
    return out


def load_layer(target: nn.Module, source: nn.Module) -> None:
    """Load a layer's weights into a fresh layer of its kind, narrowing the fresh one's Linear layers first where
    the source was cut narrower (a width-pruned assistant): the layer modules stay the model's own."""
    for name, module in source.named_modules():
        if isinstance(module, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            holder = target.get_submodule(parent) if parent else target
            mine = getattr(holder, leaf)
            if mine.weight.shape != module.weight.shape:
                setattr(holder, leaf, nn.Linear(module.in_features, module.out_features, bias=module.bias is not None))
    target.load_state_dict(source.state_dict())
    attention = getattr(target, "attention", None)
    if attention is not None and hasattr(attention.self, "num_attention_heads"):  # BERT keeps its head count
        attention.self.num_attention_heads = bert_width(target)[0]
        attention.self.all_head_size = attention.self.query.out_features


def check_width(who: str, heads: int | None, ffn: int | None, have_heads: int, have_ffn: int, group: int = 1) -> None:
    """Refuse a width the source layers cannot give."""
    if heads is not None and heads > have_heads:
        raise RecipeError(f"student '{who}': heads {heads} is more than the {have_heads} heads it is cut from")
    if heads is not None and heads % group:
        raise RecipeError(
            f"student '{who}': heads {heads} is not a multiple of {group}: the teacher's query heads share key-value "
            f"heads in groups of {group}, and a group is kept or dropped whole"
        )
    if ffn is not None and ffn > have_ffn:
        raise RecipeError(f"student '{who}': ffn {ffn} is more than the {have_ffn} FFN channels it is cut from")


# --- a BERT encoder's layers (the classifier's transformer students) ---


def bert_width(layer: Any) -> tuple[int, int]:
    """A BERT layer's attention heads and FFN channels."""
    return layer.attention.self.query.out_features // layer.attention.self.attention_head_size, (
        layer.intermediate.dense.out_features
    )


@torch.no_grad()
def prune_bert_layers(
    source: Any,
    layers: list[Any],
    indices: list[int],
    batches: list[dict[str, Tensor]],
    heads: int | None,
    ffn: int | None,
) -> None:
    """Narrow `layers` (copies of the source encoder's layers `indices`) to `heads` heads and `ffn` channels each,
    ranked in the source encoder's forward pass over `batches` (its tokenised calibration texts)."""
    meter = ActivationEnergy(
        {
            **{f"heads{i}": source.encoder.layer[i].attention.output.dense for i in set(indices)},
            **{f"ffn{i}": source.encoder.layer[i].output.dense for i in set(indices)},
        }
    )
    with meter.recording():
        for batch in batches:
            meter.counted(batch["attention_mask"], batch["input_ids"].numel())
            source(**batch)
    for layer, index in zip(layers, indices, strict=True):
        attention = layer.attention.self
        if heads is not None:
            size = attention.attention_head_size
            per_head = meter.energy(f"heads{index}").view(-1, size).sum(-1)
            channels = head_channels(strongest(per_head, heads), size)
            for name in ("query", "key", "value"):
                setattr(attention, name, keep_outputs(getattr(attention, name), channels))
            attention.num_attention_heads, attention.all_head_size = heads, len(channels)
            layer.attention.output.dense = keep_inputs(layer.attention.output.dense, channels)
        if ffn is not None:
            kept = strongest(meter.energy(f"ffn{index}"), ffn)
            layer.intermediate.dense = keep_outputs(layer.intermediate.dense, kept)
            layer.output.dense = keep_inputs(layer.output.dense, kept)


# --- a Llama-style decoder's layers (the causal LM's students) ---


def llama_width(layer: Any) -> tuple[int, int, int]:
    """A decoder layer's query heads, FFN channels, and query heads per key-value head."""
    attention = layer.self_attn
    return (
        attention.q_proj.out_features // attention.head_dim,
        layer.mlp.gate_proj.out_features,
        attention.num_key_value_groups,
    )


@torch.no_grad()
def prune_llama_layers(
    source: Any,
    layers: list[Any],
    indices: list[int],
    batches: list[Tensor],
    heads: int | None,
    ffn: int | None,
) -> None:
    """Narrow decoder `layers` (copies of the source model's layers `indices`) to `heads` query heads (whole
    key-value groups) and `ffn` channels, ranked in the source model's forward pass over `batches` of token ids."""
    source_layers = source.model.layers
    meter = ActivationEnergy(
        {
            **{f"heads{i}": source_layers[i].self_attn.o_proj for i in set(indices)},
            **{f"ffn{i}": source_layers[i].mlp.down_proj for i in set(indices)},
        }
    )
    with meter.recording():
        for ids in batches:
            meter.counted(None, ids.numel())
            source(input_ids=ids)
    for layer, index in zip(layers, indices, strict=True):
        attention = layer.self_attn
        if heads is not None:
            size, group = attention.head_dim, attention.num_key_value_groups
            per_group = meter.energy(f"heads{index}").view(-1, group * size).sum(-1)
            groups = strongest(per_group, heads // group)
            attention.q_proj = keep_outputs(attention.q_proj, head_channels(groups, group * size))
            attention.k_proj = keep_outputs(attention.k_proj, head_channels(groups, size))
            attention.v_proj = keep_outputs(attention.v_proj, head_channels(groups, size))
            attention.o_proj = keep_inputs(attention.o_proj, head_channels(groups, group * size))
        if ffn is not None:
            kept = strongest(meter.energy(f"ffn{index}"), ffn)
            layer.mlp.gate_proj = keep_outputs(layer.mlp.gate_proj, kept)
            layer.mlp.up_proj = keep_outputs(layer.mlp.up_proj, kept)
            layer.mlp.down_proj = keep_inputs(layer.mlp.down_proj, kept)
