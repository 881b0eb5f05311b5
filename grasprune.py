"""GRASPrune: global gating for budgeted structured pruning of LLaMA-family LLMs.

Reference implementation of Wang et al. (ACL 2026, arXiv 2604.19398), in pipeline order: 0 the recipe,
1 loading a frozen model, 2 calibration data, 3 prunable units and their exact costs, 4 gates, 5 projection
onto one global budget, 6 gate training (straight-through), 7 scaling calibration, 8 slicing, 9 recovery
(this project's), 10 `prune()` (steps 3 to 9 on a loaded model), 11 the report's figures. The command line
is in cli.py.
"""

import contextlib
import dataclasses
import logging
import math
import resource
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple, Self

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm.auto import tqdm

import modeling_grasprune
from modeling_grasprune import PRUNED_CLASSES, build_layer, load_pretrained

SUPPORTED_MODEL_TYPES = tuple(PRUNED_CLASSES)


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, nothing written."""


def cause_of(err: BaseException) -> str:
    """An exception as one line, with the innermost error it wraps (which names what is wrong)."""
    root = err
    while root.__cause__ or root.__context__:
        root = root.__cause__ or root.__context__
    text = [(str(e).strip().splitlines() or [type(e).__name__])[0] for e in dict.fromkeys((err, root))]
    return text[0] if len(text) == 1 else f"{text[0]} ({type(root).__name__}: {text[1]})"


@contextlib.contextmanager
def reading(what: str):
    """The error boundary around reading what the user named (a model, a corpus, a task file): any
    failure becomes one UsageError naming it and the cause; datasets' own error log is held back."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"cannot read {what}: {cause_of(err)}") from err
    finally:
        logger.setLevel(level)


# ---- 0. The recipe -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting of the method: the defaults are this project's (docs/ablations.md), `Recipe.paper()`
    the paper's. The sparsity is the budget, an argument of `prune()`."""

    epochs: int = 4  # of gate training over the calibration sequences
    batch_size: int = 1  # calibration sequences per optimizer step
    lr: float = 1e-2  # AdamW, for the gate scores and the scales
    tau: float = 1.5  # temperature of the straight-through sigmoid
    init: str = "importance"  # initial scores: "importance" (Fisher per parameter) or "zeros" (paper)
    loss: str = "kd"  # "kd": distill the dense model's next-token distribution; "lm" (paper)
    top_k: int = 1024  # with kd: the dense model's most likely tokens kept per calibration token
    kv_floor: int = 1  # KV groups every layer keeps: 1 (paper), or 0 to let a layer drop attention
    ffn_multiple: int = 1  # every kept FFN width a multiple of it (llama.cpp quantizes whole blocks)
    rescale: bool = True  # scaling calibration after gate training
    recover_rank: int = 32  # recovery: rank of the merged correction of every kept weight; 0: none (paper)
    recover_lr: float = 2e-3  # AdamW, for the correction's factors, falling linearly to 0

    @classmethod
    def paper(cls) -> "Recipe":
        """The paper's recipe: scores from 0, the LM loss, no recovery."""
        return cls(init="zeros", loss="lm", recover_rank=0)

    def validate(self) -> None:
        """Refuse a setting of the wrong type or value (`epochs=1.5`, `tau=inf`) before any work."""
        choices = {"init": ("importance", "zeros"), "loss": ("kd", "lm"), "kv_floor": (0, 1)}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            ok = isinstance(value, (int, float) if field.type is float else field.type)
            ok = ok and (field.type is bool or not isinstance(value, bool))
            if ok and field.type in (int, float):  # counts at least 1 (two may be 0), rates positive and finite
                ok = math.isfinite(value) and (value > 0 or value == 0 and field.name in ("kv_floor", "recover_rank"))
            if ok and field.name in choices:
                ok = value in choices[field.name]
            if not ok:
                raise UsageError(f"invalid --{field.name.replace('_', '-')} {value!r}")


# ---- 1. Loading the model ------------------------------------------------------------------------
def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """cuda with bf16 when available, else cpu with float32; explicit choices win."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown --device {device!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA device")
    if dtype is None:
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"unknown --dtype {dtype!r}; use float32, bfloat16 or float16")
    return device, getattr(torch, dtype)


def load_config(name: str):
    """The model's config, read without its weights: enough to refuse a model early."""
    with reading(f"a model config from {name!r}"):
        config = modeling_grasprune.load_config(name)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"model type {config.model_type!r} is not supported; GRASPrune supports decoder-only "
                         f"LLaMA-family models: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return config


def load_model(name: str, device: str | None = None, dtype: str | None = None, device_map: str | dict | None = None):
    """Model and tokenizer of a hub id, folder, .gguf file or GRASPrune checkpoint, in eval mode and
    frozen. `device_map` ("auto") spreads a model over several GPUs and CPU memory (accelerate)."""
    device, torch_dtype = resolve_device_dtype(device, dtype)
    load_config(name)
    with reading(f"the model {name!r}"):  # truncated weights, a folder without them, a cut GGUF file
        model, tokenizer = load_pretrained(name, dtype=torch_dtype, device_map=device_map or str(device))
    return model.eval().requires_grad_(False), tokenizer


def shard(model, mesh: DeviceMesh) -> None:
    """FSDP2: every decoder layer, then the rest (embeddings, final norm, lm_head), split over the ranks;
    a layer's weights are gathered whole only while it runs, forward or backward."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def input_device(model) -> torch.device:
    """Where input ids go: the embedding's execution device (offloaded, its weight is on 'meta')."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    return torch.device(hook.execution_device) if hook else embedding.weight.device


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: (0, 1) unless torchrun started a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def progress(iterable=None, **kwargs) -> tqdm:
    """A progress bar, shown by rank 0 alone under torchrun."""
    return tqdm(iterable, disable=rank_and_world()[0] > 0, **kwargs)


# ---- 2. Calibration data -------------------------------------------------------------------------
def check_sequence_length(length: int, config) -> None:
    """Calibration sequences need a next token to predict, at positions the model was trained on."""
    if not 2 <= length <= config.max_position_embeddings:
        raise UsageError(f"calibration sequences of {length} tokens: the model needs 2 to "
                         f"{config.max_position_embeddings} (its context length)")


def calibration_batches(tokenizer, text: str, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(N, L) token ids: N non-overlapping L-token windows of the text, chosen by a seeded permutation."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = ids.numel() // seq_len
    if windows < n:
        raise UsageError(f"too little calibration text: {ids.numel()} tokens make {windows} sequences of "
                         f"{seq_len} tokens, {n} needed (lower --nsamples or --seq-len)")
    chosen = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[:n]
    return ids[: windows * seq_len].view(windows, seq_len)[chosen]


# ---- 3. Prunable units and their parameter costs -------------------------------------------------

# Which slice of which decoder-layer parameter each unit owns, as (unit index kind, dim): "ffn"
# indexes FFN channels, "kv" the head_dim rows of a K or V head, "q" the g * head_dim rows (or o_proj
# columns) of the query heads that share one KV head. Pruning and costing both read this table, so a
# unit costs exactly what slicing it removes. o_proj's and down_proj's output biases stay.
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


@dataclasses.dataclass(frozen=True)
class Units:
    """All prunable units in one flat vector, the layout of scores, masks and scales: every FFN
    channel (layer by layer), then every KV group (layer by layer)."""

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

    @property
    def total_cost(self) -> int:
        return self.num_layers * (self.ffn_per_layer * self.ffn_cost + self.kv_per_layer * self.kv_cost)

    def ffn(self, flat: torch.Tensor) -> torch.Tensor:  # (num_layers, ffn_per_layer) view
        return flat[: self.num_ffn].view(self.num_layers, self.ffn_per_layer)

    def kv(self, flat: torch.Tensor) -> torch.Tensor:  # (num_layers, kv_per_layer) view
        return flat[self.num_ffn :].view(self.num_layers, self.kv_per_layer)

    def costs(self, device: torch.device) -> torch.Tensor:
        """Exact parameter cost of every unit (int64)."""
        ffn = torch.full((self.num_ffn,), self.ffn_cost, dtype=torch.long, device=device)
        return torch.cat([ffn, torch.full((self.count - self.num_ffn,), self.kv_cost, dtype=torch.long, device=device)])


ALREADY_PRUNED = "this model is already pruned (its layers differ in width); start from a dense model"


def find_units(model) -> Units:
    """The prunable units of a dense model, with costs read off its layer shapes."""
    if model.config.is_heterogeneous:
        raise UsageError(ALREADY_PRUNED)
    attn = model.model.layers[0].self_attn
    head_dim, group = attn.head_dim, attn.num_key_value_groups
    rows_per_unit = {"ffn": 1, "kv": head_dim, "q": group * head_dim}
    cost = {"ffn": 0, "kv": 0, "q": 0}
    for name, param in model.model.layers[0].named_parameters():
        if name in UNIT_SLICES:
            kind, dim = UNIT_SLICES[name]
            cost[kind] += param.numel() // param.shape[dim] * rows_per_unit[kind]
    return Units(num_layers=len(model.model.layers), ffn_per_layer=model.model.layers[0].mlp.gate_proj.out_features,
                 kv_per_layer=attn.k_proj.out_features // head_dim, heads_per_group=group, head_dim=head_dim,
                 ffn_cost=cost["ffn"], kv_cost=cost["kv"] + cost["q"])


# ---- 4. Gates: every unit's output times its entry of a flat gate vector -------------------------
class Gates:
    """Forward pre-hooks that multiply the input of down_proj (one entry per FFN channel) and of o_proj
    (one per KV group, shared by its query heads) by `values`: a gate of 0 removes the unit exactly as
    slicing it out would, and the weights stay untouched."""

    def __init__(self, model, units: Units):
        self.values: torch.Tensor = torch.ones(units.count)
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(partial(self.gate, units.ffn, i)))
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(partial(self.gate, units.kv, i)))

    def gate(self, view: Callable, layer: int, module, args):
        x = args[0]  # (..., units in the layer * features per unit)
        gate = view(self.values)[layer].to(x)
        return (x.unflatten(-1, (gate.numel(), -1)) * gate[:, None]).flatten(-2)

    def __enter__(self) -> Self:  # installed for the duration of a with-block
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


# ---- 5. Projection onto the global budget --------------------------------------------------------
def budget_for(units: Units, sparsity: float, kv_floor: int = 1) -> int:
    """Parameters that the kept units may hold: (1 - sparsity) of all prunable parameters. The
    per-layer minimum (one FFN unit, and `kv_floor` KV groups) is reserved inside it."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise UsageError(f"--sparsity must lie strictly between 0 and 1, got {sparsity!r}")
    budget = math.floor((1.0 - sparsity) * units.total_cost)
    reserve = units.num_layers * (units.ffn_cost + kv_floor * units.kv_cost)
    if budget < reserve:
        raise UsageError(
            f"sparsity {sparsity} leaves {budget:,} parameters, fewer than the {reserve:,} needed to keep "
            f"one FFN unit{' and one KV group' if kv_floor else ''} in every layer"
            + ("; --kv-floor 0 lets a layer drop its attention" if kv_floor else ""))
    return budget


@torch.no_grad()
def project_to_budget(scores: torch.Tensor, costs: torch.Tensor, budget: int, units: Units,
                      kv_floor: int = 1) -> torch.Tensor:
    """Hard 0/1 mask of the highest-scoring units that fit the budget (boolean, flat layout). Each
    layer's best FFN unit and (kv_floor 1) KV group are reserved; the rest are taken greedily by score,
    skipping any that no longer fits. Ties go to the lower index (stable sort, first argmax)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    layer_starts = torch.arange(units.num_layers, device=scores.device)
    keep[units.ffn(scores).argmax(1) + layer_starts * units.ffn_per_layer] = True
    if kv_floor:
        keep[units.kv(scores).argmax(1) + layer_starts * units.kv_per_layer + units.num_ffn] = True
    remaining = budget - int(costs[keep].sum())
    order = torch.argsort(scores, descending=True, stable=True)
    candidates = order[~keep[order]]
    # Greedy with skips, vectorized: take the longest prefix that fits; once a unit of cost c does
    # not fit, no unit costing c or more ever will, so drop those and go on. This loops at most
    # once per distinct unit cost (two here).
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


def in_blocks(units: Units, multiple: int) -> Units:
    """The same units with every `multiple` FFN channels of a layer taken as one unit: the layout
    in which --ffn-multiple projects the final mask."""
    if units.ffn_per_layer % multiple:
        raise UsageError(f"--ffn-multiple {multiple} does not divide the FFN width {units.ffn_per_layer}")
    return dataclasses.replace(units, ffn_per_layer=units.ffn_per_layer // multiple, ffn_cost=units.ffn_cost * multiple)


@torch.no_grad()
def project_aligned(scores: torch.Tensor, budget: int, units: Units, kv_floor: int, multiple: int) -> torch.Tensor:
    """The final mask (flat, per channel) with every kept FFN width a multiple of `multiple`: each
    layer's channels, ranked by score, form blocks scored by their mean, which the budget takes or
    leaves whole, so a layer always keeps its best-scored channels."""
    blocks = in_blocks(units, multiple)
    ranked, order = units.ffn(scores).sort(dim=1, descending=True, stable=True)
    block_scores = ranked.unflatten(1, (blocks.ffn_per_layer, multiple)).mean(-1)
    keep = project_to_budget(torch.cat([block_scores.flatten(), units.kv(scores).flatten()]),
                             blocks.costs(scores.device), budget, blocks, kv_floor)
    widths = blocks.ffn(keep).sum(1, keepdim=True) * multiple
    best = torch.arange(units.ffn_per_layer, device=scores.device) < widths  # in ranked order
    return torch.cat([torch.zeros_like(best).scatter(1, order, best).flatten(), blocks.kv(keep).flatten()])


# ---- 6. Gate training: hard mask forward, sigmoid(score / tau) backward --------------------------
def straight_through(scores: torch.Tensor, hard: torch.Tensor, tau: float) -> torch.Tensor:
    """Forward value: exactly the hard mask; gradient: d sigmoid(score / tau) / d score.
    (The parentheses matter: hard + soft - soft would not be exactly 0 or 1 in floating point.)"""
    soft = torch.sigmoid(scores / tau)
    return hard + (soft - soft.detach())


class Targets(NamedTuple):
    """The dense model's next-token distribution at every calibration token, computed once: top-k ids
    and log-probabilities, and the log of the mass left to all other tokens. (N, L, k), (N, L, k),
    (N, L): 2 GiB for LLaMA-2-7B at 512 x 512 tokens and k = 1024 (full distributions: 16 GiB)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor

    def split(self, size: int) -> list["Targets"]:
        return [Targets(*parts) for parts in zip(*(t.split(size) for t in self))]


def log_tail_mass(top_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(top k)), in float64 so that it does not cancel, floored at float32's resolution;
    teacher and student share the arithmetic, so a student equal to the teacher has a loss of 0."""
    return (1 - top_logprobs.double().exp().sum(-1)).clamp_min(2**-24).log().float()


@torch.no_grad()
def teacher_targets(model, data: torch.Tensor, batch_size: int, k: int = Recipe.top_k) -> Targets:
    """The dense model's predictions on the calibration data, once, instead of at every step."""
    device, parts = input_device(model), []
    for step, batch in enumerate(progress(data.split(batch_size), desc="teacher targets"), 1):
        logprobs = model(input_ids=batch.to(device), use_cache=False).logits.float().log_softmax(-1)
        top, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        if top.isnan().any():
            raise UsageError(f"the dense model's predictions on calibration batch {step} are not finite: check its "
                             "weights, or use float32/bfloat16 rather than float16")
        parts.append((ids.int().to(device), top.to(device), log_tail_mass(top).to(device)))
    return Targets(*(torch.cat(p) for p in zip(*parts)))


def distillation_loss(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    """KL divergence from the dense model's next-token distribution to the gated model's over the k + 1
    outcomes the targets keep (each top-k token, any other token), mean over tokens. It costs what the
    LM loss costs: one log-softmax over the vocabulary."""
    student = logits.float().log_softmax(-1).gather(-1, targets.ids.long())
    teacher, tail = targets.logprobs, targets.log_tail
    kl = (teacher.exp() * (teacher - student)).sum(-1) + tail.exp() * (tail - log_tail_mass(student))
    return kl.mean()


def calibration_loss(model, batch: torch.Tensor, targets: Targets | None = None) -> torch.Tensor:
    """The loss of gate training, scaling and recovery: next-token cross-entropy (the paper's) or, given
    the dense model's `targets`, self-distillation (no second model is held)."""
    batch = batch.to(input_device(model))
    if targets is None:
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    return distillation_loss(model(input_ids=batch, use_cache=False).logits, targets)


def with_targets(data: torch.Tensor, targets: Targets | None, batch_size: int) -> list:
    """The calibration batches, each with its slice of the teacher's targets (None for the LM loss)."""
    batches = data.split(batch_size)
    return list(zip(batches, targets.split(batch_size) if targets else [None] * len(batches)))


def rank_share(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Data parallelism (torchrun): this rank's calibration sequences, its `batch_size` of every global
    batch of world size x `batch_size`, so N ranks at batch b take the steps of one process at N x b."""
    rank, world = rank_and_world()
    if world > 1 and len(data) % (world * batch_size):
        raise UsageError(f"{len(data)} calibration sequences do not split into {world} ranks x batches of {batch_size}")
    return data.unflatten(0, (-1, world, batch_size))[:, rank].flatten(0, 1) if world > 1 else data


def averaged(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over the data-parallel ranks, in place: every rank then holds the same gradient (and
    loss), hence the same scores, mask and stopping step. In one process, the tensor as it is."""
    if dist.is_initialized():
        dist.all_reduce(tensor)  # a sum: gloo has no average
        tensor /= dist.get_world_size()
    return tensor


def stop_if_not_finite(loss: float, stage: str, step: int, learned: bool = True) -> None:
    """A NaN or infinite loss means the run is broken: stop before anything is saved. Before the
    first update (or with nothing `learned`) the model itself is to blame, not the lr."""
    if not math.isfinite(loss):
        fix = ("the model's own forward is not finite: check its weights, or use float32/bfloat16 rather than "
               "float16" if step == 1 or not learned else "try a lower --lr, or float32/bfloat16 rather than float16")
        raise UsageError(f"{stage} step {step}: the loss is {loss}; stopped, nothing saved ({fix})")


IMPORTANCE_BATCHES = 32


def importance_scores(model, units: Units, data: torch.Tensor, budget: int, batch_size: int = 1,
                      kv_floor: int = 1) -> torch.Tensor:
    """Initial scores (--init importance): the empirical Fisher of each gate, mean (dL/dg)^2 over the
    first IMPORTANCE_BATCHES batches with every unit kept (the loss's rise when the unit goes, to second
    order), per parameter of the unit, on a log scale, standardized, and shifted so the best unit left
    out of the first mask sits at 0, where the straight-through gradient is largest."""
    device = input_device(model)
    fisher = torch.zeros(units.count, device=device)
    values = torch.ones(units.count, device=device, requires_grad=True)
    batches = data.split(batch_size)[:IMPORTANCE_BATCHES]
    with Gates(model, units) as gates:
        for step, batch in enumerate(progress(batches, desc="unit importance"), 1):
            gates.values = values
            loss = calibration_loss(model, batch)
            stop_if_not_finite(averaged(loss.detach().clone()).item(), "unit importance", step, learned=False)
            (grad,) = torch.autograd.grad(loss, values)
            fisher += averaged(grad).square() / len(batches)
    costs = units.costs(device)
    log_ratio = (fisher / costs).clamp_min(torch.finfo(torch.float32).tiny).log()
    z = (log_ratio - log_ratio.mean()) / log_ratio.std()
    if not torch.isfinite(z).all():
        raise UsageError("unit importance is not finite (no gradient reached the gates); use --init zeros")
    left_out = ~project_to_budget(z, costs, budget, units, kv_floor)
    return z - z[left_out].max() if left_out.any() else z


@contextlib.contextmanager
def activation_checkpointing(model, enabled: bool):
    """Recompute each layer's activations in the backward pass: memory for compute. transformers
    checkpoints only layers in training mode, so only their own flag is set (dropout stays off)."""
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
    model, units: Units, data: torch.Tensor, budget: int, recipe: Recipe,
    scores: torch.Tensor | None = None, targets: Targets | None = None, project=project_to_budget,
) -> tuple[torch.Tensor, list[dict]]:
    """Learn one score per unit under the global budget, from `scores` (default 0, the paper's), on
    the distillation loss given `targets`, else the LM loss; `project` maps scores to the hard mask.
    Returns the scores and, per step, the loss, the kept cost and how many units flipped."""
    device = input_device(model)
    costs = units.costs(device)
    scores = (torch.zeros(units.count, device=device) if scores is None else scores.clone()).requires_grad_()
    optimizer = torch.optim.AdamW([scores], lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.0)
    batches = with_targets(data, targets, recipe.batch_size)
    history, previous = [], None
    with Gates(model, units) as gates, progress(total=recipe.epochs * len(batches), desc="gate training") as bar:
        for _ in range(recipe.epochs):
            for batch, target in batches:
                hard = project(scores.detach(), costs, budget, units, recipe.kv_floor)
                gates.values = straight_through(scores, hard.float(), recipe.tau)
                loss = calibration_loss(model, batch, target)
                loss.backward()
                averaged(scores.grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # Every figure of the step in one device-to-host copy (float64 holds the costs exactly).
                flipped = hard != (hard if previous is None else previous)
                loss_mean = averaged(loss.detach().clone())
                figures = (loss_mean, costs[hard].sum(), flipped.sum(), units.ffn(hard).sum(), units.kv(hard).sum())
                loss_value, kept_cost, flips, ffn, kv = torch.stack([f.double() for f in figures]).tolist()
                stop_if_not_finite(loss_value, "gate training", len(history) + 1)
                previous = hard
                history.append({"loss": loss_value, "kept_cost": int(kept_cost), "flips": int(flips)})
                bar.set_postfix(loss=f"{loss_value:.3f}", ffn=f"{ffn / units.num_ffn:.3f}",
                                kv=f"{kv / (units.count - units.num_ffn):.3f}", flips=int(flips))
                bar.update()
    return scores.detach(), history


# ---- 7. Scaling calibration: one bounded factor per kept unit, mask fixed ------------------------
def scale_values(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Gate values of the calibrated model: 1 + 0.5 * tanh(t) on kept units, 0 elsewhere."""
    return mask * (1.0 + 0.5 * torch.tanh(t))


def calibrate_scales(model, units: Units, mask: torch.Tensor, data: torch.Tensor, recipe: Recipe,
                     targets: Targets | None = None) -> torch.Tensor:
    """One epoch over the per-unit scales, mask fixed, on gate training's loss: the gate values to
    fold into the weights. The kept set, hence the parameter count, does not change."""
    mask = mask.float()
    t = torch.zeros(units.count, device=mask.device, requires_grad=True)
    optimizer = torch.optim.AdamW([t], lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.0)
    batches = with_targets(data, targets, recipe.batch_size)
    with Gates(model, units) as gates, progress(total=len(batches), desc="scaling calibration") as bar:
        for step, (batch, target) in enumerate(batches, 1):
            gates.values = scale_values(mask, t)
            loss = calibration_loss(model, batch, target)
            loss.backward()
            averaged(t.grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = averaged(loss.detach().clone()).item()  # one device-to-host copy per step
            stop_if_not_finite(loss_value, "scaling calibration", step)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            bar.update()
    return scale_values(mask, t).detach()


# ---- 8. Folding and slicing into a smaller dense model -------------------------------------------
def head_rows(heads: torch.Tensor, rows_per_head: int) -> torch.Tensor:
    """Row indices of the given heads in a projection with `rows_per_head` rows per head."""
    return (heads[:, None] * rows_per_head + torch.arange(rows_per_head, device=heads.device)).flatten()


def sliced_state(weights: dict, ffn_gate: torch.Tensor, kv_gate: torch.Tensor, units: Units) -> dict:
    """A decoder layer's weights holding only the units with a non-zero gate, each gate value folded
    into the unit's down_proj / o_proj columns (where the gate acts), so no parameter is added."""
    ffn_kept = ffn_gate.nonzero().flatten()
    kv_kept = kv_gate.nonzero().flatten()
    q_width = units.heads_per_group * units.head_dim
    index = {"ffn": ffn_kept, "kv": head_rows(kv_kept, units.head_dim), "q": head_rows(kv_kept, q_width)}
    fold = {"mlp.down_proj.weight": ffn_gate[ffn_kept],
            "self_attn.o_proj.weight": kv_gate[kv_kept].repeat_interleave(q_width)}
    state = {}
    for name, param in weights.items():
        if name in UNIT_SLICES:
            kind, dim = UNIT_SLICES[name]
            param = param.index_select(dim, index[kind].to(param.device))
        if name in fold:
            param = (param.float() * fold[name].to(param.device)).to(param.dtype)
        state[name] = param
    return state


def slice_layer(layer, layer_config, ffn_gate: torch.Tensor, kv_gate: torch.Tensor, units: Units):
    """A new decoder layer of the widths in `layer_config`, holding the layer's sliced weights."""
    # Under accelerate dispatch (--device-map) the layer carries a hook that runs it on its execution
    # device, and an offloaded layer (CPU or disk) keeps its weights in its hooks. The sliced layer goes
    # where the dense one was: on its device, or offloaded to CPU memory (never onto a full accelerator).
    offloaded = any(p.device.type == "meta" for p in layer.parameters())
    if offloaded:
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        weights = get_state_dict_offloaded_model(layer)  # read into CPU memory
    else:
        weights = layer.state_dict()
    state = sliced_state(weights, ffn_gate, kv_gate, units)
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


def fill_shards(module, state: dict, mesh: DeviceMesh) -> None:
    """Copy into each sharded parameter of `module` its rank's part of `state` (whole tensors, or
    DTensors sharded alike)."""
    for name, param in module.state_dict().items():  # DTensors that share the parameters' storage
        if name in state and param.numel():  # (an attention-free layer's o_proj has no column)
            source = state[name]
            if not isinstance(source, DTensor):
                source = distribute_tensor(source, mesh, param.placements, src_data_rank=None)  # local slice
            param.to_local().copy_(source.to_local())


def slice_sharded(model, units: Units, gate: torch.Tensor):
    """slice_model under FSDP2: a new model of the sliced widths, sharded alike, filled one gathered
    tensor at a time; each dense layer goes once its twin is filled, so no rank holds a whole layer."""
    mesh = model.model.embed_tokens.weight.device_mesh
    with torch.device("meta"):
        sliced = PRUNED_CLASSES[model.config.model_type]._from_config(model.config, dtype=model.dtype)
    sliced.eval().requires_grad_(False)
    shard(sliced, mesh)
    sliced.to_empty(device=input_device(model))
    for i, layer in enumerate(sliced.model.layers):
        ffn_gate, kv_gate = units.ffn(gate)[i], units.kv(gate)[i]
        for name, tensor in model.model.layers[i].state_dict().items():
            fill_shards(layer, sliced_state({name: tensor.full_tensor()}, ffn_gate, kv_gate, units), mesh)
        model.model.layers[i] = torch.nn.Identity()  # its shards are freed
    fill_shards(sliced, {n: t for n, t in model.state_dict().items() if not n.startswith("model.layers.")}, mesh)
    for name, buffer in sliced.named_buffers():
        buffer.copy_(model.get_buffer(name))
    return sliced


def slice_model(model, units: Units, gate: torch.Tensor):
    """Replace every decoder layer by its sliced twin, in place, record the shapes in the config's
    `per_layer_config`, and make the model an instance of modeling_grasprune's class that reads them.
    A model sharded by FSDP2 is sliced into a new sharded model, which is returned."""
    config = model.config
    kept_ffn = units.ffn(gate).count_nonzero(1).tolist()
    kept_kv = units.kv(gate).count_nonzero(1).tolist()
    # Qwen2 derives head_dim from num_attention_heads, which now varies per layer; and the dense
    # classes' own __init__/validation read the global values, so they must stay readable.
    config.head_dim = units.head_dim
    config.allow_global_per_layer_attribute_access = True
    config.per_layer_config = {
        i: {"intermediate_size": f, "num_key_value_heads": k, "num_attention_heads": k * units.heads_per_group}
        for i, (f, k) in enumerate(zip(kept_ffn, kept_kv))
    }
    if isinstance(model, FSDPModule):
        return slice_sharded(model, units, gate)
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = slice_layer(layers[i], config.per_layer_config[i], units.ffn(gate)[i], units.kv(gate)[i], units)
    model.__class__ = PRUNED_CLASSES[config.model_type]  # the stock class plus the per-layer __init__
    return model


# ---- 9. Recovery: a low-rank correction of the kept weights, distilled, then merged ---------------
RECOVERED = tuple(name.removesuffix(".weight") for name in UNIT_SLICES if name.endswith(".weight"))  # all 7


class LowRank:
    """Forward hooks that add x A^T B^T to the output of each kept linear layer named in `matrices`: a
    rank-r correction B A of its weight, A random and B zero (float32), so the model starts as it was.
    A layer left with no attention has no q/k/v and an o_proj of no column: nothing to correct there."""

    def __init__(self, model, rank: int, matrices: tuple[str, ...] = RECOVERED, seed: int = 0):
        generator, self.factors = torch.Generator().manual_seed(seed), []
        for layer in model.model.layers:
            modules = dict(layer.named_modules())
            for linear in (modules[name] for name in matrices if name in modules and modules[name].weight.numel()):
                a = torch.randn(rank, linear.in_features, generator=generator) / math.sqrt(linear.in_features)
                b = torch.zeros(linear.out_features, rank)
                device = linear._hf_hook.execution_device if linear.weight.is_meta else linear.weight.device
                self.factors.append((linear, *(t.to(device).requires_grad_() for t in (a, b))))
        self.handles = [linear.register_forward_hook(partial(self.add, a, b)) for linear, a, b in self.factors]

    @staticmethod
    def add(a: torch.Tensor, b: torch.Tensor, module, args, output):
        # In the model's dtype: autograd keeps x as it is (a bf16 model keeps no float32 copy of it).
        return output + args[0] @ a.T.to(output.dtype) @ b.T.to(output.dtype)

    def parameters(self) -> list[torch.Tensor]:
        return [t for _, a, b in self.factors for t in (a, b)]

    @torch.no_grad()
    def merge(self) -> None:
        """Remove the hooks and fold every B A into its weight, in float32: the shapes, hence the budget,
        stay. Under FSDP2 each rank adds its shard's rows (every rank holds the same factors)."""
        for handle in self.handles:
            handle.remove()
        for linear, a, b in self.factors:
            weight, delta = linear.weight, b @ a
            if weight.is_meta:  # offloaded by --device-map: the copy in CPU memory each forward fetches
                weight = linear._hf_hook.weights_map["weight"]
            if isinstance(weight, DTensor):
                delta = distribute_tensor(delta, weight.device_mesh, weight.placements, src_data_rank=None).to_local()
                weight = weight.to_local()
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


def recover_weights(model, data: torch.Tensor, recipe: Recipe, targets: Targets | None = None,
                    low_rank: LowRank | None = None, epochs: int = 1) -> list[float]:
    """Recovery (this project's, not the paper's): on the sliced model, one epoch of gate training's
    loss over a rank-`recover_rank` correction of every kept linear layer, merged at the end. Only the
    factors train: no dense weight gradient, optimizer state for them alone. Returns each step's loss."""
    low_rank, history = low_rank or LowRank(model, recipe.recover_rank), []
    factors, batches = low_rank.parameters(), with_targets(data, targets, recipe.batch_size) * epochs
    optimizer = torch.optim.AdamW(factors, lr=recipe.recover_lr, betas=(0.9, 0.99), weight_decay=0.0)
    # Step k of n at lr (1 - k/n): held constant, a rate high enough to gain more diverges (docs/ablations.md).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / len(batches))
    with progress(batches, desc="recovery") as bar:
        for batch, target in bar:
            loss = calibration_loss(model, batch, target)
            loss.backward()
            if dist.is_initialized():  # one all-reduce for all the factors' gradients, not one per tensor
                flat = averaged(torch.cat([f.grad.flatten() for f in factors]))
                for factor, grad in zip(factors, flat.split([f.numel() for f in factors])):
                    factor.grad = grad.view_as(factor)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(averaged(loss.detach().clone()).item())
            stop_if_not_finite(history[-1], "recovery", len(history))
            bar.set_postfix(loss=f"{history[-1]:.3f}")
    low_rank.merge()
    return history


# ---- 10. The method in one call ------------------------------------------------------------------
def check_inputs(model, data, sparsity: float, recipe: Recipe) -> tuple[Units, int]:
    """prune()'s preconditions, each refused with a UsageError that names it, before the model is
    touched: the recipe, a supported dense model, the budget, and token ids the model can read.
    Returns the units and the final mask's budget."""
    recipe.validate()
    if getattr(model.config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"model type {model.config.model_type!r} is not supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    units = find_units(model)
    budget = budget_for(in_blocks(units, recipe.ffn_multiple), sparsity, recipe.kv_floor)  # the final mask's
    if not isinstance(data, torch.Tensor) or data.dtype not in (torch.long, torch.int) or data.dim() != 2:
        shape = f"a {data.dim()}-D {data.dtype} tensor" if isinstance(data, torch.Tensor) else type(data).__name__
        raise UsageError(f"data must be a 2-D int64 tensor of token ids (sequences x tokens), got {shape}")
    if data.shape[0] == 0:
        raise UsageError("data holds no calibration sequence")
    check_sequence_length(data.shape[1], model.config)
    if data.min() < 0 or data.max() >= model.config.vocab_size:
        raise UsageError(f"data holds token ids outside the model's vocabulary (0 to {model.config.vocab_size - 1}): "
                         f"{int(data.min())} to {int(data.max())}")
    return units, budget


def prune(model, data: torch.Tensor, sparsity: float = 0.5, recipe: Recipe = Recipe(), *,
          gradient_checkpointing: bool = False, evaluate: Callable | None = None,
          project=project_to_budget) -> tuple[torch.nn.Module, dict]:
    """GRASPrune (steps 3 to 9) on a loaded model, which is frozen, pruned in place and returned with a
    report; bad input raises UsageError before the model is touched. `data`: (N, L) calibration token
    ids. `evaluate(model)`, if given, scores the dense, masked and pruned model; `project`: the mask rule."""
    units, budget = check_inputs(model, data, sparsity, recipe)
    data = rank_share(data, recipe.batch_size)  # all of it in one process
    model.eval().requires_grad_(False)  # only the scores train: no weight gradient is ever allocated
    timings, memory, evaluations, clock = {}, {}, {}, time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.perf_counter() - clock, 2)
        memory[stage] = peak_memory_gib()
        clock = time.perf_counter()

    costs, before = units.costs(input_device(model)), model_summary(model)
    print(f"[grasprune] {units.count:,} units ({units.num_ffn:,} FFN channels of {units.ffn_cost:,} params, "
          f"{units.count - units.num_ffn:,} KV groups of {units.kv_cost:,}); budget {budget:,} of {units.total_cost:,}")
    if evaluate:
        evaluations["dense"] = evaluate(model)
        lap("eval_dense")
    with activation_checkpointing(model, gradient_checkpointing):
        targets = teacher_targets(model, data, recipe.batch_size, recipe.top_k) if recipe.loss == "kd" else None
        lap("teacher_targets")
        init = (importance_scores(model, units, data, budget, recipe.batch_size, recipe.kv_floor)
                if recipe.init == "importance" else None)
        lap("importance")
        scores, history = train_gates(model, units, data, budget, recipe, init, targets, project)
        if recipe.ffn_multiple == 1:
            mask = project(scores, costs, budget, units, recipe.kv_floor)
        else:  # trained channel by channel, kept in whole blocks
            mask = project_aligned(scores, budget, units, recipe.kv_floor, recipe.ffn_multiple)
        lap("gate_training")
    if evaluate:
        with Gates(model, units) as gates:
            gates.values = mask.float()
            evaluations["masked"] = evaluate(model)
        lap("eval_masked")
    with activation_checkpointing(model, gradient_checkpointing):
        gate = calibrate_scales(model, units, mask, data, recipe, targets) if recipe.rescale else mask.float()
    lap("scaling_calibration")
    model = slice_model(model, units, gate)
    after = model_summary(model)
    lap("slicing")
    with activation_checkpointing(model, gradient_checkpointing):
        recovery = recover_weights(model, data, recipe, targets) if recipe.recover_rank else []
    lap("recovery")
    if evaluate:
        evaluations["pruned"] = evaluate(model)
        lap("eval_pruned")
    tenth = history[-max(1, len(history) // 10):]
    return model, {
        "sparsity": sparsity, "recipe": dataclasses.asdict(recipe), "units": dataclasses.asdict(units),
        "budget": budget, "before": before, "after": after,
        "parameters_removed": 1 - after["parameters"] / before["parameters"],
        "prunable_removed": 1 - after["prunable_parameters"] / before["prunable_parameters"],
        "steps": len(history), "final_flips": history[-1]["flips"], "final_loss": history[-1]["loss"],
        "mean_flips_last_tenth": sum(h["flips"] for h in tenth) / len(tenth),  # has the mask settled?
        "recovery_loss": {"first": recovery[0], "final": recovery[-1]} if recovery else None,
        "layers": layer_table(model, units), "eval": evaluations, "seconds": timings, "peak_memory_gib": memory,
        "world_size": rank_and_world()[1],
    }


# ---- 11. The report's figures --------------------------------------------------------------------
def peak_memory_gib() -> dict[str, float]:
    """Peak memory since the previous call: tensors on each GPU in use, and the process's resident
    CPU memory (Linux keeps no resettable peak, so this one is the peak since the start)."""
    peaks = {}
    for i in range(torch.cuda.device_count() if torch.cuda.is_initialized() else 0):
        if torch.cuda.max_memory_allocated(i):
            peaks[f"cuda:{i}"] = round(torch.cuda.max_memory_allocated(i) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(i)
    peaks["cpu_rss"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB -> GiB
    return peaks


def kv_width_of(layer) -> int:
    """Rows of a decoder layer's k_proj (0 when the layer has no attention left)."""
    k_proj = getattr(layer.self_attn, "k_proj", None)
    return 0 if k_proj is None else k_proj.out_features


def model_summary(model) -> dict:
    """Parameters (tied ones once), prunable parameters, KV-cache bytes per token, and the bytes of
    weights this rank holds (all of them, or with FSDP2 its shards)."""
    prunable = sum(p.numel() for layer in model.model.layers for n, p in layer.named_parameters() if n in UNIT_SLICES)
    kv_width = sum(kv_width_of(layer) for layer in model.model.layers)
    held = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
    return {"parameters": sum(p.numel() for p in model.parameters()), "prunable_parameters": prunable,
            "kv_cache_bytes_per_token": 2 * kv_width * model.dtype.itemsize, "weight_bytes_on_rank": held}


def layer_table(model, units: Units) -> list[dict]:
    """Kept FFN channels, KV groups and query heads of every layer, with its parameters."""
    return [{"layer": i, "ffn_channels": layer.mlp.gate_proj.out_features,
             "kv_groups": kv_width_of(layer) // units.head_dim,
             "query_heads": kv_width_of(layer) // units.head_dim * units.heads_per_group,
             "parameters": sum(p.numel() for p in layer.parameters())} for i, layer in enumerate(model.model.layers)]


if __name__ == "__main__":
    # The running file is the `grasprune` module that eval.py and export_gguf.py import: one module,
    # one UsageError class (a second copy's refusals would escape this one's boundary as tracebacks).
    sys.modules["grasprune"] = sys.modules[__name__]
    # SIGTERM (timeout, kill, Slurm, docker stop) unwinds like Ctrl-C, so the temporary folder of a
    # checkpoint being saved is removed; the exit status stays the conventional 128 + 15.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    import cli  # the command line lives beside the method, in cli.py

    sys.exit(cli.main())
