"""Modeling code for GRASPrune checkpoints: LLaMA-family models whose layers differ in width.

grasprune.py copies this file beside every checkpoint it writes and names it in the config's
`auto_map`, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (and with it
`generate()`, pipelines and lm-evaluation-harness) builds the smaller model with no other code.

The per-layer shapes follow transformers' heterogeneous-config convention: the config keeps the
dense model's global values and a sparse `per_layer_config = {layer: {"intermediate_size": ...,
"num_key_value_heads": ..., "num_attention_heads": ...}}`. transformers parses and saves it, and
`config.per_layer_config[i]` resolves layer i's full config, but the Llama/Mistral/Qwen modeling
code does not read it yet; the classes below do, and nothing else differs from the originals.
"""

import copy

import torch
from torch import nn
from transformers import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)


class NoAttention(nn.Module):
    """The attention block of a layer that kept no KV group: it adds only o_proj's bias (where
    the model has one; o_proj keeps its bias and zero columns), so the layer skips attention and
    its input norm. It still appends zero-width keys and values to the cache, because the cache
    counts the tokens seen from what it holds."""

    def __init__(self, o_proj: nn.Linear, head_dim: int, layer_idx: int):
        super().__init__()
        o_proj.weight = nn.Parameter(o_proj.weight[:, :0], requires_grad=o_proj.weight.requires_grad)
        o_proj.in_features = 0
        self.o_proj = o_proj  # the bias stays, the weight has no columns left
        self.head_dim, self.layer_idx = head_dim, layer_idx

    def forward(self, hidden_states: torch.Tensor, cache=None, **kwargs):
        if cache is not None:
            empty = hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1], self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return self.o_proj(hidden_states[..., :0]), None


def build_layer(layer_cls: type, layer_config, layer_idx: int) -> nn.Module:
    """Decoder layer `layer_idx` with the widths of its own config; with no KV group left, its
    attention is a NoAttention and its input norm (which fed only the attention) is dropped."""
    if layer_config.num_key_value_heads > 0:
        return layer_cls(layer_config, layer_idx)
    one_head = copy.copy(layer_config)
    one_head.num_key_value_heads = one_head.num_attention_heads = 1
    layer = layer_cls(one_head, layer_idx)
    layer.self_attn = NoAttention(layer.self_attn.o_proj, layer_config.head_dim, layer_idx)
    layer.input_layernorm = nn.Identity()
    return layer


class PerLayerShapesMixin:
    """Rebuilds every decoder layer from its own entry of `config.per_layer_config`."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if config.is_heterogeneous:
            layers = self.model.layers
            for i, layer in enumerate(layers):
                layers[i] = build_layer(type(layer), config.per_layer_config[i], i)


class GraspruneLlamaForCausalLM(PerLayerShapesMixin, LlamaForCausalLM):
    pass


class GraspruneMistralForCausalLM(PerLayerShapesMixin, MistralForCausalLM):
    pass


class GraspruneQwen2ForCausalLM(PerLayerShapesMixin, Qwen2ForCausalLM):
    pass


class GraspruneQwen3ForCausalLM(PerLayerShapesMixin, Qwen3ForCausalLM):
    pass


PRUNED_CLASSES = {
    "llama": GraspruneLlamaForCausalLM,
    "mistral": GraspruneMistralForCausalLM,
    "qwen2": GraspruneQwen2ForCausalLM,
    "qwen3": GraspruneQwen3ForCausalLM,
}
