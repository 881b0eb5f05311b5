"""The experiment scripts run against the current API: each on a tiny model, checked by what its
output must equal, not by its timings."""

import json

from conftest import VOCAB, cli
from grasprune import Recipe


def test_bench_recipes_runs_both_recipes_and_sizes_the_targets(tiny_folder):
    steps, seq_len = 2, 16
    proc = cli("experiments/bench.py", "recipes", "--model", str(tiny_folder / "tiny"), "--seq-len", str(seq_len),
               "--steps", str(steps), "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    k = min(Recipe.top_k, VOCAB)  # the tiny vocabulary is smaller than the default top-k
    assert result["targets_MiB_here"] * 2**20 == steps * seq_len * (8 * k + 4)
    assert len(result["pairwise_ratios"]) == 2
    assert result["step_ratio"] == result["default_step_s"] / result["paper_step_s"]


def test_report_refuses_an_argument_that_is_not_label_equals_file(tmp_path):
    proc = cli("experiments/report.py", f"dense={tmp_path / 'missing.json'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("report.py: error: argument LABEL=FILE")
