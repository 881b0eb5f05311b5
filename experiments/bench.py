"""Benchmarks for GRASPrune: what gating costs during calibration, and what pruning buys at serving.

  python experiments/bench.py overhead --model M   gate-training step vs a bare forward+backward of
                                                   the frozen model, saved-activation memory,
                                                   projection share
  python experiments/bench.py recipes --model M    a gate-training step of the defaults vs one of
                                                   the paper's recipe and a recovery step of the
                                                   model pruned at 0.5, side by side, their saved
                                                   activations, and the defaults' one-off costs
  python experiments/bench.py memory               gate-training memory per GPU of LLaMA-2-7B, 70B
                                                   and Llama-3.1-405B under FSDP2 (bf16, 512 tokens):
                                                   activations measured on random-weight models of
                                                   their shapes with 1 and 2 layers, the rest arithmetic
  python experiments/bench.py fsdp                 that arithmetic checked by torchrun --fsdp, 2 ranks
                                                   on this CPU, random weights, fewer layers
  python experiments/bench.py widths               time per FFN channel at odd and round widths
  python experiments/bench.py serving M1 M2 ...    parameters, weight and KV-cache bytes, prefill and
                                                   decode speed, peak memory; one process per model
  python experiments/bench.py ranks --model M      torchrun, N ranks x 1 thread at batch 1, against one
                                                   process x N threads at batch N: time per stage

Figures are printed, never asserted: speed depends on the machine.
"""

import copy
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # grasprune.py

import cli
import grasprune
from grasprune import Recipe


def seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@contextmanager
def saved_activation_bytes(total: list[int], model):
    """Adds up the memory autograd holds for the backward pass: every saved tensor's storage once, but
    the model's frozen weights, which it saves by reference (to compute the input's gradient)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    total[0] += sum(held.values())


# ----------------------------------------------------------------------------------------------
# Calibration overhead


def bare_step(model, batch: torch.Tensor) -> None:
    """Forward and backward of the frozen model with no gates: the gradient goes to the input
    embeddings only, so this is the least any gradient-based calibration step can cost."""
    embeds = model.get_input_embeddings()(batch).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=batch, use_cache=False).loss.backward()


# One epoch of gate training with the paper's recipe (LM loss, one gate per FFN channel).
PAPER_STEP = dataclasses.replace(Recipe.paper(), epochs=1)


def overhead(args) -> None:
    model, _ = grasprune.load_model(args.model, args.device, args.dtype)
    units = grasprune.find_units(model)
    budget = grasprune.budget_for(units, 0.5)
    seed = torch.Generator().manual_seed(0)
    data = torch.randint(model.config.vocab_size, (args.steps, args.seq_len), generator=seed)
    scores = torch.randn(units.count, device=model.device)
    costs = units.costs(model.device)

    # The real training loop over `steps` sequences (its setup amortized) vs bare passes over the same.
    def gate_steps():
        grasprune.train_gates(model, units, data, budget, PAPER_STEP)

    def bare_steps():
        for batch in data.split(1):
            bare_step(model, batch.to(model.device))

    gate = seconds(gate_steps, args.repeats) / args.steps
    bare = seconds(bare_steps, args.repeats) / args.steps
    project = seconds(lambda: grasprune.project_to_budget(scores, costs, budget, units), args.repeats)
    memory = {}
    for name, step in (("gate", lambda: grasprune.train_gates(model, units, data[:1], budget, PAPER_STEP)),
                       ("bare", lambda: bare_step(model, data[:1].to(model.device)))):
        total = [0]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with saved_activation_bytes(total, model):
            step()
        memory[name] = {"saved_activation_MiB": total[0] / 2**20}
        if torch.cuda.is_available():
            memory[name]["peak_cuda_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    assert all(p.grad is None for p in model.parameters()), "a weight gradient was allocated"
    print(json.dumps({
        "model": args.model, "device": str(model.device), "dtype": str(model.dtype), "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "gate_step_s": gate, "bare_step_s": bare, "overhead_ratio": gate / bare,
        "projection_s": project, "projection_share": project / gate, "memory": memory,
    }, indent=2))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def recipes(args) -> None:
    """A gate-training step of the defaults (distillation from cached targets) against one of the
    paper's recipe (LM loss), the same units and budget for both, and a recovery step of the model
    pruned at that budget (rank 32, the same targets): the loops over the same sequences, timed
    alternately (paper, defaults, recovery, paper, ...) so that load on the machine reaches all
    alike, medians taken; and the activations one step of each saves for its backward pass
    (one sequence). The defaults' one-off costs are timed too: the
    teacher's targets (one forward per sequence) and the importance pass (32 forward+backward),
    with the memory the targets take here and would take for LLaMA-2-7B."""
    model, _ = grasprune.load_model(args.model, args.device, args.dtype)
    device = grasprune.input_device(model)
    seed = torch.Generator().manual_seed(0)
    data = torch.randint(model.config.vocab_size, (args.steps, args.seq_len), generator=seed)
    default = dataclasses.replace(Recipe(), epochs=1)
    units = grasprune.find_units(model)
    budget = grasprune.budget_for(units, 0.5)
    start = time.perf_counter()
    targets = grasprune.teacher_targets(model, data, 1, default.top_k)
    teacher = (time.perf_counter() - start) / args.steps
    start = time.perf_counter()
    grasprune.importance_scores(model, units, data, budget)
    importance = time.perf_counter() - start
    pruned = copy.deepcopy(model)  # at a mask of the same budget: recovery's model (its weights move; timing only)
    mask = grasprune.project_to_budget(torch.randn(units.count, generator=seed), units.costs("cpu"), budget, units)
    pruned = grasprune.slice_model(pruned, units, mask.float().to(device))

    def first(n: int) -> grasprune.Targets:  # the targets of the first n sequences
        return grasprune.Targets(*(t[:n] for t in targets))

    steps = {"paper": lambda d: grasprune.train_gates(model, units, d, budget, PAPER_STEP),
             "default": lambda d: grasprune.train_gates(model, units, d, budget, default, targets=first(len(d))),
             "recovery": lambda d: grasprune.recover_weights(pruned, d, default, first(len(d)))}
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(data)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.steps)
    saved = {}
    for name, step in steps.items():
        total = [0]
        with saved_activation_bytes(total, pruned if name == "recovery" else model):
            step(data[:1])
        saved[name] = total[0] / 2**20
    per_token = default.top_k * 8 + 4  # int32 id + float32 log-probability per kept token, + the tail
    print(json.dumps({
        "model": args.model, "device": str(device), "dtype": str(model.dtype), "seq_len": args.seq_len,
        "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "paper_step_s": median(times["paper"]), "default_step_s": median(times["default"]),
        "recovery_step_s": median(times["recovery"]),
        "step_ratio": median(times["default"]) / median(times["paper"]),
        "pairwise_ratios": [d / p for p, d in zip(times["paper"], times["default"])],
        "recovery_to_default_pairwise": [r / d for d, r in zip(times["default"], times["recovery"])],
        "saved_activation_MiB_one_sequence": saved,
        "teacher_targets_s_per_sequence": teacher, "importance_s": importance,
        "targets_MiB_here": sum(t.nbytes for t in targets) / 2**20,
        "targets_MiB_512x512_tokens": 512 * 512 * per_token / 2**20,
        "full_distributions_GiB_512x512_bf16": {vocab: 512 * 512 * vocab * 2 / 2**30 for vocab in (32000, 128256)},
    }, indent=2))


# Decoder shapes of the models the docs size.
SHAPES = {
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000, "num_hidden_layers": 32},
    "llama-2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "vocab_size": 32000, "num_hidden_layers": 80},
    "llama-3.1-405b": {"hidden_size": 16384, "intermediate_size": 53248, "num_attention_heads": 128,
                       "num_key_value_heads": 8, "vocab_size": 128256, "num_hidden_layers": 126},
}
GIB = 2**30


def shaped(name: str, layers: int, **overrides):
    """A LlamaConfig with the named model's shapes and `layers` decoder layers."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[name] | {"num_hidden_layers": layers, "max_position_embeddings": 4096} | overrides)


def random_model(config):
    """Random weights in bf16, made in bf16 (a float32 copy of a 405B layer would not fit here)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)


def parameters_of(config) -> tuple[int, int]:
    """Parameters of one decoder layer, and of the rest (embeddings, final norm, lm_head)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return layer, sum(p.numel() for p in model.parameters()) - config.num_hidden_layers * layer


def saved_bytes(config, seq_len: int) -> int:
    """Memory autograd holds for the backward pass of one gate-training step (the paper's recipe,
    batch 1) on a random-weight model of `config`."""
    model = random_model(config)
    units = grasprune.find_units(model)
    data = torch.randint(config.vocab_size, (1, seq_len))
    total = [0]
    with saved_activation_bytes(total, model):
        grasprune.train_gates(model, units, data, grasprune.budget_for(units, 0.5), PAPER_STEP)
    return total[0]


def activations(name: str, seq_len: int, tiny_ffn: bool = False) -> tuple[int, int]:
    """Bytes saved for backward by one decoder layer of the named shapes, and by the rest (embeddings,
    logits, loss), at `seq_len` tokens: the rest from random-weight models of 1 and 2 layers (with
    `tiny_ffn`, layers of a 64-channel FFN, for shapes two of whose layers do not fit here), the
    layer from one of its own."""
    small = {"intermediate_size": 64} if tiny_ffn else {}
    one, two = (saved_bytes(shaped(name, layers, **small), seq_len) for layers in (1, 2))
    fixed = 2 * one - two
    return (saved_bytes(shaped(name, 1), seq_len) if tiny_ffn else one) - fixed, fixed


def per_gpu_bytes(name: str, ranks: int, per_layer: int, fixed: int, seq_len: int, dtype_bytes: int = 2) -> dict:
    """Gate training's memory on each of `ranks` GPUs under FSDP2 (1: one GPU, no FSDP), by arithmetic:
    the rank's shards of the weights; gathered whole during a step, the root (embeddings, lm_head,
    kept for the step) and two decoder layers (the one computing and the one prefetched), and FSDP2's
    all-gather buffer, which holds a group a second time while it is copied out; the activations of
    one sequence; the gate scores with their gradient and Adam's two moments (fp32)."""
    config = shaped(name, SHAPES[name]["num_hidden_layers"])
    layer, root = parameters_of(config)
    layers = config.num_hidden_layers
    units = layers * (config.intermediate_size + config.num_key_value_heads)
    sharded = ranks > 1  # one GPU holds the whole model and gathers nothing
    parts = {"weight_shards": dtype_bytes * (layers * layer + root) / ranks,
             "gathered_root_and_two_layers": sharded * dtype_bytes * (root + 2 * layer),
             "all_gather_buffer": sharded * dtype_bytes * max(root, layer),
             "activations": (layers * per_layer + fixed) * seq_len // SEQ_MEASURED, "gate_state": 16 * units}
    # --gradient-checkpointing keeps each layer's input (bf16) and one layer's activations at a time
    checkpointed = layers * seq_len * config.hidden_size * 2 + per_layer * seq_len // SEQ_MEASURED
    checkpointed += fixed * seq_len // SEQ_MEASURED
    return {k: v / GIB for k, v in parts.items()} | {
        "total": sum(parts.values()) / GIB,
        "total_with_gradient_checkpointing": (sum(parts.values()) - parts["activations"] + checkpointed) / GIB}


SEQ_MEASURED = 512  # the paper's sequence length: activations are measured there


def memory(args) -> None:
    """Gate training's memory per GPU at the paper's setting (bf16, 512 tokens, batch 1) for
    LLaMA-2-7B, LLaMA-2-70B and Llama-3.1-405B: activations measured on 1- and 2-layer random-weight
    models of their shapes (405B: 1 layer, its fixed part from 1 and 2 layers of a tiny FFN, as two of
    its layers do not fit here), the rest by arithmetic."""
    for name, ranks in (("llama-2-7b", (1, 8)), ("llama-2-70b", (8, 16)), ("llama-3.1-405b", (16, 32, 64))):
        per_layer, fixed = activations(name, SEQ_MEASURED, tiny_ffn=name == "llama-3.1-405b")
        row = {"activations_per_layer_GiB": per_layer / GIB, "fixed_activations_GiB": fixed / GIB}
        row |= {f"{n}_gpus": per_gpu_bytes(name, n, per_layer, fixed, SEQ_MEASURED) for n in ranks}
        print(json.dumps({name: row}, indent=2), flush=True)


# One rank of `torchrun grasprune.py --fsdp`, recording its memory: resident memory after the libraries
# load (the baseline) and its peak, in RANK<n>.json beside the output.
RANK_MEMORY = """
import json, os, resource, sys
sys.path.insert(0, {root!r})
import cli

def resident_gib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

baseline = resident_gib()
try:
    code = cli.main(sys.argv[1:])
finally:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with open(os.path.join({out!r}, "RANK" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump({{"baseline_gib": baseline, "peak_gib": peak}}, f)
sys.exit(code)
"""


def word_tokenizer(folder: Path) -> None:
    """A tokenizer of 258 ids (bytes and two specials): the random models need only some ids to read."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1} | {chr(i): i + 2 for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def fsdp(args) -> None:
    """The arithmetic of per_gpu_bytes checked on this CPU: `torchrun --nproc-per-node 2 grasprune.py
    --fsdp --paper` on random-weight models of LLaMA-2-7B's and LLaMA-2-70B's layer shapes with fewer
    layers, bf16, gloo; rank 1's peak resident memory above its baseline, against the prediction at
    that size (the largest of gate training's figure and slicing's: old shards, new shards, one whole
    tensor and its slice). Rank 0 also reads the dense model into CPU memory to send the shards."""
    root = str(Path(__file__).resolve().parent.parent)
    for name, layers in (("llama-2-7b", 4), ("llama-2-70b", 2)):
        config = shaped(name, layers)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            random_model(config).save_pretrained(tmp / "model")
            word_tokenizer(tmp / "model")
            (tmp / "calib.txt").write_text("".join(chr(32 + i % 90) for i in range(4 * args.seq_len)))
            (tmp / "rank.py").write_text(RANK_MEMORY.format(root=root, out=str(tmp)))
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(tmp / "rank.py"), "--model", str(tmp / "model"), "--calib", str(tmp / "calib.txt"),
                            "--nsamples", "2", "--seq-len", str(args.seq_len), "--epochs", "1", "--batch-size", "1",
                            "--paper", "--fsdp", "--dtype", "bfloat16", "--output", str(tmp / "out")],
                           check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
            ranks = [json.loads((tmp / f"RANK{r}.json").read_text()) for r in (0, 1)]
            report = json.loads((tmp / "out" / "grasprune_report.json").read_text())
        per_layer, fixed = activations(name, args.seq_len)
        layer, rest = parameters_of(config)
        shards = report["before"]["weight_bytes_on_rank"]
        training = shards + 2 * (rest + 2 * layer + max(rest, layer)) + layers * per_layer + fixed
        largest = 2 * config.intermediate_size * config.hidden_size  # an FFN matrix, bf16
        slicing = shards + report["after"]["weight_bytes_on_rank"] + 2 * largest
        measured = ranks[1]["peak_gib"] - ranks[1]["baseline_gib"]
        print(json.dumps({name: {
            "layers": layers, "seq_len": args.seq_len, "weight_bytes_on_rank_GiB": shards / GIB,
            "predicted_gate_training_GiB": training / GIB, "predicted_slicing_GiB": slicing / GIB,
            "rank1_measured_GiB": measured, "measured_over_predicted": measured * GIB / max(training, slicing),
            "rank0_measured_GiB": ranks[0]["peak_gib"] - ranks[0]["baseline_gib"],
            "dense_model_GiB": 2 * (layers * layer + rest) / GIB,
        }}, indent=2), flush=True)


# ----------------------------------------------------------------------------------------------
# Kernel efficiency of odd widths


@torch.inference_mode()
def widths(args) -> None:
    """Does a pruned FFN width that is not a multiple of 64 cost more per channel? Times one
    LLaMA MLP (gate, up, down) at widths on and off multiples of 64, for decode (1 token) and
    prefill (512 tokens). If odd widths cost no more per channel, rounding widths buys nothing."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    print(f"| FFN width | decode, us | prefill, ms | prefill, us per channel |  (hidden {args.hidden})")
    print("| ---: | ---: | ---: | ---: |")
    for width in args.widths:
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=width)
        mlp = LlamaMLP(config).to(args.device or "cpu", getattr(torch, args.dtype or "float32")).eval()
        weight = mlp.up_proj.weight
        one, many = (torch.randn(n, args.hidden, dtype=weight.dtype, device=weight.device) for n in (1, 512))
        decode = seconds(lambda mlp=mlp, x=one: mlp(x), args.repeats * 20)
        prefill = seconds(lambda mlp=mlp, x=many: mlp(x), args.repeats)
        print(f"| {width} | {decode * 1e6:.0f} | {prefill * 1e3:.2f} | {prefill * 1e6 / width:.3f} |")


# ----------------------------------------------------------------------------------------------
# Serving


@torch.inference_mode()
def serving_figures(name: str, args) -> dict:
    """Size, prefill and decode speed of one model, measured in this process."""
    model, _ = grasprune.load_model(name, args.device, args.dtype)
    summary = grasprune.model_summary(model)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (1, args.prompt_len), generator=g).to(model.device)
    prefill = seconds(lambda: model(prompt, use_cache=False), args.repeats)
    figures = {
        "model": name,
        "parameters": summary["parameters"],
        "weight_MiB": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "kv_cache_bytes_per_token": summary["kv_cache_bytes_per_token"],
        "prefill_tokens_per_s": args.prompt_len / prefill,
    }
    for batch_size in (1, 8):
        start = torch.randint(model.config.vocab_size, (batch_size, 16), generator=g).to(model.device)
        decode = seconds(lambda start=start: model.generate(
            start, attention_mask=torch.ones_like(start), do_sample=False, max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, pad_token_id=0), args.repeats)
        figures[f"decode_tokens_per_s_batch{batch_size}"] = batch_size * args.new_tokens / decode
    figures["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    if torch.cuda.is_available():
        figures["peak_cuda_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def serving(args) -> None:
    if len(args.models) == 1:  # the child process: one model, figures as JSON
        print(json.dumps(serving_figures(args.models[0], args)))
        return
    rows = []
    options = ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats)]
    options += [x for k in ("device", "dtype") if getattr(args, k) for x in (f"--{k}", getattr(args, k))]
    for name in args.models:  # a fresh process per model, so that peak memory is its own
        cmd = [sys.executable, __file__, "serving", name, *options]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    keys = list(rows[0])[1:]
    print("| " + " | ".join(["model", *keys]) + " |")
    print("|" + " --- |" * (len(keys) + 1))
    for row in rows:
        cells = [f"{row[k]:,.1f}" if isinstance(row[k], float) else f"{row[k]:,}" for k in keys]
        print("| " + " | ".join([row["model"], *cells]) + " |")
    base = rows[0]
    for row in rows[1:]:
        print(f"\n{row['model']} vs {base['model']}: weights x{base['weight_MiB'] / row['weight_MiB']:.2f} smaller; "
              + ", ".join(f"{k} x{row[k] / base[k]:.2f}" for k in keys if "per_s" in k))


STAGES = ("teacher_targets", "importance", "gate_training", "scaling_calibration")


def ranks(args) -> None:
    """Data parallelism on this machine's cores: grasprune.py under `torchrun --nproc-per-node N`, one
    thread per rank at batch 1, against one process with N threads at batch N (the same steps, the
    same result), run alternately (ranks, one, ranks, ...) so that load on the machine reaches both
    alike; each run's stage times come from its report; medians, and the ratio of each pair."""
    script = str(Path(__file__).resolve().parent.parent / "grasprune.py")
    common = ["--model", args.model, "--calib", args.calib, "--calib-split", args.calib_split, "--nsamples",
              str(args.nsamples), "--seq-len", str(args.seq_len), "--epochs", "1", "--overwrite"]
    common += ["--data-dir", args.data_dir] if args.data_dir else []
    launch = {"ranks": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                         str(args.ranks), script, *common, "--batch-size", "1"], 1),
              "one": ([sys.executable, script, *common, "--batch-size", str(args.ranks)], args.ranks)}
    times = {name: [] for name in launch}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, (command, threads) in launch.items():
                out = Path(tmp) / name
                subprocess.run([*command, "--output", str(out)], check=True, capture_output=True,
                               env=os.environ | {"OMP_NUM_THREADS": str(threads)})
                seconds = json.loads((out / "grasprune_report.json").read_text())["seconds"]
                times[name].append({stage: seconds[stage] for stage in STAGES})
    print(json.dumps({
        "model": args.model, "ranks": args.ranks, "nsamples": args.nsamples, "seq_len": args.seq_len,
        "repeats": args.repeats, "seconds": {name: {stage: median([t[stage] for t in runs]) for stage in STAGES}
                                             for name, runs in times.items()},
        "pairwise_ratios_one_over_ranks": {  # None where a stage took under the reports' 10 ms
            stage: [o[stage] / r[stage] if r[stage] else None for r, o in zip(times["ranks"], times["one"])]
            for stage in STAGES},
    }, indent=2))


def main() -> None:
    p = cli.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("overhead", help="gate-training step vs bare forward+backward")
    r = sub.add_parser("recipes", help="a step of the defaults vs one of the paper's recipe")
    for q in (o, r):
        q.add_argument("--model", required=True)
        q.add_argument("--seq-len", type=int, default=512)
        q.add_argument("--steps", type=int, default=8, help="training steps per timed run")
    sub.add_parser("memory", help="gate-training memory per GPU of LLaMA-2-7B, 70B, Llama-3.1-405B under FSDP2")
    f = sub.add_parser("fsdp", help="the memory arithmetic checked by torchrun --fsdp on this CPU (2 ranks)")
    f.add_argument("--seq-len", type=int, default=128)
    w = sub.add_parser("widths", help="time per FFN channel at widths on and off multiples of 64")
    w.add_argument("--hidden", type=int, default=576, help="hidden size (576: SmolLM2-135M)")
    w.add_argument("--widths", type=int, nargs="+", default=[640, 601, 663, 704, 1024, 987, 1013, 1088])
    s = sub.add_parser("serving", help="dense vs pruned: size and speed")
    s.add_argument("models", nargs="+", help="first the dense model, then pruned checkpoints")
    s.add_argument("--prompt-len", type=int, default=512)
    s.add_argument("--new-tokens", type=int, default=128)
    d = sub.add_parser("ranks", help="torchrun ranks x 1 thread vs one process x N threads, alternately")
    d.add_argument("--model", required=True)
    d.add_argument("--ranks", type=int, default=2)
    d.add_argument("--calib", default="wikitext2")
    d.add_argument("--calib-split", default="validation")
    d.add_argument("--data-dir")
    d.add_argument("--nsamples", type=int, default=32)
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--repeats", type=int, default=2)
    for q in (o, r, w, s):
        q.add_argument("--repeats", type=int, default=3)
        q.add_argument("--device")
        q.add_argument("--dtype")
    args = p.parse_args()
    torch.manual_seed(0)
    commands = {"overhead": overhead, "recipes": recipes, "memory": memory, "fsdp": fsdp, "widths": widths,
                "serving": serving, "ranks": ranks}
    commands[args.command](args)


if __name__ == "__main__":
    sys.exit(cli.run_cli("bench.py", main))
