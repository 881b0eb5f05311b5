"""Markdown tables of eval.py results, side by side: per task acc and acc_norm with their standard
errors, the mean of the headline metrics with its standard error, WikiText-2 perplexity, the
model's size and the run's wall time.

  python experiments/report.py dense=full-dense.json "defaults s0.4653=full-default-s0.4653.json"
"""

import argparse
import json
from pathlib import Path

TASKS = {"piqa": "PIQA", "winogrande": "WinoGrande", "hellaswag": "HellaSwag", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c"}


def cell(result: dict, metric: str) -> str:
    """A metric in % with its standard error."""
    if metric not in result:
        return "-"
    return f"{100 * result[metric]:.1f} ± {100 * result[metric + '_stderr']:.1f}"


def tables(results: dict[str, dict]) -> str:
    header = ["model", "parameters", "KV bytes/token", "WikiText-2 PPL", *TASKS.values(), "mean", "minutes"]
    rows = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, r in results.items():
        tasks = r["tasks"]
        mean = r["mean"]
        rows.append("| " + " | ".join([
            label, f"{r['summary']['parameters'] / 1e6:.1f} M", f"{r['summary']['kv_cache_bytes_per_token']:,}",
            f"{r['perplexity']['wikitext2']['ppl']:.2f}" if "wikitext2" in r["perplexity"] else "-",
            *(cell(tasks[t], tasks[t]["metric"]) for t in TASKS),
            f"{100 * mean['value']:.1f} ± {100 * mean['stderr']:.1f}", f"{r['seconds'] / 60:.0f}"]) + " |")
    plain = ["", "Plain `acc` (no length normalization) and the items scored:", "",
             "| model | " + " | ".join(TASKS.values()) + " |", "|---|" + "---:|" * len(TASKS)]
    for label, r in results.items():
        plain.append(f"| {label} | " + " | ".join(cell(r["tasks"][t], "acc") for t in TASKS) + " |")
    first = next(iter(results.values()))
    plain.append("| items | " + " | ".join(f"{first['tasks'][t]['n']:,}" for t in TASKS) + " |")
    return "\n".join(rows + plain)


def labelled_result(arg: str) -> tuple[str, dict]:
    """LABEL=FILE on the command line: the row's label and the eval.py JSON it shows."""
    label, sep, path = arg.partition("=")
    if not sep or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected LABEL=FILE with FILE an eval.py JSON, got {arg!r}")
    return label, json.loads(Path(path).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=labelled_result, metavar="LABEL=FILE")
    print(tables(dict(p.parse_args().results)))


if __name__ == "__main__":
    main()
