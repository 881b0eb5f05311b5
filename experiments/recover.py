"""Recovery of the kept weights once the mask is fixed (issue 20): a low-rank correction B A of every
kept linear layer, distilled toward the dense model's next-token distribution on the calibration
data (grasprune's cached targets) and then merged into the weights, so that the checkpoint keeps
exactly its sliced shapes and its parameter budget. Only the factors train: the optimizer holds
state for them alone and no dense weight gradient is ever allocated.

  python experiments/recover.py --model SmolLM2.gguf --checkpoint defaults-s0.4653 \
      --data-dir ../shared/data --rows r8+lr1e-3,r8+lr3e-3+e2,r32+lr1e-3,r8+lr1e-3+mlp --output recovery.jsonl

A row is "+"-joined settings: rN (rank; r0: one output-side scale per hidden channel of down_proj
and o_proj instead, the cheaper lever), lrX (AdamW learning rate), eN (epochs), and the matrices:
all (default), mlp (gate/up/down) or attn (q/k/v/o). Every row starts from the checkpoint as saved,
on the checkpoint's own calibration data (its report names corpus, split, sequences, length and seed).
Held-out PTB validation perplexity chooses; the WikiText-2 test windows are reported, never used to
choose. Rows append to --output as JSON lines as they finish. This stays an experiment switch until
it wins on held-out perplexity without lowering the zero-shot mean (docs/ablations.md).
"""

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # grasprune.py and eval.py

import eval as evaluation
import grasprune

MATRICES = {"attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
            "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


class LowRank:
    """Forward hooks that add x A^T B^T to the output of each chosen linear layer of every decoder layer:
    A (rank x in) random, B (out x rank) zero, so the model starts exactly as it was. Layers that lost
    every input (an attention block with no KV group left) have nothing to correct and are skipped."""

    def __init__(self, model, rank: int, matrices: tuple[str, ...], seed: int = 0):
        if any(p.device.type == "meta" for p in model.parameters()):
            raise grasprune.UsageError("recovery merges into the weights: load the model on one device, "
                                       "not offloaded by --device-map")
        generator = torch.Generator().manual_seed(seed)
        self.factors, self.handles = [], []
        for layer in model.model.layers:
            for name in matrices:
                linear = getattr(layer.get_submodule(name.split(".")[0]), name.split(".")[1], None)
                if linear is None or linear.in_features == 0:  # no q/k/v, no o_proj input: attention is gone
                    continue
                weight = linear.weight
                a = torch.randn(rank, linear.in_features, generator=generator) / math.sqrt(linear.in_features)
                a = a.to(weight.device).requires_grad_()
                b = torch.zeros(linear.out_features, rank, device=weight.device, requires_grad=True)
                self.factors.append((linear, a, b))
                self.handles.append(linear.register_forward_hook(partial(self.add, a, b)))

    @staticmethod
    def add(a: torch.Tensor, b: torch.Tensor, module, args, output):
        return output + (args[0].to(a.dtype) @ a.T @ b.T).to(output.dtype)

    def parameters(self) -> list[torch.Tensor]:
        return [t for _, a, b in self.factors for t in (a, b)]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every B A into its weight (no parameter added) and remove the hooks."""
        for handle in self.handles:
            handle.remove()
        for linear, a, b in self.factors:
            linear.weight.copy_((linear.weight.float() + b @ a).to(linear.weight.dtype))


class OutputScales:
    """The cheaper lever: forward hooks that scale every output channel of down_proj and o_proj (the
    residual stream's inputs) by 1 + 0.5 tanh(t), t from 0, as the paper's scales do on the input side;
    merged into the weight's rows (and output bias), so no parameter is added either."""

    def __init__(self, model):
        self.factors, self.handles = [], []
        for layer in model.model.layers:
            for linear in (layer.mlp.down_proj, layer.self_attn.o_proj):
                t = torch.zeros(linear.out_features, device=linear.weight.device, requires_grad=True)
                self.factors.append((linear, t))
                self.handles.append(linear.register_forward_hook(partial(self.scale, t)))

    @staticmethod
    def scale(t: torch.Tensor, module, args, output):
        return output * (1 + 0.5 * torch.tanh(t)).to(output.dtype)

    def parameters(self) -> list[torch.Tensor]:
        return [t for _, t in self.factors]

    @torch.no_grad()
    def merge(self) -> None:
        for handle in self.handles:
            handle.remove()
        for linear, t in self.factors:
            for param in (p for p in (linear.weight, linear.bias) if p is not None):
                factor = (1 + 0.5 * torch.tanh(t)).view(-1, *[1] * (param.dim() - 1))
                param.copy_((param.float() * factor).to(param.dtype))


def recover(model, data: torch.Tensor, targets: grasprune.Targets, rank: int = 8, lr: float = 1e-3,
            epochs: int = 1, batch_size: int = 1, matrices: tuple[str, ...] = (*MATRICES["attn"], *MATRICES["mlp"]),
            ) -> list[float]:
    """Distill the pruned model toward the dense model's `targets` through low-rank corrections (rank
    0: output-side scales instead), then merge them. Returns the loss of every step."""
    low_rank = LowRank(model, rank, matrices) if rank else OutputScales(model)
    optimizer = torch.optim.AdamW(low_rank.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    device, history = grasprune.input_device(model), []
    batches = grasprune.with_targets(data, targets, batch_size)
    with grasprune.progress(total=epochs * len(batches), desc="recovery") as bar:
        for _ in range(epochs):
            for batch, target in batches:
                loss = grasprune.distillation_loss(model(input_ids=batch.to(device), use_cache=False).logits, target)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                history.append(loss.item())
                grasprune.stop_if_not_finite(history[-1], "recovery", len(history))
                bar.set_postfix(loss=f"{history[-1]:.4f}")
                bar.update()
    low_rank.merge()
    return history


def row_settings(row: str) -> dict:
    """rN, lrX, eN and all|mlp|attn, "+"-joined, as keyword arguments of recover()."""
    settings = {"rank": 8, "lr": 1e-3, "epochs": 1, "matrices": (*MATRICES["attn"], *MATRICES["mlp"])}
    for part in row.split("+"):
        if part in MATRICES:
            settings["matrices"] = MATRICES[part]
        elif part.startswith("lr"):
            settings["lr"] = float(part[2:])
        elif part[0] in "re" and part[1:].isdigit():
            settings["rank" if part[0] == "r" else "epochs"] = int(part[1:])
        elif part != "all":
            raise grasprune.UsageError(f"unknown row part {part!r}: use rN, lrX, eN, all, mlp or attn")
    return settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the dense model the checkpoint was pruned from")
    p.add_argument("--checkpoint", required=True, help="a grasprune.py output folder")
    p.add_argument("--rows", default="r8+lr1e-3", help="comma-separated rows, e.g. r8+lr1e-3,r32+lr1e-3+mlp")
    p.add_argument("--data-dir", help="local copies of the corpora, laid out like shared/data")
    p.add_argument("--held-out", default="ptb:validation", help="corpus:split that chooses")
    p.add_argument("--held-out-windows", type=int, default=16)
    p.add_argument("--test-windows", type=int, default=10, help="first N 2048-token windows of WikiText-2 test")
    p.add_argument("--output", default="recovery.jsonl", help="JSON lines, one per finished row (appended)")
    args = p.parse_args()
    report = json.loads((Path(args.checkpoint) / "grasprune_report.json").read_text())
    settings = report["settings"]
    corpus, split = args.held_out.split(":")
    texts = {"held_out": (evaluation.load_text(corpus, split, args.data_dir), args.held_out_windows),
             "test": (evaluation.load_text("wikitext2", "test", args.data_dir), args.test_windows)}
    dense, tokenizer = grasprune.load_model(args.model, "cpu", "float32")
    text = evaluation.load_text(settings["calib"], settings["calib_split"], args.data_dir)
    data = grasprune.calibration_batches(tokenizer, text, settings["nsamples"], settings["seq_len"], settings["seed"])
    start = time.perf_counter()
    targets = grasprune.teacher_targets(dense, data, 1, report["recipe"]["top_k"])
    teacher_seconds = round(time.perf_counter() - start, 1)
    del dense

    def measure(model) -> dict:
        return {name: evaluation.perplexity(model, tokenizer, text, 2048, limit_windows=windows)
                for name, (text, windows) in texts.items()}

    for row in ["checkpoint", *args.rows.split(",")]:
        model, _ = grasprune.load_model(args.checkpoint, "cpu", "float32")
        start, history = time.perf_counter(), []
        if row != "checkpoint":
            history = recover(model, data, targets, **row_settings(row))
        result = {"row": row, "checkpoint": args.checkpoint, "seconds": round(time.perf_counter() - start, 1),
                  "teacher_seconds": teacher_seconds, "first_loss": history[0] if history else None,
                  "final_loss": history[-1] if history else None,
                  "parameters": grasprune.model_summary(model)["parameters"]} | measure(model)
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
