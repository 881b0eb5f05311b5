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

from transformers import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)


class PerLayerShapesMixin:
    """Rebuilds every decoder layer from its own entry of `config.per_layer_config`."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if config.is_heterogeneous:
            layers = self.model.layers
            for i, layer in enumerate(layers):
                layers[i] = type(layer)(config.per_layer_config[i], i)


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
