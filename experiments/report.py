"""Markdown tables of eval.py results, side by side: per task acc and acc_norm with their standard
errors, the mean of the headline metrics with its standard error, WikiText-2 perplexity, the
model's size and the run's wall time.

  python experiments/report.py dense=full-dense.json "defaults s0.4653=full-default-s0.4653.json"

A model evaluated in parts (one eval.py run per task, or per --shard of a task, so that a long
evaluation can stop and go on) is one LABEL=PART,PART,...: the parts' perplexities and tasks are
joined, the mean is computed again over all tasks and the minutes are summed.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # eval.py

import cli
from eval import join_shards, mean_of_tasks

TASKS = {"piqa": "PIQA", "winogrande": "WinoGrande", "hellaswag": "HellaSwag", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c"}


def cell(result: dict, metric: str) -> str:
    """A metric in % with its standard error."""
    if metric not in result:
        return "-"
    return f"{100 * result[metric]:.1f} ± {100 * result[metric + '_stderr']:.1f}"


def tables(results: dict[str, dict]) -> str:
    """The headline table (acc_norm, WinoGrande acc) and the plain-acc table; a task not run is "-",
    and so is the mean unless every task ran."""
    header = ["model", "parameters", "KV bytes/token", "WikiText-2 PPL", *TASKS.values(), "mean", "minutes"]
    rows = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, r in results.items():
        tasks, mean = r["tasks"], r["mean"]
        complete = mean is not None and set(tasks) >= set(TASKS)
        rows.append("| " + " | ".join([
            label, f"{r['summary']['parameters'] / 1e6:.1f} M", f"{r['summary']['kv_cache_bytes_per_token']:,}",
            f"{r['perplexity']['wikitext2']['ppl']:.2f}" if "wikitext2" in r["perplexity"] else "-",
            *(cell(tasks[t], tasks[t]["metric"]) if t in tasks else "-" for t in TASKS),
            f"{100 * mean['value']:.1f} ± {100 * mean['stderr']:.1f}" if complete else "-",
            f"{r['seconds'] / 60:.0f}"]) + " |")
    plain = ["", "Plain `acc` (no length normalization) and the items scored:", "",
             "| model | " + " | ".join(TASKS.values()) + " |", "|---|" + "---:|" * len(TASKS)]
    counts = {}  # the items each model scored per task; one row when all models scored the same
    for label, r in results.items():
        plain.append(f"| {label} | " + " | ".join(cell(r["tasks"].get(t, {}), "acc") for t in TASKS) + " |")
        counts[label] = [f"{r['tasks'][t]['n']:,}" if t in r["tasks"] else "-" for t in TASKS]
    same = len({tuple(c) for c in counts.values()}) == 1
    for label, count in list(counts.items())[:1] if same else counts.items():
        plain.append(f"| items{'' if same else f' ({label})'} | " + " | ".join(count) + " |")
    return "\n".join(rows + plain)


def joined(parts: list[dict]) -> dict:
    """One evaluation of one model from eval.py runs over parts of it: different tasks and texts,
    or slices of one task's items (eval.py --shard, joined by eval.join_shards), all of them."""
    first = parts[0]
    result = {"summary": first["summary"], "perplexity": {}, "tasks": {}, "seconds": 0.0}
    for part in parts:
        if part["summary"] != first["summary"]:
            raise ValueError("the parts are of different models (their summaries differ)")
        if result["perplexity"].keys() & part["perplexity"].keys():
            raise ValueError(f"two parts both have {sorted(result['perplexity'].keys() & part['perplexity'].keys())}")
        result["perplexity"].update(part["perplexity"])
        result["seconds"] += part["seconds"]
    for task in dict.fromkeys(task for part in parts for task in part["tasks"]):
        shards = [part["tasks"][task] for part in parts if task in part["tasks"]]
        task_result = result["tasks"][task] = shards[0] if len(shards) == 1 else join_shards(shards)
        if task_result["n"] != task_result.get("of", task_result["n"]):
            raise ValueError(f"{task}: the parts score {task_result['n']:,} of its {task_result['of']:,} items "
                             "(a --shard slice is missing)")
    result["mean"] = mean_of_tasks(result["tasks"])
    return result


def labelled_result(arg: str) -> tuple[str, dict]:
    """LABEL=FILE[,FILE...] on the command line: the row's label and the eval.py JSON it shows."""
    label, sep, paths = arg.partition("=")
    paths = paths.split(",")
    if not sep or not all(Path(path).is_file() for path in paths):
        raise argparse.ArgumentTypeError(f"expected LABEL=FILE[,FILE...] with each FILE an eval.py JSON, got {arg!r}")
    try:
        return label, joined([json.loads(Path(path).read_text()) for path in paths])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{arg!r}: {e}") from e


def main() -> None:
    p = cli.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=labelled_result, metavar="LABEL=FILE")
    print(tables(dict(p.parse_args().results)))


if __name__ == "__main__":
    sys.exit(cli.run_cli("report.py", main))
