"""Modeling code for GRASPrune checkpoints: LLaMA-family models whose layers differ in width.

Every `save_pretrained` of a pruned model copies this file beside the weights and names it in the
config's `auto_map` (the classes below are registered for `AutoModelForCausalLM`), so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (and with it `generate()`,
pipelines and lm-evaluation-harness) builds the smaller model with no other code.

The per-layer shapes follow transformers' heterogeneous-config convention: the config keeps the
dense model's global values and a sparse `per_layer_config = {layer: {"intermediate_size": ...,
"num_key_value_heads": ..., "num_attention_heads": ...}}`. transformers parses and saves it, and
`config.per_layer_config[i]` resolves layer i's full config, but the Llama/Mistral/Qwen modeling
code does not read it yet; the classes below do, and nothing else differs from the originals.
The loaders at the end (`load_config`, `load_pretrained`, `load_tokenizer`) open dense models, GGUF files and
these checkpoints without remote code; grasprune.py and export_gguf.py both use them.
"""

import contextlib
import copy
import logging
from pathlib import Path

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from transformers.cache_utils import DummyLayer


class NoCacheLayer(DummyLayer):
    """transformers' placeholder for an attention-free layer's cache slot (it stores no keys or
    values) that counts the tokens passed through it: models ask layer 0's slot how many tokens
    the cache has seen, and a layer 0 without attention must still answer."""

    def __init__(self):
        super().__init__()
        self.tokens = 0

    def get_seq_length(self) -> int:
        return self.tokens

    def reset(self) -> None:
        self.tokens = 0

    def crop(self, tokens_to_remove: int) -> None:  # assisted decoding rolls back rejected tokens
        self.tokens -= abs(tokens_to_remove)  # transformers passes it negative


def hold_no_cache(cache, layer_idx: int, new_tokens: int) -> None:
    """Put a NoCacheLayer in this layer's cache slot and count the step's new tokens in it."""
    layers = cache.layers
    while len(layers) <= layer_idx:  # a cache made without a config grows one layer at a time
        layers.append(cache.layer_class_to_replicate())
    if not isinstance(layers[layer_idx], NoCacheLayer):
        layers[layer_idx] = NoCacheLayer()
    layers[layer_idx].tokens += new_tokens


class NoAttention(nn.Module):
    """The attention block of a layer that kept no KV group: it adds only o_proj's bias (where
    the model has one; o_proj keeps its bias and zero columns), so the layer skips attention and
    its input norm, and holds nothing in the KV cache."""

    def __init__(self, o_proj: nn.Linear, layer_idx: int):
        super().__init__()
        o_proj.weight = nn.Parameter(o_proj.weight[:, :0], requires_grad=o_proj.weight.requires_grad)
        o_proj.in_features = 0
        self.o_proj = o_proj  # the bias stays, the weight has no columns left
        self.layer_idx = layer_idx

    def forward(self, hidden_states, cache=None, **kwargs):
        if cache is not None:
            hold_no_cache(cache, self.layer_idx, hidden_states.shape[-2])
        return self.o_proj(hidden_states[..., :0]), None


def build_layer(layer_cls: type, layer_config, layer_idx: int) -> nn.Module:
    """Decoder layer `layer_idx` with the widths of its own config; with no KV group left, its
    attention is a NoAttention and its input norm (which fed only the attention) is dropped."""
    if layer_config.num_key_value_heads > 0:
        return layer_cls(layer_config, layer_idx)
    one_head = copy.copy(layer_config)
    one_head.num_key_value_heads = one_head.num_attention_heads = 1
    layer = layer_cls(one_head, layer_idx)
    layer.self_attn = NoAttention(layer.self_attn.o_proj, layer_idx)
    layer.input_layernorm = nn.Identity()
    return layer


@contextlib.contextmanager
def quiet_global_reads():
    """Reading the dense widths from a pruned config's global values is deliberate where this
    file does it (the stock classes' __init__ builds dense layers that are then rebuilt from their
    own entries), so transformers' warning about reading a per-layer attribute globally is held
    back meanwhile."""
    logger = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class PerLayerShapesMixin:
    """Rebuilds every decoder layer from its own entry of `config.per_layer_config`, and loads
    and saves without transformers' warnings about the global widths the config keeps on purpose."""

    def __init__(self, config, *args, **kwargs):
        with quiet_global_reads():
            super().__init__(config, *args, **kwargs)
        if config.is_heterogeneous:
            layers = self.model.layers
            for i, layer in enumerate(layers):
                layers[i] = build_layer(type(layer), config.per_layer_config[i], i)

    def save_pretrained(self, *args, **kwargs):
        with quiet_global_reads():  # the config's validation on saving reads the global widths
            return super().save_pretrained(*args, **kwargs)


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
for _cls in PRUNED_CLASSES.values():  # save_pretrained then copies this file and writes auto_map
    _cls.register_for_auto_class("AutoModelForCausalLM")


def source_of(name: str) -> tuple[str, dict]:
    """Where transformers reads `name` from: a hub id or folder as it is; a .gguf file from its
    folder, with `gguf_file=` naming it."""
    path = Path(name)
    if not name.endswith(".gguf"):
        if not path.exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1):  # not a hub id
            raise FileNotFoundError(f"no folder at {name} (a hub id is NAME or OWNER/NAME)")
        return name, {}
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {name}")
    return str(path.parent), {"gguf_file": path.name}


def load_config(name: str):
    """The config of a hub id, folder, .gguf file or checkpoint, without loading any weights."""
    source, extra = source_of(name)
    with quiet_global_reads():  # transformers' config validation reads the global widths
        return AutoConfig.from_pretrained(source, **extra)


def load_pretrained(name: str, **kwargs) -> tuple[nn.Module, "AutoTokenizer"]:
    """Model and tokenizer of a hub id, a local folder, a .gguf file or a GRASPrune checkpoint,
    without remote code: a checkpoint's layers differ in width, so it is built by the class
    above that reads them. GGUF weights are dequantized to plain floats. `kwargs` go to the
    model's `from_pretrained` (dtype, device_map, ...)."""
    source, extra = source_of(name)
    if extra:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    config = load_config(name)
    model_cls = PRUNED_CLASSES[config.model_type] if config.is_heterogeneous else AutoModelForCausalLM
    with quiet_global_reads():
        model = model_cls.from_pretrained(source, **extra, **kwargs)
    return model, load_tokenizer(name)


def load_tokenizer(name: str) -> "AutoTokenizer":
    """The tokenizer of a hub id, a local folder, a .gguf file or a GRASPrune checkpoint."""
    source, extra = source_of(name)
    with quiet_global_reads():  # AutoTokenizer reads a checkpoint's config to find the tokenizer's class
        return AutoTokenizer.from_pretrained(source, **extra)
