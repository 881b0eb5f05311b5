"""Recovery of the kept weights once the mask is fixed (issue 20): a low-rank correction B A of every
kept linear layer, distilled toward the dense model's next-token distribution on the calibration
data (grasprune's cached targets) and then merged into the weights, so that the checkpoint keeps
exactly its sliced shapes and its parameter budget. Only the factors train: the optimizer holds
state for them alone and no dense weight gradient is ever allocated.

  python experiments/recover.py --model SmolLM2.gguf --checkpoint defaults-s0.4653 \
      --data-dir ../shared/data --rows r8+lr1e-3,r8+lr3e-3+e2,r32+lr1e-3,r8+lr1e-3+mlp --output recovery.jsonl

A row is "+"-joined settings: rN (rank; r0: one output-side scale per hidden channel of down_proj
and o_proj instead, the cheaper lever), lrX (AdamW learning rate), eN (epochs), and the matrices:
all (default), mlp (gate/up/down) or attn (q/k/v/o); const: the learning rate is held constant
where grasprune.py's falls linearly to 0 over the steps (rows recorded before the fall became the
default name it `decay` and hold the rate without it); norms: every RMSNorm gain trains beside the
factors; oscale: so do the output-side scales of r0 (both are vectors the checkpoint already has or
folds away, so neither adds a parameter). Every row starts from the checkpoint as saved,
on the checkpoint's own calibration data (its report names corpus, split, sequences, length and seed).
--nsamples and --seq-len recover on more (or less) of that corpus than gate training saw, to learn
whether recovery is data-limited; --generated adds sequences sampled from the dense model itself
(`cli.sample_from_model`, the sampler of grasprune.py's `--calib self`), a corpus that is neither
the calibration text nor any evaluation set (data-free distillation, as in LLM-QAT), shuffled in
among the calibration sequences; --extra CORPUS:SPLIT:N adds N sequences of a second corpus the same
way (boolq:validation: BoolQ's 2,939 Wikipedia passages, a broader text that no reported task uses).
Held-out PTB validation perplexity chooses; the WikiText-2 test windows are reported, never used to
choose. Rows append to --output as JSON lines as they finish; --save also keeps each row's model, a
checkpoint eval.py scores. Several checkpoints pruned from
the same dense model share one teacher pass where their calibration data agree. The checkpoints must
be pruned without recovery (`--recover-rank 0`); the default row of grasprune.py's recovery is r32+lr2e-3
(docs/ablations.md).
"""

import argparse
import itertools
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # grasprune.py and eval.py

import cli
import eval as evaluation
import grasprune
import modeling_grasprune

MATRICES = {"all": grasprune.RECOVERED, "attn": tuple(m for m in grasprune.RECOVERED if m.startswith("self_attn.")),
            "mlp": tuple(m for m in grasprune.RECOVERED if m.startswith("mlp."))}
DEFAULT = grasprune.Recipe()  # a row part left out takes grasprune.py's default


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


class NormGains:
    """Every RMSNorm gain of the model trained along with a correction (row part norms): vectors the
    checkpoint already holds, so no parameter is added; merged where they are (AdamW updates them in place)."""

    def __init__(self, model):
        self.gains = [m.weight for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        for gain in self.gains:
            gain.requires_grad_()

    def parameters(self) -> list[torch.Tensor]:
        return self.gains

    def merge(self) -> None:
        for gain in self.gains:
            gain.requires_grad_(False)


class Together:
    """Several corrections trained as one, by one optimizer, and merged one after the other."""

    def __init__(self, *parts):
        self.parts = parts

    def parameters(self) -> list[torch.Tensor]:
        return [p for part in self.parts for p in part.parameters()]

    def merge(self) -> None:
        for part in self.parts:
            part.merge()


def held_rate(lr: float, optimizer, args, kwargs) -> None:
    """An optimizer step pre-hook: this step runs at lr, whatever recovery's schedule had set."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def recover(model, data: torch.Tensor, targets: grasprune.Targets, rank: int = DEFAULT.recover_rank,
            lr: float = DEFAULT.recover_lr, epochs: int = 1, batch_size: int = 1,
            matrices: tuple[str, ...] = grasprune.RECOVERED, const: bool = False, norms: bool = False,
            oscale: bool = False) -> list[float]:
    """grasprune's recovery with this row's settings (rank 0: output-side scales instead; const: the
    learning rate held, where grasprune.py's falls linearly to 0; norms: the RMSNorm gains train too;
    oscale: the output-side scales train beside the low-rank factors). Returns the loss of every step."""
    correction = Together(grasprune.LowRank(model, rank, matrices) if rank else OutputScales(model),
                          *([OutputScales(model)] if oscale else []), *([NormGains(model)] if norms else []))
    recipe = grasprune.Recipe(recover_rank=rank, recover_lr=lr, batch_size=batch_size)
    # A global hook, so that grasprune.recover_weights runs as it is; removed whatever happens.
    handle = register_optimizer_step_pre_hook(partial(held_rate, lr)) if const else None
    try:
        return grasprune.recover_weights(model, data, recipe, targets, correction, epochs)
    finally:
        if handle:
            handle.remove()


def row_settings(row: str) -> dict:
    """rN, lrX, eN, all|mlp|attn, const, norms and oscale, "+"-joined, as keyword arguments of recover(); a part left
    out is grasprune.py's default stage (Recipe's recover_rank and recover_lr, one epoch, all matrices)."""
    settings = {"rank": DEFAULT.recover_rank, "lr": DEFAULT.recover_lr, "epochs": 1,
                "matrices": grasprune.RECOVERED, "const": False, "norms": False, "oscale": False}
    for part in row.split("+"):
        if part in MATRICES:
            settings["matrices"] = MATRICES[part]
        elif part in ("const", "norms", "oscale"):
            settings[part] = True
        elif part.startswith("lr") and part[2:].replace(".", "", 1).replace("e-", "", 1).isdigit():
            settings["lr"] = float(part[2:])
        elif part[0] in "re" and part[1:].isdigit():
            settings["rank" if part[0] == "r" else "epochs"] = int(part[1:])
        else:
            raise grasprune.UsageError(f"unknown row part {part!r}: use rN, lrX, eN, all, mlp, attn, const, norms "
                                       "or oscale")
    if settings["oscale"] and not settings["rank"]:  # r0 trains the output-side scales already
        raise grasprune.UsageError(f"row {row!r}: oscale trains the output-side scales beside rN, N > 0; r0 is them")
    return settings


def corpus_split_count(value: str) -> tuple[str, str, int]:
    """An argparse type: CORPUS:SPLIT:N, e.g. boolq:validation:512 (--extra)."""
    parts = value.split(":")
    if len(parts) != 3 or not all(parts) or not parts[2].isdigit():
        raise argparse.ArgumentTypeError(f"give CORPUS:SPLIT:N, e.g. boolq:validation:512, not {value!r}")
    return parts[0], parts[1], int(parts[2])


def main() -> None:
    p = cli.ArgumentParser(prog="recover.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the dense model the checkpoint was pruned from")
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="grasprune.py output folders pruned from --model (several share one teacher pass)")
    p.add_argument("--rows", default="r8+lr1e-3", help="comma-separated rows, e.g. r8+lr1e-3,r32+lr1e-3+mlp")
    p.add_argument("--data-dir", help="local copies of the corpora, laid out like shared/data")
    p.add_argument("--held-out", default="ptb:validation", type=cli.corpus_split, help="corpus:split that chooses")
    p.add_argument("--held-out-windows", type=cli.at_least(1), default=16)
    p.add_argument("--test-windows", type=cli.at_least(1), default=10,
                   help="first N 2048-token windows of WikiText-2 test")
    p.add_argument("--output", default="recovery.jsonl", help="JSON lines, one per finished row (appended)")
    p.add_argument("--save", help="a folder: each row's model is saved in it as CHECKPOINT_NAME/ROW")
    p.add_argument("--nsamples", type=cli.at_least(0),
                   help="recovery's calibration sequences (default: the checkpoint's)")
    p.add_argument("--seq-len", type=cli.at_least(1), help="tokens per recovery sequence (default: the checkpoint's)")
    p.add_argument("--generated", type=cli.at_least(0), default=0, help="sequences sampled from the dense model, added")
    p.add_argument("--extra", type=corpus_split_count,
                   help="CORPUS:SPLIT:N, N sequences of another corpus added, e.g. boolq:validation:512")
    args = p.parse_args()
    extra = args.extra
    extra_name = ":".join(map(str, extra)) if extra else None
    rows = {row: row_settings(row) for row in args.rows.split(",")}  # a bad row stops the run before any work
    reports = {}
    for checkpoint in args.checkpoint:  # every report is read and checked before a model is loaded
        with grasprune.reading(f"the report of {checkpoint!r}"):
            reports[checkpoint] = json.loads((Path(checkpoint) / "grasprune_report.json").read_text())
        if reports[checkpoint]["recipe"].get("recover_rank"):
            raise grasprune.UsageError(f"{checkpoint} was recovered already: prune it with --recover-rank 0")
    if args.save:  # a row's folder that exists would stop the run after its recovery, not before
        if len({Path(c).name for c in args.checkpoint}) < len(args.checkpoint):
            raise grasprune.UsageError("--save keeps each model as CHECKPOINT_NAME/ROW: give checkpoints "
                                       "whose folder names differ")
        for checkpoint, row in itertools.product(args.checkpoint, rows):
            target = Path(args.save) / Path(checkpoint).name / row
            if target.exists():
                raise grasprune.UsageError(f"{target} exists: choose another --save folder")
            cli.check_output(target, overwrite=True, folder=True)
    overrides = {k: v for k, v in (("nsamples", args.nsamples), ("seq_len", args.seq_len)) if v is not None}
    extra_text = evaluation.load_text(extra[0], extra[1], args.data_dir) if extra else None
    if extra:  # how many sequences the second corpus makes is known from the tokenizer alone
        with grasprune.reading(f"the tokenizer of {args.checkpoint[0]!r}"):
            extra_tokens = len(modeling_grasprune.load_tokenizer(args.checkpoint[0])(extra_text).input_ids)
        for report in reports.values():
            seq_len = (report["settings"] | overrides)["seq_len"]
            if extra[2] > extra_tokens // seq_len:
                raise grasprune.UsageError(f"--extra {extra_name}: {extra[0]} makes "
                                           f"{extra_tokens // seq_len} sequences of {seq_len} tokens: give N up "
                                           f"to {extra_tokens // seq_len}")
    texts = {"held_out": (evaluation.load_text(*args.held_out, args.data_dir), args.held_out_windows),
             "test": (evaluation.load_text("wikitext2", "test", args.data_dir), args.test_windows)}
    dense, tokenizer = grasprune.load_model(args.model, "cpu", "float32")
    teacher, jobs = {}, []  # (corpus, split, sequences, length, seed, top-k) -> one pass of the teacher
    for checkpoint, report in reports.items():
        settings = report["settings"] | overrides
        key = tuple(settings[k] for k in ("calib", "calib_split", "nsamples", "seq_len", "seed"))
        key += (report["recipe"]["top_k"],)
        if key not in teacher:
            text = evaluation.load_text(settings["calib"], settings["calib_split"], args.data_dir)
            data = grasprune.calibration_batches(tokenizer, text, settings["nsamples"], settings["seq_len"],
                                                 settings["seed"])
            parts = [data]
            if extra:
                parts.append(grasprune.calibration_batches(tokenizer, extra_text, extra[2], settings["seq_len"],
                                                           settings["seed"]))
            if args.generated:
                parts.append(cli.sample_from_model(dense, tokenizer, args.generated, settings["seq_len"],
                                                   settings["seed"], batch_size=64))
            if len(parts) > 1:
                data = torch.cat(parts)
                data = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(settings["seed"]))]
            start = time.perf_counter()
            targets = grasprune.teacher_targets(dense, data, 1, report["recipe"]["top_k"])
            teacher[key] = data, targets, round(time.perf_counter() - start, 1)
        jobs.append((checkpoint, report, *teacher[key]))
    del dense

    def measure(model) -> dict:
        return {name: evaluation.perplexity(model, tokenizer, text, 2048, limit_windows=windows)
                for name, (text, windows) in texts.items()}

    for checkpoint, report, data, targets, teacher_seconds in jobs:
        for row in ["checkpoint", *rows]:
            model, _ = grasprune.load_model(checkpoint, "cpu", "float32")
            start, history = time.perf_counter(), []
            if row != "checkpoint":
                history = recover(model, data, targets, **rows[row])
            result = {"row": row, "checkpoint": checkpoint, "seconds": round(time.perf_counter() - start, 1),
                      "teacher_seconds": teacher_seconds, "calibration": [len(data), data.shape[1]],
                      "generated": args.generated,
                      "extra": extra_name,
                      "first_loss": history[0] if history else None,
                      "final_loss": history[-1] if history else None,
                      "parameters": grasprune.model_summary(model)["parameters"]} | measure(model)
            with open(args.output, "a") as f:
                f.write(json.dumps(result) + "\n")
            if args.save and row != "checkpoint":
                chosen = rows[row]
                recipe = report["recipe"] | {"recover_rank": chosen["rank"], "recover_lr": chosen["lr"]}
                cli.save_checkpoint(model, tokenizer, report | {"recipe": recipe, "recovery_row": result},
                                    Path(args.save) / Path(checkpoint).name / row)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(cli.run_cli("recover.py", main))
