"""What each pruned model kept per layer: FFN channels and KV groups against depth, one line per
model, from the grasprune_report.json of each checkpoint (matplotlib, for the experiments only).

  python experiments/retention.py smollm2-default-s0.4653 smollm2-paper-s0.4653 --output retention.png
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # cli.py, grasprune.py

import cli
from grasprune import UsageError, reading


def kept_per_layer(checkpoint: str) -> tuple[list[float], list[int], dict]:
    """Fraction of FFN channels and number of KV groups each layer kept, and the report's units."""
    with reading(f"the report of {checkpoint!r}"):
        report = json.loads((Path(checkpoint) / "grasprune_report.json").read_text())
    units = report["units"]
    width = units["ffn_per_layer"]
    return ([r["ffn_channels"] / width for r in report["layers"]], [r["kv_groups"] for r in report["layers"]],
            units)


def plot(kept: dict[str, tuple[list[float], list[int], dict]], output: str) -> None:
    """Two panels, FFN channels and KV groups against depth, one line per labelled checkpoint."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("the plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ffn_ax, kv_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for label, (ffn, kv, units) in kept.items():
        ffn_ax.plot(range(len(ffn)), ffn, marker="o", markersize=3, label=label)
        kv_ax.plot(range(len(kv)), kv, marker="o", markersize=3, label=label)
    ffn_ax.set_ylabel("FFN channels kept (fraction)")
    ffn_ax.set_ylim(0, 1.05)
    kv_ax.set_ylabel(f"KV groups kept (of {units['kv_per_layer']})")
    kv_ax.set_yticks(range(units["kv_per_layer"] + 1))
    kv_ax.set_xlabel("layer")
    ffn_ax.legend(fontsize=8)
    ffn_ax.grid(alpha=0.3)
    kv_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=120)


def main() -> None:
    p = cli.ArgumentParser(prog="retention.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="grasprune.py output folders")
    p.add_argument("--labels", nargs="+", help="one per checkpoint (default: folder names)")
    p.add_argument("--output", default="retention.png", help="the figure (replaced if it exists)")
    args = p.parse_args()
    labels = args.labels or [Path(c.rstrip("/")).name for c in args.checkpoints]
    if len(labels) != len(args.checkpoints) or len(set(labels)) != len(labels):
        raise UsageError(f"--labels: give {len(args.checkpoints)} different labels, one per checkpoint")
    cli.check_output(Path(args.output), overwrite=True, folder=False)
    plot({label: kept_per_layer(c) for label, c in zip(labels, args.checkpoints)}, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(cli.run_cli("retention.py", main))
