"""The command lines of grasprune.py, eval.py and export_gguf.py: the error boundary and output checks
the three share, and grasprune.py's own options, run, report and checkpoint. `python grasprune.py`
calls `main()` here; the method (`prune()` and all it calls) stays in grasprune.py, which holds it
whole without this file.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import grasprune
import modeling_grasprune
from grasprune import Recipe, UsageError, cause_of


# ---- The error boundary and the output checks of the three command lines ----
def run_cli(prog: str, work: Callable[[], object]) -> int:
    """The error boundary of the three command lines (grasprune.py, eval.py, export_gguf.py): a
    UsageError becomes one line `<prog>: error: ...` and exit code 2, Ctrl-C exit code 130. Under
    torchrun every rank sees the same input and stops alike; rank 0 alone says why."""
    try:
        code = work()
    except UsageError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


def check_output(path: Path, overwrite: bool, folder: bool, inputs: tuple[str | None, ...] = ()) -> None:
    """Refuse, before any work, an output that exists (unless `overwrite`), is of the wrong kind,
    cannot be written, or would replace one of the `inputs`."""
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")
    if path.exists() and path.is_dir() != folder:
        raise UsageError(f"{path} is a {'folder' if path.is_dir() else 'file'}; the output is a "
                         f"{'folder' if folder else 'file'}")
    parent = path.absolute().parent
    while folder and not parent.exists():  # save_checkpoint makes a checkpoint folder's parents
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write {path}: {parent} is not a writable folder")
    for source in filter(None, inputs):
        if path.resolve() == Path(source).resolve() or path.resolve() in Path(source).resolve().parents:
            raise UsageError(f"{path} would replace the input {source}; choose another output")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a UsageError (one line, exit 2), not as usage text."""

    def error(self, message: str):
        raise UsageError(message)


def at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `least` (a count of sequences, windows, items)."""
    def integer(value: str) -> int:
        if not value.lstrip("-").isdigit() or int(value) < least:
            raise argparse.ArgumentTypeError(f"give an integer of at least {least}, not {value!r}")
        return int(value)
    return integer


def corpus_split(value: str) -> tuple[str, str]:
    """An argparse type: CORPUS:SPLIT, e.g. ptb:validation."""
    corpus, _, split = value.partition(":")
    if not corpus or not split or ":" in split:
        raise argparse.ArgumentTypeError(f"give CORPUS:SPLIT, e.g. ptb:validation, not {value!r}")
    return corpus, split


# ---- grasprune.py's options ----
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Recipe]:
    """The command line's settings, and their recipe (the defaults or --paper's, options on top)."""
    default, paper = Recipe(), Recipe.paper()
    p = ArgumentParser(prog="grasprune", description=grasprune.__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="hub id, local folder or .gguf file")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of prunable parameters to remove (0.5)")
    p.add_argument("--output", help="output folder (default: <model name>-grasprune-s<sparsity>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--calib", default="wikitext2",
                   help="wikitext2 (default), ptb, c4, boolq (its Wikipedia passages), self (sampled from the model) "
                        "or a .txt/.jsonl/.parquet file")
    p.add_argument("--calib-split", default="train", help="split of the calibration corpus (%(default)s)")
    p.add_argument("--data-dir", help="local copies of the corpora, laid out like shared/data (no network)")
    p.add_argument("--nsamples", type=int, default=512, help="calibration sequences (%(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (%(default)s)")
    p.add_argument("--paper", action="store_true", help="the paper's recipe: --init zeros --loss lm --recover-rank 0")
    recipe = p.add_argument_group("recipe (default / with --paper)")
    for name, kind, choices, text in (
        ("batch_size", int, None, "calibration sequences per optimizer step"),
        ("epochs", int, None, "epochs of gate training"),
        ("lr", float, None, "AdamW learning rate (gate scores and scales)"),
        ("tau", float, None, "temperature of the straight-through sigmoid"),
        ("init", str, ("importance", "zeros"), "initial gate scores: Fisher importance per parameter, or all 0"),
        ("loss", str, ("kd", "lm"), "kd: distill the dense model's own predictions; lm: next-token loss"),
        ("top_k", int, None, "with kd: the dense model's most likely tokens kept per calibration token"),
        ("kv_floor", int, (0, 1), "KV groups every layer keeps; 0 lets a layer drop its whole attention block"),
        ("ffn_multiple", int, None, "keep every FFN width a multiple of it (whole blocks of the final mask)"),
        ("recover_rank", int, None, "recovery: rank of the merged correction of every kept weight; 0: none"),
        ("recover_lr", float, None, "recovery: AdamW learning rate of the correction's factors, falling linearly to 0"),
    ):
        recipe.add_argument(f"--{name.replace('_', '-')}", type=kind, choices=choices,
                            help=f"{text} ({getattr(default, name)} / {getattr(paper, name)})")
    recipe.add_argument("--no-rescale", dest="rescale", action="store_false", default=None,
                        help="skip the scaling calibration")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--seed", type=int, default=0, help="seeds the calibration windows (and sampling) (%(default)s)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", help="float32, bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device-map", help="auto: spread a model too big for one GPU over all GPUs and CPU memory")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model over the ranks (FSDP2)")
    p.add_argument("--eval", action="store_true", help="WikiText-2 test perplexity: dense, masked, final")
    p.add_argument("--eval-windows", type=int, help="with --eval: only the first N 2048-token windows (quick runs)")
    p.add_argument("--gguf", choices=("f32", "f16", "bf16", "q8_0"), help="also write a GGUF file for llama.cpp")
    args = p.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if getattr(args, f.name) is not None}
    recipe = dataclasses.replace(paper if args.paper else default, **given)
    recipe.validate()
    for name in ("nsamples",) + (("eval_windows",) if args.eval_windows is not None else ()):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.output is None:  # only a .gguf suffix goes: Llama-3.2-1B is not Llama-3
        args.output = f"{Path(args.model.rstrip('/')).name.removesuffix('.gguf')}-grasprune-s{args.sparsity}"
    if args.fsdp and args.gguf:
        raise UsageError("--gguf writes the whole model from one rank; with --fsdp, export the checkpoint instead")
    inputs = (args.model, args.calib, args.data_dir)
    check_output(Path(args.output), args.overwrite, folder=True, inputs=inputs)
    if args.gguf:
        check_output(gguf_beside(Path(args.output), args.gguf), args.overwrite, folder=False, inputs=inputs)
    return args, recipe


def join_data_parallel(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1, on one machine or many): join the process group, take this
    rank's GPU, and leave the console to rank 0. Returns the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and args.fsdp:
        raise UsageError("--fsdp shards the model over torchrun's ranks: start it with torchrun --nproc-per-node N")
    if world == 1:
        return 1
    if args.device_map:
        raise UsageError("--device-map spreads one process's model over the GPUs; under torchrun every rank holds it")
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open for the life of the process)
    return world


# ---- The report and the checkpoint ----
def hardware() -> dict:
    """The CPU kernels torch chose and the GPU. torch picks its kernels, and so the order of every
    floating-point sum, by these: a run repeats to the last digit only where they and the library
    versions match (docs/ablations.md)."""
    return {"cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def print_report(report: dict) -> None:
    """The per-layer table, what was removed, the cost of gate training and recovery, the --eval figures."""
    units = report["units"]
    width, kv = units["ffn_per_layer"], units["kv_per_layer"]
    print(f"{'layer':>5} {'FFN channels':>14} {'KV groups':>10} {'Q heads':>8} {'parameters':>12}")
    for r in report["layers"]:
        print(f"{r['layer']:>5} {r['ffn_channels']:>7}/{width:<6} {r['kv_groups']:>4}/{kv:<5}"
              f" {r['query_heads']:>4}/{kv * units['heads_per_group']:<3} {r['parameters']:>12,}")
    before, after = report["before"], report["after"]
    print(f"[grasprune] parameters {before['parameters']:,} -> {after['parameters']:,} "
          f"({report['parameters_removed']:.2%} removed); prunable {before['prunable_parameters']:,} -> "
          f"{after['prunable_parameters']:,} ({report['prunable_removed']:.2%} removed); KV cache "
          f"{before['kv_cache_bytes_per_token']:,} -> {after['kv_cache_bytes_per_token']:,} bytes/token")
    for stage in ("gate_training", "recovery"):
        print(f"[grasprune] {stage.replace('_', ' ')}: {report['seconds'][stage]:.0f} s, peak memory "
              + ", ".join(f"{device} {gib:.2f} GiB" for device, gib in report["peak_memory_gib"][stage].items()))
    for name, q in report["eval"].items():
        print(f"[grasprune] {name:>6}: WikiText-2 test perplexity {q['perplexity']:.2f}, decode "
              f"{q['decode_tokens_per_s']:.1f} tokens/s, {q['prompt']!r} -> {q['continuation']!r}")


def gguf_beside(output: Path, outtype: str) -> Path:
    """Where --gguf puts the GGUF file: beside the checkpoint folder, `<output>-<type>.gguf`."""
    return output.with_name(f"{output.name}-{outtype}.gguf")


def save_sharded(model, folder: Path | None, shard_bytes: int = 5 * 10**9) -> None:
    """save_pretrained's files for a model sharded by FSDP2, never whole on one rank: every rank gathers
    one tensor at a time, and rank 0 (given the `folder`) writes safetensors shards of `shard_bytes`."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # stored once, as save_pretrained does
    shards, size = [[]], 0
    for name, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
    files = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    files = files if len(shards) > 1 else ["model.safetensors"]
    for file, names in zip(files, shards):
        tensors = {}
        for name in names:  # one whole tensor at a time on the accelerator; a shard in rank 0's CPU memory
            whole = state[name]
            if isinstance(whole, DTensor):  # an empty one (attention-free layer's o_proj) has nothing to gather
                whole = whole.full_tensor() if whole.numel() else torch.empty(whole.shape, dtype=whole.dtype)
            if folder:
                tensors[name] = whole.cpu()
        if folder:
            safetensors.torch.save_file(tensors, folder / file, {"format": "pt"})
    if folder is None:
        return
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    name = type(model).__name__.removeprefix("FSDP")  # fully_shard made the class FSDP<name>
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [name]
    model.config.auto_map = {"AutoModelForCausalLM": f"modeling_grasprune.{name}"}
    shutil.copy(modeling_grasprune.__file__, folder)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def save_checkpoint(model, tokenizer, report: dict, output: Path, overwrite: bool = False) -> None:
    """Write model (with modeling_grasprune.py), tokenizer and report into a temporary folder, then
    move it into place: no half checkpoint, ever. Should `output` be taken meanwhile, the checkpoint
    is kept beside it and the error says where. Under torchrun rank 0 writes; with FSDP2 every rank
    sends it its shards."""
    if grasprune.rank_and_world()[0] > 0:
        if isinstance(model, FSDPModule):
            save_sharded(model, None)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # as a plain mkdir would make it (mkdtemp's 0700 hides it)
        # safetensors, tied embeddings stored once; 5 GB shards (the hub's usual size) also bound
        # the CPU memory that saving a --device-map model with offloaded modules needs.
        if isinstance(model, FSDPModule):
            save_sharded(model, tmp)
        else:
            model.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        (tmp / "grasprune_report.json").write_text(json.dumps(report, indent=2) + "\n")
        # SIGINT and SIGTERM wait while the old checkpoint is swapped for the new one: never none.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        if overwrite and output.is_dir():
            shutil.rmtree(output)
        try:
            tmp.rename(output)
        except OSError as err:  # taken during the run: hours of work are not thrown away
            kept = output.with_name(f"{output.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            tmp.rename(kept)
            raise UsageError(f"cannot write {output} ({cause_of(err)}); the checkpoint is saved as {kept}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


# ---- What only the command line loads: units before the weights, sharded weights, sampled text ----
def units_of_config(config) -> grasprune.Units:
    """grasprune.find_units for a model not loaded yet, read off a weightless copy: the budget is
    checked before the weights load."""
    if config.is_heterogeneous:
        raise UsageError(grasprune.ALREADY_PRUNED)
    with torch.device("meta"):
        return grasprune.find_units(AutoModelForCausalLM.from_config(config))


def load_sharded(name: str, device: str | None = None, dtype: str | None = None):
    """grasprune.load_model for a model bigger than one GPU, under torchrun (--fsdp): each rank holds
    1/world of the weights (FSDP2). Rank 0 reads them into CPU memory and sends every rank its
    shards, a tensor at a time; the other ranks start from a weightless copy."""
    device, torch_dtype = grasprune.resolve_device_dtype(device, dtype)
    rank, world = grasprune.rank_and_world()
    if rank == 0:
        dense, tokenizer = grasprune.load_model(name, "cpu", str(torch_dtype).removeprefix("torch."))
    else:
        with grasprune.reading(f"the tokenizer of {name!r}"):
            tokenizer = modeling_grasprune.load_tokenizer(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(grasprune.load_config(name), dtype=torch_dtype)
    model.eval().requires_grad_(False)
    grasprune.shard(model, init_device_mesh(device.type, (world,)))
    model.to_empty(device=device)
    set_model_state_dict(model, dense.state_dict() if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer_name, buffer in model.named_buffers():  # rotary frequencies: computed, not in the state dict
        if rank == 0:
            buffer.copy_(dense.get_buffer(buffer_name))
        dist.broadcast(buffer, 0)
    return model, tokenizer


@torch.no_grad()
def sample_from_model(model, tokenizer, n: int, seq_len: int, seed: int, batch_size: int = 16) -> torch.Tensor:
    """Data-free calibration (--calib self): (N, L) tokens sampled from the model, each from BOS (or EOS)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    batches = []
    for first in grasprune.progress(range(0, n, batch_size), desc="sampling calibration text"):
        prompt = torch.full((min(batch_size, n - first), 1), start, device=grasprune.input_device(model))
        batches.append(model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
            temperature=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
            pad_token_id=tokenizer.eos_token_id,
        ).cpu())
    return torch.cat(batches)


# ---- The run ----
def run(args: argparse.Namespace, recipe: Recipe) -> dict:
    """Refuse what can be refused before the weights load; then calibrate, prune, report and save."""
    import export_gguf
    from eval import load_text, quality  # the companion script reads the corpora and scores --eval

    torch.manual_seed(args.seed)
    world = join_data_parallel(args)
    grasprune.resolve_device_dtype(args.device, args.dtype)
    config = grasprune.load_config(args.model)
    grasprune.check_sequence_length(args.seq_len, config)
    units = grasprune.in_blocks(units_of_config(config), recipe.ffn_multiple)
    grasprune.budget_for(units, args.sparsity, recipe.kv_floor)
    grasprune.rank_share(torch.empty(args.nsamples, 0), recipe.batch_size)  # refused now if the ranks cannot share it
    if args.gguf:
        export_gguf.check_exportable(config)
    text = None if args.calib == "self" else load_text(args.calib, args.calib_split, args.data_dir)
    eval_text = load_text("wikitext2", "test", args.data_dir) if args.eval else None
    start = time.perf_counter()
    if args.fsdp:
        model, tokenizer = load_sharded(args.model, args.device, args.dtype)
    else:
        model, tokenizer = grasprune.load_model(args.model, args.device, args.dtype, args.device_map)
    gguf_tokenizer = args.model if args.model.endswith(".gguf") else None  # carried over unchanged
    if args.gguf and gguf_tokenizer is None:
        export_gguf.tokenizer_spec(tokenizer, config.vocab_size)  # refused now, not after the run
    if text is None:
        data = sample_from_model(model, tokenizer, args.nsamples, args.seq_len, args.seed)
    else:
        data = grasprune.calibration_batches(tokenizer, text, args.nsamples, args.seq_len, args.seed)
    loading = round(time.perf_counter() - start, 2)
    evaluate = partial(quality, tokenizer=tokenizer, text=eval_text, windows=args.eval_windows) if args.eval else None
    model, pruned = grasprune.prune(model, data, args.sparsity, recipe,
                                    gradient_checkpointing=args.gradient_checkpointing, evaluate=evaluate)
    report = {
        "settings": dict(vars(args)),
        "versions": {"python": platform.python_version()}
        | {lib: importlib.metadata.version(lib) for lib in ("torch", "transformers", "datasets", "accelerate")},
        "device": str(grasprune.input_device(model)),
        "hardware": hardware(),
        "device_map": getattr(model, "hf_device_map", None),  # where --device-map placed each module
        "dtype": str(model.dtype).removeprefix("torch."),
    } | pruned
    report["seconds"] = {"load_and_calibration_data": loading} | report["seconds"]
    print_report(report)  # rank 0's: the others print to nowhere
    save_checkpoint(model, tokenizer, report, Path(args.output), args.overwrite)
    print(f"[grasprune] saved {args.output}")
    if args.gguf and grasprune.rank_and_world()[0] == 0:  # whole or not at all, once the checkpoint is safe
        written = export_gguf.write_gguf(model, tokenizer, gguf_beside(Path(args.output), args.gguf), args.gguf,
                                         gguf_tokenizer)
        print(f"[grasprune] {export_gguf.describe(written)}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return report


def main(argv: list[str] | None = None) -> int:
    return run_cli("grasprune", lambda: run(*parse_args(argv)))
