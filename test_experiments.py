"""The experiment scripts run against the current API: each on a tiny model, checked by what its
output must equal, not by its timings."""

import importlib.util
import json

import pytest
import torch

import eval as evaluation
import grasprune
from conftest import DATA, VOCAB, inputs, run_script, sliced_model, tiny_model
from grasprune import Recipe


def test_bench_recipes_runs_both_recipes_and_recovery_and_sizes_the_targets(tiny_folder):
    steps, seq_len = 2, 16
    proc = run_script("experiments/bench.py", "recipes", "--model", str(tiny_folder / "tiny"),
                      "--seq-len", str(seq_len), "--steps", str(steps), "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    k = min(Recipe.top_k, VOCAB)  # the tiny vocabulary is smaller than the default top-k
    assert result["targets_MiB_here"] * 2**20 == steps * seq_len * (8 * k + 4)
    assert len(result["pairwise_ratios"]) == 2
    assert result["step_ratio"] == result["default_step_s"] / result["paper_step_s"]
    assert len(result["recovery_to_default_pairwise"]) == 2 and result["recovery_step_s"] > 0
    assert list(result["saved_activation_MiB_one_sequence"]) == ["paper", "default", "recovery"]
    assert all(mib > 0 for mib in result["saved_activation_MiB_one_sequence"].values())


def test_bench_ranks_times_every_stage_of_both_launches(tiny_folder):
    proc = run_script("experiments/bench.py", "ranks", "--model", str(tiny_folder / "tiny"), "--calib",
                      str(tiny_folder / "calib.txt"), "--nsamples", "4", "--seq-len", "16", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    stages = ["teacher_targets", "importance", "gate_training", "scaling_calibration"]
    assert list(result["seconds"]) == ["ranks", "one"] and list(result["seconds"]["one"]) == stages
    assert all(len(ratios) == 1 for ratios in result["pairwise_ratios_one_over_ranks"].values())
    assert result["seconds"]["ranks"]["gate_training"] > 0 and result["seconds"]["one"]["gate_training"] > 0


def test_report_refuses_an_argument_that_is_not_label_equals_file(tmp_path):
    proc = run_script("experiments/report.py", f"dense={tmp_path / 'missing.json'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("report.py: error: argument LABEL=FILE")


@pytest.mark.skipif(not (DATA / "piqa").is_dir(), reason=f"no evaluation data at {DATA}")
def test_report_joins_an_evaluation_run_in_parts_into_the_same_row_as_one_run(tiny_folder):
    """eval.py once over two tasks and WikiText-2, and again in parts (one of them a task in two
    shards): report.py's row from the parts equals the row from the single run in every cell but
    the label and the minutes."""
    common = ["--model", str(tiny_folder / "tiny"), "--data-dir", str(DATA), "--limit", "5", "--seq-len", "64"]
    runs = {"whole": ["--tasks", "piqa", "arc_easy", "--ppl", "wikitext2"], "ppl": ["--tasks", "--ppl", "wikitext2"],
            "piqa": ["--tasks", "piqa", "--ppl"], "arc1": ["--tasks", "arc_easy", "--ppl", "--shard", "1/2"],
            "arc2": ["--tasks", "arc_easy", "--ppl", "--shard", "2/2"]}
    for name, argv in runs.items():
        assert evaluation.main([*common, *argv, "--output", str(tiny_folder / f"{name}.json")]) == 0
    parts = ",".join(str(tiny_folder / f"{name}.json") for name in ("ppl", "arc2", "piqa", "arc1"))
    proc = run_script("experiments/report.py", f"whole={tiny_folder / 'whole.json'}", f"parts={parts}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    whole, joined = ([c.strip() for c in line.split("|")] for line in proc.stdout.splitlines()[2:4])
    assert whole[2:-2] == joined[2:-2]  # all but the label and the minutes
    assert "-" not in (whole[4], whole[5], whole[8])  # perplexity, PIQA and ARC-e were scored ...
    assert whole[-3] == "-"  # ... but not all five tasks, so there is no mean

    proc = run_script("experiments/report.py", f"twice={tiny_folder / 'piqa.json'},{tiny_folder / 'whole.json'}")
    assert proc.returncode == 2
    assert "do not tile the items" in proc.stderr
    proc = run_script("experiments/report.py", f"half={tiny_folder / 'ppl.json'},{tiny_folder / 'arc1.json'}")
    assert proc.returncode == 2
    assert "arc_easy: the parts score 2 of its 5 items (a --shard slice is missing)" in proc.stderr


# ----------------------------------------------------------------------------------------------
# experiments/recover.py: the rows of the recovery grid, and the output-side scales (issue 20)


def test_recovery_rows_read_rank_learning_rate_epochs_and_matrices():
    from experiments.recover import MATRICES, row_settings

    assert row_settings("r32+lr1e-3+e2+mlp") == {"rank": 32, "lr": 1e-3, "epochs": 2, "matrices": MATRICES["mlp"],
                                                 "const": False, "norms": False, "oscale": False}
    assert row_settings("r8")["matrices"] == grasprune.RECOVERED == MATRICES["all"]
    default = grasprune.Recipe()  # a part left out is grasprune.py's default stage
    assert row_settings("all") == {"rank": default.recover_rank, "lr": default.recover_lr, "epochs": 1,
                                   "matrices": grasprune.RECOVERED, "const": False, "norms": False, "oscale": False}
    for part in ("const", "norms", "oscale"):
        assert row_settings(f"r8+{part}")[part] and not row_settings("r8")[part]
    assert set(MATRICES["attn"]) | set(MATRICES["mlp"]) == set(grasprune.RECOVERED) and len(grasprune.RECOVERED) == 7
    with pytest.raises(grasprune.UsageError, match="unknown row part 'q4'"):
        row_settings("r8+q4")
    with pytest.raises(grasprune.UsageError, match="r0 is them"):
        row_settings("r0+oscale")


@pytest.mark.parametrize("const", [False, True])
def test_recovery_learning_rate_falls_linearly_to_zero_and_row_part_const_holds_it(const):
    """grasprune.recover_weights: step k of n runs at lr (1 - k/n); with row part `const` every step
    runs at lr. The hook that holds it is gone afterwards."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from experiments.recover import recover

    data = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    targets = grasprune.teacher_targets(tiny_model("llama-gqa-bias"), data, 1, 16)
    seen = []
    # After each step: the learning rate that step ran at.
    handle = register_optimizer_step_post_hook(lambda optimizer, *_: seen.append(optimizer.param_groups[0]["lr"]))
    try:
        history = recover(sliced_model("llama-gqa-bias"), data, targets, rank=2, lr=0.01, epochs=2, const=const)
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5).step()
    finally:
        handle.remove()
    steps = 2 * 3
    assert len(history) == steps
    expected = [0.01] * steps if const else [0.01 * (1 - k / steps) for k in range(steps)]
    assert seen[:-1] == pytest.approx(expected, rel=1e-12) and seen[-1] == 0.5


@pytest.mark.parametrize("case", ["bad row", "no checkpoint", "recovered already", "second recovered already",
                                  "negative count", "no windows", "held-out without split", "bad extra",
                                  "extra not found", "save exists", "save names clash"])
def test_recover_refuses_bad_input_in_one_line_before_loading_a_model(case, tmp_path):
    """A bad row is refused before the checkpoint is read, a missing or already recovered checkpoint
    and a --save folder that a row would find taken before the dense model is loaded (every one of
    several): one `error:` line, exit code 2, no output."""
    (tmp_path / "saved" / "fresh" / "r32").mkdir(parents=True)
    for name, rank in (("done", 32), ("fresh", 0), ("other/fresh", 0)):
        (tmp_path / name).mkdir(parents=True)
        report = {"settings": {}, "recipe": {"recover_rank": rank}}
        (tmp_path / name / "grasprune_report.json").write_text(json.dumps(report))
    rows, checkpoints, message = {
        "bad row": ("r8,r8+q4", ["done"], "unknown row part 'q4'"),
        "no checkpoint": ("r8", ["missing"], "cannot read the report of"),
        "recovered already": ("r8", ["done"], "was recovered already: prune it with --recover-rank 0"),
        "second recovered already": ("r8", ["fresh", "done"], "done was recovered already"),
        "negative count": ("r8", ["fresh"], "argument --generated: give an integer of at least 0, not '-1'"),
        "no windows": ("r8", ["fresh"], "argument --test-windows: give an integer of at least 1, not '0'"),
        "held-out without split": ("r8", ["fresh"], "argument --held-out: give CORPUS:SPLIT"),
        "bad extra": ("r8", ["fresh"], "argument --extra: give CORPUS:SPLIT:N, e.g. boolq:validation:512, not 'boo"),
        "save exists": ("r8,r32", ["fresh"], "saved/fresh/r32 exists: choose another --save folder"),
        "save names clash": ("r8", ["fresh", "other/fresh"], "give checkpoints whose folder names differ"),
        "extra not found": ("r8", ["fresh"], "boolq validation is not in --data-dir"),
    }[case]
    extra = {"negative count": ["--generated", "-1"], "no windows": ["--test-windows", "0"],
             "held-out without split": ["--held-out", "ptb"], "bad extra": ["--extra", "boolq:512"],
             "extra not found": ["--extra", "boolq:validation:8", "--data-dir", str(tmp_path)],
             "save exists": ["--save", str(tmp_path / "saved")],
             "save names clash": ["--save", str(tmp_path / "saved")]}.get(case, [])
    proc = run_script("experiments/recover.py", "--model", str(tmp_path / "no-model"), "--rows", rows, "--output",
                      str(tmp_path / "out.jsonl"), *extra, "--checkpoint", *(str(tmp_path / c) for c in checkpoints))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("recover.py: error: "), proc.stderr
    assert message in lines[0] and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("script, argv, message", [
    ("bench.py", ["recipes", "--model", "{tmp}/none"], "no folder at {tmp}/none"),
    ("bench.py", ["widths", "--hidden", "x"], "argument --hidden: invalid int value: 'x'"),
    ("llamacpp.py", ["speed"], "the following arguments are required"),
    ("report.py", ["dense={tmp}/none.json"], "expected LABEL=FILE"),
    ("retention.py", ["{tmp}/none"], "cannot read the report of '{tmp}/none'"),
    ("retention.py", ["{tmp}/a", "{tmp}/b", "--labels", "a"], "--labels: give 2 different labels, one per checkpoint"),
    ("retention.py", ["{tmp}/a", "--output", "{tmp}/no/such/plot.png"], "cannot write {tmp}/no/such/plot.png"),
])
def test_experiment_scripts_refuse_bad_input_in_one_line(script, argv, message, tmp_path):
    """Every script in experiments/ has the command lines' error boundary: one `error:` line, exit 2."""
    proc = run_script(f"experiments/{script}", *(a.format(tmp=tmp_path) for a in argv))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{script}: error: ") and message.format(tmp=tmp_path) in lines[0], proc.stderr


def test_retention_plots_every_report_or_names_the_missing_matplotlib(tmp_path):
    """retention.py reads every report before it plots; without matplotlib it ends in one line."""
    report = {"units": {"ffn_per_layer": 8, "kv_per_layer": 2}, "layers": [
        {"ffn_channels": 4, "kv_groups": 1}, {"ffn_channels": 8, "kv_groups": 2}]}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "grasprune_report.json").write_text(json.dumps(report))
    proc = run_script("experiments/retention.py", str(tmp_path / "a"), "--output", str(tmp_path / "kept.png"))
    if importlib.util.find_spec("matplotlib") is None:
        assert proc.returncode == 2 and proc.stderr.strip() == (
            "retention.py: error: the plot needs matplotlib: pip install matplotlib"), proc.stderr
        assert not (tmp_path / "kept.png").exists()
    else:
        assert proc.returncode == 0 and (tmp_path / "kept.png").read_bytes()[:4] == b"\x89PNG", proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--held-out", "ptb"], "argument --held-out: give CORPUS:SPLIT, e.g. ptb:validation, not 'ptb'"),
    (["--test-windows", "0"], "argument --test-windows: give an integer of at least 1, not '0'"),
    (["--held-out", "nope:validation"], "text source 'nope' is neither"),
])
def test_ablate_refuses_bad_input_in_one_line(argv, message, tmp_path):
    proc = run_script("experiments/ablate.py", "--model", str(tmp_path / "no-model"), "--output",
                      str(tmp_path / "out.jsonl"), *argv)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ablate.py: error: ") and message in lines[0], proc.stderr
    assert proc.returncode == 2 and not (tmp_path / "out.jsonl").exists()


@pytest.mark.skipif(not (DATA / "ptb").is_dir(), reason=f"no evaluation data at {DATA}")
def test_recover_shuffles_extra_sequences_in_and_refuses_more_than_the_text_holds(tiny_folder):
    """recover.py end to end on a tiny checkpoint: --extra adds N sequences of a second text to the
    calibration data (every row trains on both); asking for more than that text holds ends in one
    `error:` line that names --extra, before the dense model is loaded, with nothing written."""
    checkpoint, text = tiny_folder / "pruned", tiny_folder / "extra.txt"
    proc = run_script("grasprune.py", "--model", str(tiny_folder / "tiny"), "--sparsity", "0.3", "--calib",
                      str(tiny_folder / "calib.txt"), "--nsamples", "4", "--seq-len", "16", "--epochs", "1",
                      "--recover-rank", "0", "--output", str(checkpoint))
    assert proc.returncode == 0, proc.stderr
    text.write_text("the short second text " * 20)
    common = ["--model", str(tiny_folder / "tiny"), "--checkpoint", str(checkpoint), "--rows", "r4+lr1e-3",
              "--data-dir", str(DATA), "--held-out-windows", "1", "--test-windows", "1"]
    refused = run_script("experiments/recover.py", *common, "--extra", f"{text}:any:1000", "--model",
                         str(tiny_folder / "unread"), "--output", str(tiny_folder / "refused.jsonl"))
    lines = refused.stderr.strip().splitlines()  # a dense model that is not there is never reached
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"recover.py: error: --extra {text}:any:1000: {text} makes "), lines[0]
    assert not (tiny_folder / "refused.jsonl").exists()
    proc = run_script("experiments/recover.py", *common, "--extra", f"{text}:any:3", "--output",
                      str(tiny_folder / "rows.jsonl"))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tiny_folder / "rows.jsonl").read_text().splitlines()]
    assert [(r["row"], r["calibration"], r["extra"]) for r in rows] == [
        (row, [4 + 3, 16], f"{text}:any:3") for row in ("checkpoint", "r4+lr1e-3")]
    assert rows[1]["final_loss"] is not None and rows[0]["parameters"] == rows[1]["parameters"]


@pytest.mark.parametrize("name", ["llama-gqa-bias", "qwen2"])
def test_output_scales_merge_into_the_rows_of_down_proj_and_o_proj(name):
    from experiments.recover import OutputScales

    model = sliced_model(name, no_attention=1)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    scales = OutputScales(model)
    with torch.no_grad():
        for t in scales.parameters():
            t.normal_()
    hooked = model(inputs()).logits
    scales.merge()
    torch.testing.assert_close(model(inputs()).logits, hooked, atol=1e-4, rtol=1e-4)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes and len(scales.factors) == 2 * 3


def test_norm_gains_and_output_scales_train_beside_the_low_rank_factors_and_keep_the_shapes():
    """Row parts norms and oscale: every RMSNorm gain and an output scale per hidden channel of down_proj
    and o_proj train with the factors (every gain moves); afterwards the shapes are the same and no
    parameter holds a gradient or asks for one (the scales' merge is checked above)."""
    from experiments.recover import recover

    model = sliced_model("llama-gqa-bias", no_attention=1)
    data = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    targets = grasprune.teacher_targets(tiny_model("llama-gqa-bias"), data, 1, 16)
    before = {n: p.clone() for n, p in model.named_parameters()}
    recover(model, data, targets, rank=2, lr=0.05, norms=True, oscale=True)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n in changed if "norm" in n} == {n for n in before if "norm" in n}
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in before.items()}


def test_sampled_sequences_run_their_length_from_the_start_token_and_repeat_with_the_seed(tokenizer):
    """recover.py --generated (and --calib self): the dense model's own samples, every one seq_len
    tokens long, no end-of-text token among them, the same for the same seed and others for another."""
    from cli import sample_from_model as sampled_sequences

    model = tiny_model("llama-gqa-bias")
    first = sampled_sequences(model, tokenizer, 5, 12, seed=0, batch_size=2)
    assert first.shape == (5, 12) and (first[:, 0] == tokenizer.bos_token_id).all()
    assert not (first[:, 1:] == tokenizer.eos_token_id).any()
    assert torch.equal(sampled_sequences(model, tokenizer, 5, 12, seed=0, batch_size=2), first)
    assert not torch.equal(sampled_sequences(model, tokenizer, 5, 12, seed=1, batch_size=2), first)
