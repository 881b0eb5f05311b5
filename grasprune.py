"""GRASPrune: global gating for budgeted structured pruning of LLaMA-family LLMs.

Reference implementation of Wang et al., "Global Gating for Budgeted Structured Pruning of Large
Language Models" (ACL 2026, arXiv 2604.19398). The pipeline, in the order of this file:

  1. load a frozen, pretrained decoder-only model (Llama, Mistral, Qwen2, Qwen3; MHA or GQA);
  2. draw calibration sequences of unlabeled text;
  3. list the prunable units, each with its exact parameter cost: FFN intermediate channels
     (a row of gate_proj and up_proj, a column of down_proj) and KV head groups (one K head, one
     V head, the query heads that share them, and their o_proj columns);
  4. gate every unit's output with one entry of a flat gate vector;
  5. project the gate scores onto ONE global parameter budget: a hard 0/1 mask, exact;
  6. train only the scores, forward with the hard mask, backward through sigmoid(score / tau)
     (straight-through estimator); the paper trains on the LM loss from scores at 0, the
     defaults here distill the dense model's predictions from Fisher-informed scores (README);
  7. with the mask fixed, learn one bounded scale per kept unit, 1 + 0.5 * tanh(t);
  8. fold the scales into the kept weights and slice a smaller dense model;
  9. save it (safetensors + config + tokenizer + modeling_grasprune.py) and report.

Usage: python grasprune.py --model meta-llama/Llama-2-7b-hf --sparsity 0.5
"""

import argparse
import contextlib
import importlib.metadata
import json
import math
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

from modeling_grasprune import PRUNED_CLASSES, build_layer

SUPPORTED_MODEL_TYPES = tuple(PRUNED_CLASSES)
MODELING_FILE = Path(__file__).with_name("modeling_grasprune.py")


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, nothing written."""


# ----------------------------------------------------------------------------------------------
# 1. Loading the model


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """cuda with bf16 when available, else cpu with float32; explicit choices win."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise UsageError(f"unknown --dtype {dtype!r}; use float32, bfloat16 or float16")
    return torch.device(device), getattr(torch, dtype)


def load_model(name: str, device: str | None = None, dtype: str | None = None, device_map: str | dict | None = None):
    """Load a model and its tokenizer from a hub id, a local folder, a .gguf file or a
    GRASPrune checkpoint. Returns (model, tokenizer), the model in eval mode and frozen.
    `device_map` (e.g. "auto") spreads a model too big for one device over several GPUs and
    CPU memory, through accelerate; it replaces `device`."""
    device, torch_dtype = resolve_device_dtype(device, dtype)
    source, extra, load_extra = name, {}, {}
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"no GGUF file at {name}")
        source, extra = str(path.parent), {"gguf_file": path.name}
        # Unpack the GGUF blocks into plain float weights: gates and slicing need a dense model.
        load_extra = extra | {"quantization_config": GgufConfig(dequantize=True)}
    try:
        config = AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a model config from {name!r}: {str(err).splitlines()[0]}")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(
            f"model type {config.model_type!r} is not supported; GRASPrune supports decoder-only "
            f"LLaMA-family models: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # A pruned checkpoint loads through the same classes that its auto_map names.
    model_cls = PRUNED_CLASSES[config.model_type] if config.is_heterogeneous else AutoModelForCausalLM
    model = model_cls.from_pretrained(source, dtype=torch_dtype, device_map=device_map or str(device), **load_extra)
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    model.eval().requires_grad_(False)
    return model, tokenizer


def input_device(model) -> torch.device:
    """Where input ids go: the embedding's execution device. Under --device-map the embedding
    can be offloaded, and then model.device (that of the first weight) is 'meta'."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    return torch.device(hook.execution_device) if hook else embedding.weight.device


# ----------------------------------------------------------------------------------------------
# 2. Calibration data

# Each corpus: hub dataset, local file under --data-dir, text field, and the separator that the
# SparseGPT/Wanda perplexity protocol joins rows with.
CORPORA = {
    "wikitext2": (("Salesforce/wikitext", "wikitext-2-raw-v1"), "wikitext-2-raw-v1/{split}.parquet", "text", "\n\n"),
    "ptb": (("ptb-text-only/ptb_text_only", "penn_treebank"), "ptb/{split}.jsonl", "sentence", " "),
    "c4": (("allenai/c4", "en"), "c4/{split}.jsonl", "text", " "),
}
C4_DOCUMENTS = 5000  # C4 splits are huge: the first documents already hold millions of tokens.


def read_rows(path: Path, field: str) -> list[str]:
    """Rows of one text field from a local .parquet or .jsonl file."""
    from datasets import load_dataset

    kind = "parquet" if path.suffix == ".parquet" else "json"
    return load_dataset(kind, data_files=str(path), split="train")[field]


def load_text(source: str, split: str, data_dir: str | None = None) -> str:
    """Text of a corpus split (wikitext2, ptb, c4) from the hub or --data-dir, or of a local
    .txt/.jsonl/.parquet file; corpus rows joined as the SparseGPT/Wanda protocol does."""
    if source not in CORPORA:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"calibration source {source!r} is neither {', '.join(CORPORA)}, 'self' nor a file")
        return path.read_text() if path.suffix == ".txt" else "\n\n".join(read_rows(path, "text"))
    (hub_id, hub_config), local, field, sep = CORPORA[source]
    if data_dir is not None:
        path = Path(data_dir) / local.format(split=split)
        if not path.is_file():
            raise UsageError(f"{source} {split} is not in --data-dir: no file {path}")
        rows = read_rows(path, field)
    else:
        from datasets import load_dataset

        try:
            rows = load_dataset(hub_id, hub_config, split=split, streaming=source == "c4")
            rows = [row[field] for _, row in zip(range(C4_DOCUMENTS), rows)] if source == "c4" else rows[field]
        except (OSError, ValueError) as err:  # ConnectionError offline, DatasetNotFoundError, bad config
            raise UsageError(
                f"cannot load {source} ({split}) from the Hugging Face hub ({type(err).__name__}); "
                "pass --data-dir DIR with local copies laid out like shared/data, or a local text file"
            )
    return sep.join(rows)


def calibration_batches(tokenizer, text: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """N sequences of L tokens: non-overlapping windows of the tokenized text, N of them chosen
    by a seeded permutation so that they spread over the whole corpus. Shape (N, L)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = ids.numel() // seq_len
    if windows < n:
        raise UsageError(
            f"too little calibration text: {ids.numel()} tokens make {windows} sequences of "
            f"{seq_len} tokens, {n} needed (lower --nsamples or --seq-len)"
        )
    chosen = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[:n]
    return ids[: windows * seq_len].view(windows, seq_len)[chosen]


@torch.no_grad()
def sample_from_model(model, tokenizer, n: int, seq_len: int, seed: int, batch_size: int = 16) -> torch.Tensor:
    """Data-free calibration: N sequences of L tokens sampled from the dense model itself,
    each starting from the BOS token (EOS where there is none). Shape (N, L)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    batches = []
    for first in tqdm(range(0, n, batch_size), desc="sampling calibration text"):
        prompt = torch.full((min(batch_size, n - first), 1), start, device=input_device(model))
        batches.append(model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
            temperature=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
            pad_token_id=tokenizer.eos_token_id,
        ).cpu())
    return torch.cat(batches)


# ----------------------------------------------------------------------------------------------
# 3. Prunable units and their parameter costs

# Which slice of which decoder-layer parameter each unit owns, as (unit index kind, dim):
# "ffn" indexes FFN channels, "kv" the head_dim rows of a K or V head, "q" the g * head_dim
# rows (or o_proj columns) of the query heads that share one KV head. Pruning and costing both
# read this table, so a unit's cost is exactly what slicing it removes. Output biases of o_proj
# and down_proj (where a model has them) belong to no unit and stay.
UNIT_SLICES = {
    "mlp.gate_proj.weight": ("ffn", 0),
    "mlp.gate_proj.bias": ("ffn", 0),
    "mlp.up_proj.weight": ("ffn", 0),
    "mlp.up_proj.bias": ("ffn", 0),
    "mlp.down_proj.weight": ("ffn", 1),
    "self_attn.q_proj.weight": ("q", 0),
    "self_attn.q_proj.bias": ("q", 0),
    "self_attn.k_proj.weight": ("kv", 0),
    "self_attn.k_proj.bias": ("kv", 0),
    "self_attn.v_proj.weight": ("kv", 0),
    "self_attn.v_proj.bias": ("kv", 0),
    "self_attn.o_proj.weight": ("q", 1),
}


@dataclass(frozen=True)
class Units:
    """All prunable units, laid out in one flat vector: every FFN channel (layer by layer),
    then every KV group (layer by layer). Scores, masks and scales all use this layout."""

    num_layers: int
    ffn_per_layer: int  # intermediate size
    kv_per_layer: int  # KV heads
    heads_per_group: int  # query heads per KV head
    head_dim: int
    ffn_cost: int  # parameters of one FFN channel
    kv_cost: int  # parameters of one KV group

    @property
    def num_ffn(self) -> int:
        return self.num_layers * self.ffn_per_layer

    @property
    def count(self) -> int:
        return self.num_layers * (self.ffn_per_layer + self.kv_per_layer)

    def ffn(self, flat: torch.Tensor) -> torch.Tensor:
        """(num_layers, ffn_per_layer) view of the FFN part of a flat unit vector."""
        return flat[: self.num_ffn].view(self.num_layers, self.ffn_per_layer)

    def kv(self, flat: torch.Tensor) -> torch.Tensor:
        """(num_layers, kv_per_layer) view of the KV-group part of a flat unit vector."""
        return flat[self.num_ffn :].view(self.num_layers, self.kv_per_layer)

    def costs(self, device: torch.device) -> torch.Tensor:
        """Exact parameter cost of every unit (int64)."""
        ffn = torch.full((self.num_ffn,), self.ffn_cost, dtype=torch.long, device=device)
        kv = torch.full((self.count - self.num_ffn,), self.kv_cost, dtype=torch.long, device=device)
        return torch.cat([ffn, kv])

    @property
    def total_cost(self) -> int:
        return self.num_layers * (self.ffn_per_layer * self.ffn_cost + self.kv_per_layer * self.kv_cost)


def find_units(model) -> Units:
    """The prunable units of a dense model, with costs read off its layer shapes."""
    if model.config.is_heterogeneous:
        raise UsageError("this model is already pruned (its layers differ in width); start from a dense model")
    attn = model.model.layers[0].self_attn
    head_dim, group = attn.head_dim, attn.num_key_value_groups
    rows_per_unit = {"ffn": 1, "kv": head_dim, "q": group * head_dim}
    cost = {"ffn": 0, "kv": 0, "q": 0}
    for name, param in model.model.layers[0].named_parameters():
        if name in UNIT_SLICES:
            kind, dim = UNIT_SLICES[name]
            cost[kind] += param.numel() // param.shape[dim] * rows_per_unit[kind]
    return Units(
        num_layers=len(model.model.layers),
        ffn_per_layer=model.model.layers[0].mlp.gate_proj.out_features,
        kv_per_layer=attn.k_proj.out_features // head_dim,
        heads_per_group=group,
        head_dim=head_dim,
        ffn_cost=cost["ffn"],
        kv_cost=cost["kv"] + cost["q"],
    )


# ----------------------------------------------------------------------------------------------
# 4. Gates: every unit's output times its entry of a flat gate vector


class Gates:
    """Forward pre-hooks that multiply the input of down_proj (one entry per FFN channel) and
    of o_proj (one entry per KV group, shared by its query heads) by the current `values`.
    A gate of 0 removes the unit's contribution exactly as slicing it out would; gating the
    projection inputs (not the weights) keeps the backbone frozen and untouched."""

    def __init__(self, model, units: Units):
        self.units = units
        self.values: torch.Tensor = torch.ones(units.count)
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(partial(self.gate_ffn, i)))
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(partial(self.gate_heads, i)))

    def gate_ffn(self, layer: int, module, args):
        return args[0] * self.units.ffn(self.values)[layer].to(args[0])

    def gate_heads(self, layer: int, module, args):
        x = args[0]  # (..., kv_per_layer * heads_per_group * head_dim)
        gate = self.units.kv(self.values)[layer].to(x)
        return (x.unflatten(-1, (self.units.kv_per_layer, -1)) * gate[:, None]).flatten(-2)

    def remove(self):
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def gated(model, units: Units):
    """Install gates on the model for the duration of a with-block."""
    gates = Gates(model, units)
    try:
        yield gates
    finally:
        gates.remove()


# ----------------------------------------------------------------------------------------------
# 5. Projection onto the global budget


def budget_for(units: Units, sparsity: float, kv_floor: int = 1) -> int:
    """Parameters that the kept units may hold: (1 - sparsity) of all prunable parameters.
    The per-layer minimum (one FFN channel, and `kv_floor` KV groups: 1, or 0 to let a layer
    lose its whole attention block) is reserved inside it."""
    budget = math.floor((1.0 - sparsity) * units.total_cost)
    reserve = units.num_layers * (units.ffn_cost + kv_floor * units.kv_cost)
    if budget < reserve:
        raise UsageError(
            f"sparsity {sparsity} leaves {budget} parameters, fewer than the {reserve} needed to keep "
            f"one FFN channel{' and one KV group' if kv_floor else ''} in every layer"
        )
    return budget


@torch.no_grad()
def project_to_budget(
    scores: torch.Tensor, costs: torch.Tensor, budget: int, units: Units, kv_floor: int = 1
) -> torch.Tensor:
    """Hard 0/1 mask of the highest-scoring units that fit the budget (boolean, flat layout).

    Each layer's best FFN channel and (with kv_floor 1) best KV group are reserved first; the
    other units are then taken greedily by score, skipping any that no longer fits. The kept
    cost never exceeds the budget and falls short of it by less than the cost of the cheapest
    skipped unit. Ties are broken by unit index (a stable sort; argmax takes the first maximum),
    so with every score at 0 (--init zeros) the first mask keeps FFN channels from layer 0
    upwards, then KV groups, on every device alike.
    """
    keep = torch.zeros_like(scores, dtype=torch.bool)
    layer_starts = torch.arange(units.num_layers, device=scores.device)
    keep[units.ffn(scores).argmax(1) + layer_starts * units.ffn_per_layer] = True
    if kv_floor:
        keep[units.kv(scores).argmax(1) + layer_starts * units.kv_per_layer + units.num_ffn] = True
    remaining = budget - int(costs[keep].sum())
    order = torch.argsort(scores, descending=True, stable=True)
    candidates = order[~keep[order]]
    # Greedy with skips, vectorized: take the longest prefix that fits; once a unit of cost c
    # does not fit, no unit costing c or more ever will, so drop those and go on. This loops at
    # most once per distinct unit cost (two here).
    while candidates.numel() > 0:
        cost = costs[candidates]
        taken = int((cost.cumsum(0) <= remaining).sum())
        keep[candidates[:taken]] = True
        remaining -= int(cost[:taken].sum())
        if taken == candidates.numel():
            break
        rest = candidates[taken + 1 :]
        candidates = rest[costs[rest] < cost[taken]]
    return keep


# ----------------------------------------------------------------------------------------------
# 6. Gate training: hard mask forward, sigmoid(score / tau) backward


def straight_through(scores: torch.Tensor, hard: torch.Tensor, tau: float) -> torch.Tensor:
    """Forward value: exactly the hard mask; gradient: d sigmoid(score / tau) / d score.
    (The parentheses matter: hard + soft - soft would not be exactly 0 or 1 in floating point.)"""
    soft = torch.sigmoid(scores / tau)
    return hard + (soft - soft.detach())


def calibration_loss(model, gates: Gates, values: torch.Tensor, batch: torch.Tensor, kind: str) -> torch.Tensor:
    """The loss of gate training and scaling calibration, with `values` in the gates.
    lm: next-token cross-entropy on the calibration text (the paper's). kd: KL divergence from
    the dense model's next-token distribution to the gated model's; the teacher is the same
    network with every gate at 1, so no second model is held (one extra forward, no backward)."""
    batch = batch.to(input_device(model))
    if kind == "lm":
        gates.values = values
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    with torch.no_grad():
        gates.values = torch.ones_like(values)
        teacher = model(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
    gates.values = values
    student = model(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


IMPORTANCE_BATCHES = 32


def importance_scores(model, units: Units, data: torch.Tensor, budget: int, args) -> torch.Tensor:
    """Informed initial scores (--init importance) instead of all zeros. A unit's importance is
    the empirical Fisher of its gate, mean (dL/dg)^2 with every unit kept over the first
    IMPORTANCE_BATCHES calibration batches: the usual estimate of how much the loss rises when
    the unit is removed (as in Fisher pruning). Divided by the unit's parameter cost (loss per
    parameter makes FFN channels and KV groups comparable), on a log scale, standardized, and
    shifted so the best unit left out of the first mask sits at 0, where the straight-through
    gradient is largest."""
    device = input_device(model)
    fisher = torch.zeros(units.count, device=device)
    values = torch.ones(units.count, device=device, requires_grad=True)
    batches = data.split(args.batch_size)[:IMPORTANCE_BATCHES]
    with gated(model, units) as gates:
        for batch in tqdm(batches, desc="unit importance"):
            (grad,) = torch.autograd.grad(calibration_loss(model, gates, values, batch, "lm"), values)
            fisher += grad.square() / len(batches)
    costs = units.costs(device)
    log_ratio = (fisher / costs).clamp_min(torch.finfo(torch.float32).tiny).log()
    z = (log_ratio - log_ratio.mean()) / log_ratio.std()
    left_out = ~project_to_budget(z, costs, budget, units, args.kv_floor)
    return z - z[left_out].max() if left_out.any() else z


@contextlib.contextmanager
def activation_checkpointing(model, enabled: bool):
    """Recompute each decoder layer's activations in the backward pass instead of storing them
    (transformers' gradient checkpointing): memory for compute. transformers checkpoints only
    layers in training mode, so only the layers' own flag is set; dropout stays off."""
    if not enabled:
        yield
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.model.layers:
        layer.training = True
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        model.eval()


def train_gates(
    model, units: Units, data: torch.Tensor, budget: int, args,
    scores: torch.Tensor | None = None, project=project_to_budget,
) -> tuple[torch.Tensor, list[dict]]:
    """Learn one score per unit under the global budget; the backbone stays frozen. Scores start
    at `scores` (default: all 0, the paper's). `project` maps scores to the hard mask (the
    ablations swap in other rules). Returns the final scores and, per step, the loss, the kept
    cost and how many units flipped."""
    device = input_device(model)
    costs = units.costs(device)
    scores = (torch.zeros(units.count, device=device) if scores is None else scores.clone()).requires_grad_()
    optimizer = torch.optim.AdamW([scores], lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    batches = data.split(args.batch_size)
    history, previous = [], None
    with gated(model, units) as gates, tqdm(total=args.epochs * len(batches), desc="gate training") as bar:
        for _ in range(args.epochs):
            for batch in batches:
                hard = project(scores.detach(), costs, budget, units, args.kv_floor)
                loss = calibration_loss(model, gates, straight_through(scores, hard.float(), args.tau), batch, args.loss)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # Every figure of the step in one device-to-host copy (float64 holds the costs exactly).
                flipped = hard != (hard if previous is None else previous)
                figures = (loss.detach(), costs[hard].sum(), flipped.sum(), units.ffn(hard).sum(), units.kv(hard).sum())
                loss_value, kept_cost, flips, ffn, kv = torch.stack([f.double() for f in figures]).tolist()
                previous = hard
                history.append({"loss": loss_value, "kept_cost": int(kept_cost), "flips": int(flips)})
                bar.set_postfix(loss=f"{loss_value:.3f}", ffn=f"{ffn / units.num_ffn:.3f}",
                                kv=f"{kv / (units.count - units.num_ffn):.3f}", flips=int(flips))
                bar.update()
    return scores.detach(), history


def select_mask(
    model, units: Units, data: torch.Tensor, budget: int, args, project=project_to_budget
) -> tuple[torch.Tensor, list[dict]]:
    """Sections 5 and 6 end to end: the starting scores (all 0, or --init importance), gate
    training, and the projection of the final scores: the mask that scaling calibration fixes.
    Returns it with the training history."""
    with activation_checkpointing(model, args.gradient_checkpointing):
        init = importance_scores(model, units, data, budget, args) if args.init == "importance" else None
        scores, history = train_gates(model, units, data, budget, args, init, project)
    return project(scores, units.costs(scores.device), budget, units, args.kv_floor), history


# ----------------------------------------------------------------------------------------------
# 7. Scaling calibration: one bounded factor per kept unit, mask fixed


def scale_values(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Gate values of the calibrated model: 1 + 0.5 * tanh(t) on kept units, 0 elsewhere."""
    return mask * (1.0 + 0.5 * torch.tanh(t))


def calibrate_scales(model, units: Units, mask: torch.Tensor, data: torch.Tensor, args) -> torch.Tensor:
    """One epoch of LM loss over the per-unit scales with the mask fixed. Returns the gate
    values to fold into the weights. A pruned unit's t gets zero gradient and stays at 0."""
    mask = mask.float()
    t = torch.zeros(units.count, device=mask.device, requires_grad=True)
    optimizer = torch.optim.AdamW([t], lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    batches = data.split(args.batch_size)
    with gated(model, units) as gates, tqdm(batches, desc="scaling calibration") as bar:
        for batch in bar:
            loss = calibration_loss(model, gates, scale_values(mask, t), batch, args.loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return scale_values(mask, t).detach()


# ----------------------------------------------------------------------------------------------
# 8. Folding and slicing into a smaller dense model


def head_rows(heads: torch.Tensor, rows_per_head: int) -> torch.Tensor:
    """Row indices of the given heads in a projection with `rows_per_head` rows per head."""
    return (heads[:, None] * rows_per_head + torch.arange(rows_per_head, device=heads.device)).flatten()


def slice_layer(layer, layer_config, ffn_gate: torch.Tensor, kv_gate: torch.Tensor, units: Units):
    """A new decoder layer holding only the units with a non-zero gate, each gate value folded
    into the unit's down_proj / o_proj columns (where the gate acts), so no parameter is added."""
    ffn_kept = ffn_gate.nonzero().flatten()
    kv_kept = kv_gate.nonzero().flatten()
    q_width = units.heads_per_group * units.head_dim
    index = {"ffn": ffn_kept, "kv": head_rows(kv_kept, units.head_dim), "q": head_rows(kv_kept, q_width)}
    fold = {
        "mlp.down_proj.weight": ffn_gate[ffn_kept],
        "self_attn.o_proj.weight": kv_gate[kv_kept].repeat_interleave(q_width),
    }
    # Under accelerate dispatch (--device-map) the layer carries a hook that runs it on its
    # execution device, and an offloaded layer (CPU or disk) keeps its weights in its hooks.
    # The sliced layer goes where the dense one was: on its device, or offloaded to CPU memory
    # (never moved onto an accelerator that had no room for it).
    offloaded = any(p.device.type == "meta" for p in layer.parameters())
    if offloaded:
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        weights = get_state_dict_offloaded_model(layer)  # read into CPU memory
    else:
        weights = layer.state_dict()
    state = {}
    for name, param in weights.items():
        if name in UNIT_SLICES:
            kind, dim = UNIT_SLICES[name]
            param = param.index_select(dim, index[kind].to(param.device))
        if name in fold:
            param = (param.float() * fold[name].to(param.device)).to(param.dtype)
        state[name] = param
    with torch.device("meta"):
        sliced = build_layer(type(layer), layer_config, layer.self_attn.layer_idx)
    # A layer left with no KV group drops its q/k/v projections and input norm (NoAttention).
    wanted = sliced.state_dict().keys()
    state = {name: param for name, param in state.items() if name in wanted}
    sliced.load_state_dict(state, assign=True)
    hook = getattr(layer, "_hf_hook", None)
    if hook is not None:
        from accelerate import hooks

        device = hook.execution_device
        hooks.add_hook_to_module(sliced, hooks.AlignDevicesHook(execution_device=device))  # inputs to `device`
        if offloaded:  # each submodule fetches its weights from CPU memory at every forward
            hooks.attach_align_device_hook(sliced, execution_device=device, offload=True, weights_map=state)
    return sliced.requires_grad_(False)


def slice_model(model, units: Units, gate: torch.Tensor):
    """Replace every decoder layer by its sliced twin, in place, and record the per-layer
    shapes in the config (transformers' `per_layer_config`) with an auto_map to the modeling
    file that reads them. The model runs right away and saves as a loadable checkpoint."""
    config = model.config
    kept_ffn = units.ffn(gate).count_nonzero(1).tolist()
    kept_kv = units.kv(gate).count_nonzero(1).tolist()
    # Qwen2 derives head_dim from num_attention_heads, which now varies per layer; and the
    # dense classes' own __init__/validation read the global values, so they must stay readable.
    config.head_dim = units.head_dim
    config.allow_global_per_layer_attribute_access = True
    config.per_layer_config = {
        i: {"intermediate_size": f, "num_key_value_heads": k, "num_attention_heads": k * units.heads_per_group}
        for i, (f, k) in enumerate(zip(kept_ffn, kept_kv))
    }
    config.auto_map = {"AutoModelForCausalLM": f"modeling_grasprune.{PRUNED_CLASSES[config.model_type].__name__}"}
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = slice_layer(layers[i], config.per_layer_config[i], units.ffn(gate)[i], units.kv(gate)[i], units)
    return model


# ----------------------------------------------------------------------------------------------
# 9. Reporting and saving


def late_flips(history: list[dict]) -> float:
    """Mean units flipped per step over the last tenth of gate training: has the mask settled?"""
    tenth = max(1, len(history) // 10)
    return sum(h["flips"] for h in history[-tenth:]) / tenth


def kv_width_of(layer) -> int:
    """Rows of a decoder layer's k_proj (0 when the layer has no attention left)."""
    k_proj = getattr(layer.self_attn, "k_proj", None)
    return 0 if k_proj is None else k_proj.out_features


def peak_memory_gib() -> dict[str, float]:
    """Peak memory since the previous call: tensors allocated on each GPU in use, and the
    process's resident CPU memory (Linux; the OS keeps no resettable peak, so this one is the
    peak since the start)."""
    peaks = {}
    for i in range(torch.cuda.device_count() if torch.cuda.is_initialized() else 0):
        if torch.cuda.max_memory_allocated(i):
            peaks[f"cuda:{i}"] = round(torch.cuda.max_memory_allocated(i) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(i)
    peaks["cpu_rss"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB -> GiB
    return peaks


def model_summary(model) -> dict:
    """Parameter counts (tied tensors once), prunable parameters (those owned by units) and
    KV-cache bytes per token of a dense or pruned model."""
    prunable = sum(
        p.numel() for layer in model.model.layers for n, p in layer.named_parameters() if n in UNIT_SLICES
    )
    kv_width = sum(kv_width_of(layer) for layer in model.model.layers)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "prunable_parameters": prunable,
        "kv_cache_bytes_per_token": 2 * kv_width * model.dtype.itemsize,
    }


def layer_table(model, units: Units) -> list[dict]:
    """Kept FFN channels, KV groups and query heads of every layer, with its parameters."""
    rows = []
    for i, layer in enumerate(model.model.layers):
        kv = kv_width_of(layer) // units.head_dim
        rows.append({
            "layer": i,
            "ffn_channels": layer.mlp.gate_proj.out_features,
            "kv_groups": kv,
            "query_heads": kv * units.heads_per_group,
            "parameters": sum(p.numel() for p in layer.parameters()),
        })
    return rows


def print_layer_table(rows: list[dict], units: Units) -> None:
    print(f"{'layer':>5} {'FFN channels':>14} {'KV groups':>10} {'Q heads':>8} {'parameters':>12}")
    for r in rows:
        print(
            f"{r['layer']:>5} {r['ffn_channels']:>7}/{units.ffn_per_layer:<6} {r['kv_groups']:>4}/{units.kv_per_layer:<5}"
            f" {r['query_heads']:>4}/{units.kv_per_layer * units.heads_per_group:<3} {r['parameters']:>12,}"
        )


def save_checkpoint(model, tokenizer, report: dict, output: Path, overwrite: bool) -> None:
    """Write the sliced model, tokenizer, modeling file and report into a temporary folder
    beside `output`, then move it into place: an interrupted run leaves no half checkpoint."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        # safetensors, tied embeddings stored once; 5 GB shards (the hub's usual size) also bound
        # the CPU memory that saving a --device-map model with offloaded modules needs.
        model.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        shutil.copy(MODELING_FILE, tmp / MODELING_FILE.name)
        (tmp / "grasprune_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if output.exists() and overwrite:
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# 10. Command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except an unset one (None, a flag's False): their help
    says what happens without them."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="hub id, local folder or .gguf file")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of prunable parameters to remove")
    p.add_argument("--output", help="output folder (default: <model name>-grasprune-s<sparsity>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--calib", default="wikitext2", help="wikitext2, ptb, c4, self (sampled from the model) or a .txt/.jsonl/.parquet file")
    p.add_argument("--calib-split", default="train", help="split of the calibration corpus")
    p.add_argument("--data-dir", help="local copies of the corpora, laid out like shared/data (no network)")
    p.add_argument("--nsamples", type=int, default=512, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=1, help="calibration sequences per optimizer step")
    p.add_argument("--epochs", type=int, default=4, help="epochs of gate training")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (gate scores and scales)")
    p.add_argument("--tau", type=float, default=1.5, help="temperature of the straight-through sigmoid")
    p.add_argument("--init", choices=("zeros", "importance"), default="importance",
                   help="initial gate scores: Fisher importance per parameter, or all 0 (the paper's)")
    p.add_argument("--loss", choices=("lm", "kd"), default="kd",
                   help="kd: distill the dense model's own predictions; lm: next-token loss (the paper's)")
    p.add_argument("--kv-floor", type=int, choices=(0, 1), default=1,
                   help="KV groups every layer keeps; 0 lets a layer drop its whole attention block")
    p.add_argument("--no-rescale", action="store_true", help="skip the scaling calibration")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory, more time")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of calibration windows (and sampling)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", help="float32, bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device-map", help="auto: spread a model too big for one GPU over all GPUs and CPU memory")
    p.add_argument("--eval", action="store_true", help="WikiText-2 test perplexity: dense, masked, final")
    p.add_argument("--eval-windows", type=int, help="with --eval: only the first N 2048-token windows (quick runs)")
    args = p.parse_args(argv)
    if not 0.0 < args.sparsity < 1.0:
        raise UsageError(f"--sparsity must lie strictly between 0 and 1, got {args.sparsity}")
    for name in ("nsamples", "seq_len", "batch_size", "epochs"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.output is None:
        args.output = f"{Path(args.model.rstrip('/')).stem}-grasprune-s{args.sparsity}"
    if Path(args.output).exists() and not args.overwrite:
        raise UsageError(f"output folder {args.output} exists; pass --overwrite to replace it")
    return args


EVAL_PROMPT = "The capital of France is"


def quality(model, tokenizer, text: str, args) -> dict:
    """--eval: WikiText-2 test perplexity with eval.py's protocol (2048-token windows), and one
    prompt's greedy continuation with its decode speed (batch 1), to see what pruning did."""
    import eval as evaluation

    ppl = evaluation.perplexity(model, tokenizer, text, seq_len=2048, limit_windows=args.eval_windows)
    prompt = tokenizer(EVAL_PROMPT, return_tensors="pt").input_ids.to(input_device(model))
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32,
                         min_new_tokens=32, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    return {"perplexity": ppl, "decode_tokens_per_s": 32 / seconds,
            "continuation": tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)}


def run(args: argparse.Namespace) -> dict:
    """The whole pipeline; returns the report that is saved beside the checkpoint."""
    timings, memory, clock = {}, {}, time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.perf_counter() - clock, 2)
        memory[stage] = peak_memory_gib()
        clock = time.perf_counter()

    torch.manual_seed(args.seed)
    text = None if args.calib == "self" else load_text(args.calib, args.calib_split, args.data_dir)
    eval_text = load_text("wikitext2", "test", args.data_dir) if args.eval else None
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.device_map)
    units = find_units(model)
    budget = budget_for(units, args.sparsity, args.kv_floor)
    before = model_summary(model)
    lap("load")

    if text is None:
        data = sample_from_model(model, tokenizer, args.nsamples, args.seq_len, args.seed)
    else:
        data = calibration_batches(tokenizer, text, args.nsamples, args.seq_len, args.seed)
    lap("calibration_data")
    print(f"[grasprune] {units.count:,} units ({units.num_ffn:,} FFN channels of {units.ffn_cost:,} params, "
          f"{units.count - units.num_ffn:,} KV groups of {units.kv_cost:,}); budget {budget:,} of {units.total_cost:,}")

    evaluations = {}
    if args.eval:
        evaluations["dense"] = quality(model, tokenizer, eval_text, args)
        lap("eval_dense")

    mask, history = select_mask(model, units, data, budget, args)
    lap("gate_training")
    if args.eval:
        with gated(model, units) as gates:
            gates.values = mask.float()
            evaluations["masked"] = quality(model, tokenizer, eval_text, args)
        lap("eval_masked")

    if args.no_rescale:
        gate = mask.float()
    else:
        with activation_checkpointing(model, args.gradient_checkpointing):
            gate = calibrate_scales(model, units, mask, data, args)
    lap("scaling_calibration")
    slice_model(model, units, gate)
    after = model_summary(model)
    lap("slicing")
    if args.eval:
        evaluations["pruned"] = quality(model, tokenizer, eval_text, args)
        lap("eval_pruned")

    rows = layer_table(model, units)
    report = {
        "settings": dict(vars(args)),
        "versions": {"python": platform.python_version()}
        | {lib: importlib.metadata.version(lib) for lib in ("torch", "transformers", "datasets", "accelerate")},
        "device": str(input_device(model)),
        "device_map": getattr(model, "hf_device_map", None),  # where --device-map placed each module
        "dtype": str(model.dtype).removeprefix("torch."),
        "units": vars(units),
        "budget": budget,
        "before": before,
        "after": after,
        "parameters_removed": 1 - after["parameters"] / before["parameters"],
        "prunable_removed": 1 - after["prunable_parameters"] / before["prunable_parameters"],
        "steps": len(history),
        "final_flips": history[-1]["flips"],
        "mean_flips_last_tenth": late_flips(history),
        "final_loss": history[-1]["loss"],
        "eval": evaluations,
        "layers": rows,
        "seconds": timings,
        "peak_memory_gib": memory,
    }
    print_layer_table(rows, units)
    print(f"[grasprune] parameters {before['parameters']:,} -> {after['parameters']:,} "
          f"({report['parameters_removed']:.2%} removed); prunable {before['prunable_parameters']:,} -> "
          f"{after['prunable_parameters']:,} ({report['prunable_removed']:.2%} removed); KV cache "
          f"{before['kv_cache_bytes_per_token']:,} -> {after['kv_cache_bytes_per_token']:,} bytes/token")
    peak = memory["gate_training"]
    print(f"[grasprune] gate training: {timings['gate_training']:.0f} s, peak memory "
          + ", ".join(f"{device} {gib:.2f} GiB" for device, gib in peak.items()))
    for name, q in evaluations.items():
        print(f"[grasprune] {name:>6}: WikiText-2 test perplexity {q['perplexity']:.2f}, decode "
              f"{q['decode_tokens_per_s']:.1f} tokens/s, {EVAL_PROMPT!r} -> {q['continuation']!r}")
    save_checkpoint(model, tokenizer, report, Path(args.output), args.overwrite)
    print(f"[grasprune] saved {args.output}")
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except UsageError as err:
        print(f"grasprune: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
