"""Ablations of GRASPrune: each row runs the whole pipeline (grasprune.prune) with settings changed
from the paper's recipe, and the table reports what it keeps, its held-out and test perplexity,
zero-shot accuracy and its cost.

  python experiments/ablate.py --model SmolLM2.gguf --data-dir ../shared/data --sparsity 0.4653 \
      --rows published,init,kd,init+kd,init+kd+m32 --output ablations.jsonl
  python experiments/ablate.py --table ablations.jsonl        # print the table of finished rows
  python experiments/ablate.py --checkpoints a b --output ablations.jsonl ...   # rows from saved runs

A row is a "+"-joined list of changes to the paper's recipe ("published": none): init (Fisher
starting scores), kd (self-distillation), kv-floor-0, no-rescale, recover (the defaults' recovery of
the kept weights; the defaults are init+kd+recover), mN (FFN units of N channels),
kN (distillation keeps the dense model's top N tokens), annealN (the budget falls from dense to
the target over the first N% of gate training's steps), and the paper's own ablation rules
uniform, ffn-only, kv-only, per-parameter. Selection is by held-out perplexity (PTB validation by default:
no overlap with the WikiText-2 calibration text);
the WikiText-2 test columns are reported, never used to choose. Rows append to --output as they
finish (JSON lines), so an interrupted sweep keeps what it measured.
"""

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # grasprune.py and eval.py

import cli
import eval as evaluation
import grasprune
from grasprune import Recipe, Units, project_to_budget

# ----------------------------------------------------------------------------------------------
# Mask rules of the paper's ablations: each maps scores to a hard mask under the same budget.


def per_parameter(scores: torch.Tensor, costs: torch.Tensor, budget: int, units: Units, kv_floor: int) -> torch.Tensor:
    """Rank units by gate probability per parameter, sigmoid(score / tau) / cost (tau 1.5, the
    paper's; no row changes it), instead of by probability alone."""
    return project_to_budget(torch.sigmoid(scores / 1.5) / costs, costs, budget, units, kv_floor)


def only(kind: str):
    """Prune only FFN units ("ffn") or only KV groups ("kv"): the other kind is always kept."""
    def project(scores, costs, budget, units, kv_floor):
        other = torch.arange(units.count, device=scores.device) < units.num_ffn
        if kind == "ffn":
            other = ~other
        if int(costs[other].sum()) > budget:
            raise grasprune.UsageError(f"{kind}-only pruning cannot reach this sparsity")
        return project_to_budget(scores.masked_fill(other, torch.inf), costs, budget, units, kv_floor)
    return project


def uniform(scores: torch.Tensor, costs: torch.Tensor, budget: int, units: Units, kv_floor: int) -> torch.Tensor:
    """The same sparsity in every layer: each layer fills an equal share of the budget."""
    one_layer = dataclasses.replace(units, num_layers=1)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(units.num_layers):
        ffn = torch.arange(i * units.ffn_per_layer, (i + 1) * units.ffn_per_layer)
        kv = units.num_ffn + torch.arange(i * units.kv_per_layer, (i + 1) * units.kv_per_layer)
        index = torch.cat([ffn, kv]).to(scores.device)
        keep[index] = project_to_budget(scores[index], costs[index], budget // units.num_layers, one_layer, kv_floor)
    return keep


def annealed(rule, steps: int):
    """A budget that falls linearly from every unit kept to the target over the first `steps` calls
    (gate training projects once per step, then once for the final mask): the mask starts dense and
    the scores learn which units to drop while the model still works, before the budget binds."""
    calls = [0]

    def project(scores, costs, budget, units, kv_floor):
        above = (int(costs.sum()) - budget) * max(0, steps - calls[0]) // steps
        calls[0] += 1
        return rule(scores, costs, budget + above, units, kv_floor)
    return project


CHANGES = {"init": {"init": "importance"}, "kd": {"loss": "kd"}, "kv-floor-0": {"kv_floor": 0},
           "no-rescale": {"rescale": False}, "recover": {"recover_rank": Recipe.recover_rank}}
RULES = {"uniform": uniform, "ffn-only": only("ffn"), "kv-only": only("kv"), "per-parameter": per_parameter}


def row_settings(name: str, epochs: int, nsamples: int) -> tuple[Recipe, object]:
    """The recipe and mask rule of a row: the paper's recipe with the row's changes."""
    recipe, rule, anneal = dataclasses.replace(Recipe.paper(), epochs=epochs), project_to_budget, 0
    for part in name.split("+") if name != "published" else ():
        if part in CHANGES:
            recipe = dataclasses.replace(recipe, **CHANGES[part])
        elif part in RULES:
            rule = RULES[part]
        elif part[0] in "mk" and part[1:].isdigit():  # mN: FFN units of N channels; kN: top N targets
            recipe = dataclasses.replace(recipe, **{"ffn_multiple" if part[0] == "m" else "top_k": int(part[1:])})
        elif part.startswith("anneal") and part[6:].isdigit() and 0 < int(part[6:]) <= 100:
            anneal = int(part[6:])
        else:
            raise grasprune.UsageError(f"unknown row part {part!r}: use {', '.join([*CHANGES, *RULES])}, mN, kN "
                                       "or annealN")
    if anneal:  # over the first anneal% of the steps
        rule = annealed(rule, max(1, anneal * recipe.epochs * nsamples // recipe.batch_size // 100))
    return recipe, rule


# ----------------------------------------------------------------------------------------------
# One row


def measure(model, tokenizer, texts: dict, args) -> dict:
    """Held-out and test perplexity (2048-token windows) and the five-task zero-shot mean."""
    row = {name: evaluation.perplexity(model, tokenizer, text, 2048, limit_windows=windows)
           for name, (text, windows) in texts.items()}
    if args.limit:
        docs = evaluation.load_data(tuple(evaluation.TASKS), (), args.data_dir)["docs"]
        tasks = evaluation.zero_shot(model, tokenizer, docs, args.limit, 16)
        row["zero_shot"] = {task: r[r["metric"]] for task, r in tasks.items()}
        row["zero_shot_mean"] = evaluation.mean_of_tasks(tasks)["value"]
    return row


def report_row(name: str, report: dict) -> dict:
    """The table's columns that a grasprune report holds."""
    seconds = report["seconds"]
    return {
        "row": name, "sparsity": report["sparsity"], "steps": report.get("steps"),
        "kept_prunable": report["after"]["prunable_parameters"], "prunable": report["before"]["prunable_parameters"],
        "layers_without_attention": sum(r["kv_groups"] == 0 for r in report["layers"]),
        "flips_last_tenth": report.get("mean_flips_last_tenth"),
        "seconds": round(sum(seconds.get(stage, 0) for stage in
                             ("teacher_targets", "importance", "gate_training", "scaling_calibration")), 1),
    }


def run_row(name: str, dense, tokenizer, data: torch.Tensor, texts: dict, args) -> dict:
    """grasprune.prune with the row's settings, on a copy of the dense model."""
    recipe, rule = row_settings(name, args.epochs, len(data))
    torch.manual_seed(args.seed)
    model, report = grasprune.prune(copy.deepcopy(dense), data, args.sparsity, recipe, project=rule)
    return report_row(name, report) | {"recipe": report["recipe"]} | measure(model, tokenizer, texts, args)


def checkpoint_row(path: str, tokenizer, texts: dict, args) -> dict:
    """A row for a checkpoint that grasprune.py saved (its report gives settings and time)."""
    model, _ = grasprune.load_model(path, args.device, args.dtype)
    report = json.loads((Path(path) / "grasprune_report.json").read_text())
    report.setdefault("sparsity", report["settings"]["sparsity"])
    return report_row(Path(path).name, report) | measure(model, tokenizer, texts, args)


# ----------------------------------------------------------------------------------------------
# Table and command line


def table(rows: list[dict]) -> str:
    """The rows as one Markdown table."""
    def cell(value, spec):
        return "n/a" if value is None else format(value, spec)

    lines = [
        ("| row | sparsity | kept prunable | no-attention layers | held-out PPL | test PPL | zero-shot mean "
         "| flips/step, last 10% | minutes |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        zero_shot = r.get("zero_shot_mean")
        lines.append(
            f"| {r['row']} | {r['sparsity']} | {r['kept_prunable']:,} ({r['kept_prunable'] / r['prunable']:.1%}) "
            f"| {r['layers_without_attention']} | {r['held_out']:.2f} | {r['test']:.2f} "
            f"| {cell(None if zero_shot is None else 100 * zero_shot, '.1f')} "
            f"| {cell(r['flips_last_tenth'], '.0f')} | {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = cli.ArgumentParser(prog="ablate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the dense model (hub id, folder or .gguf)")
    p.add_argument("--rows", default="published", help="comma-separated rows, e.g. published,init+kd,init+kd+m32")
    p.add_argument("--checkpoints", nargs="+", help="evaluate these grasprune.py outputs as rows instead")
    p.add_argument("--table", help="print the table of a JSON-lines file of rows, and stop")
    p.add_argument("--output", default="ablations.jsonl", help="JSON lines, one per finished row (appended)")
    p.add_argument("--data-dir", help="local copies of the corpora and tasks, laid out like shared/data")
    p.add_argument("--held-out", default="ptb:validation", type=cli.corpus_split,
                   help="corpus:split that selects settings")
    p.add_argument("--held-out-windows", type=cli.at_least(1), default=16)
    p.add_argument("--test-windows", type=cli.at_least(1), default=40,
                   help="first N 2048-token windows of WikiText-2 test")
    p.add_argument("--limit", type=cli.at_least(1),
                   help="zero-shot: first N items of each of the five tasks (default: skip)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=cli.at_least(1), default=128)
    p.add_argument("--seq-len", type=cli.at_least(2), default=256)
    p.add_argument("--epochs", type=cli.at_least(1), default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--dtype")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.table:
        print(table([json.loads(line) for line in Path(args.table).read_text().splitlines()]))
        return
    texts = {"held_out": (evaluation.load_text(*args.held_out, args.data_dir), args.held_out_windows),
             "test": (evaluation.load_text("wikitext2", "test", args.data_dir), args.test_windows)}
    rows = []
    if args.checkpoints:
        _, tokenizer = grasprune.load_model(args.checkpoints[0], args.device, args.dtype)
        jobs = [(path, lambda path=path: checkpoint_row(path, tokenizer, texts, args)) for path in args.checkpoints]
    else:
        dense, tokenizer = grasprune.load_model(args.model, args.device, args.dtype)
        calibration = evaluation.load_text("wikitext2", "validation", args.data_dir)
        data = grasprune.calibration_batches(tokenizer, calibration, args.nsamples, args.seq_len, args.seed)
        jobs = [(name, lambda name=name: run_row(name, dense, tokenizer, data, texts, args))
                for name in args.rows.split(",")]
    for name, job in jobs:
        try:
            row = job()
        except grasprune.UsageError as err:
            print(f"[ablate] {name}: skipped: {err}")
            continue
        rows.append(row)
        with open(args.output, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    sys.exit(cli.run_cli("ablate.py", main))
