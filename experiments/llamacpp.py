"""Dense and pruned models in llama.cpp: WikiText-2 perplexity next to transformers' on the same
windows, prompt and generation speed side by side, file sizes, and matrices left unquantized.

  python experiments/llamacpp.py perplexity --bin ~/llama/build/bin --data-dir ../shared/data \
      --models $GGUF smollm2-s0.3 smollm2-s0.5 --outtypes f16 q8_0 --output llamacpp-ppl.json
  python experiments/llamacpp.py speed --bin ~/llama/build/bin llamacpp-work/*.gguf --output llamacpp-speed.json

perplexity: each model is exported with export_gguf.py (into --work), then llama-perplexity runs
on WikiText-2 test as eval.py joins it, in windows of 2048 tokens: the same windows as eval.py's
(the first --windows of them).
llama.cpp scores the second half of each window (its tokens see at least 1024 of context), so
transformers' perplexity is given both over those same tokens and over every token (eval.py's
number). Both tokenizations are compared (llama-tokenize): where they first differ, the windows
from there on are not the same tokens in both engines. speed: llama-bench, prompt 512
and 128 generated tokens, each file once per round, the files alternating within every round so
that load on the machine reaches all alike; medians.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli
import eval as evaluation
import export_gguf
import grasprune

WINDOW = 2048


@torch.inference_mode()
def transformers_perplexity(model, ids: torch.Tensor, count: int | None) -> dict:
    """Perplexity over every predicted token of the first `count` windows (all: None; eval.py's
    number) and over their second halves only (llama-perplexity's), from one forward per window."""
    windows = ids[: ids.numel() // WINDOW * WINDOW].view(-1, WINDOW)[:count]
    nll = torch.zeros(2, dtype=torch.float64)
    for window in tqdm(windows, desc="transformers perplexity"):
        logits = model(window[None]).logits[0, :-1].float()
        losses = F.cross_entropy(logits, window[1:], reduction="none").double()
        nll += torch.stack([losses.sum(), losses[WINDOW // 2:].sum()])  # predicted from positions 1024 on
    every, second_half = len(windows) * (WINDOW - 1), len(windows) * (WINDOW - 1 - WINDOW // 2)
    return {"all_tokens": math.exp(nll[0] / every), "second_half": math.exp(nll[1] / second_half),
            "windows": len(windows)}


def llama_perplexity(binary: Path, gguf: Path, text: Path, threads: int, count: int | None) -> float:
    chunks = ["--chunks", str(count)] if count else []
    out = subprocess.run([str(binary / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(WINDOW),
                          "-b", str(WINDOW), "-t", str(threads), *chunks], capture_output=True, text=True, check=True)
    line = next(line for line in out.stderr.splitlines() + out.stdout.splitlines() if "Final estimate" in line)
    return float(line.split("PPL = ")[1].split()[0])


def llama_tokens(binary: Path, gguf: Path, text: Path) -> list[int]:
    out = subprocess.run([str(binary / "llama-tokenize"), "-m", str(gguf), "-f", str(text), "--ids",
                          "--log-disable"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip())


def llama_bench(binary: Path, gguf: Path, threads: int) -> dict:
    out = subprocess.run([str(binary / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128",
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    return {("prompt" if r["n_prompt"] else "generation"): r["avg_ts"] for r in rows}


def token_agreement(ours: list[int], theirs: list[int]) -> dict:
    """How many tokens each engine made of the text, and where their ids first differ (None: nowhere)."""
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None and len(ours) != len(theirs):
        first = min(len(ours), len(theirs))
    return {"transformers": len(ours), "llama_cpp": len(theirs), "first_difference": first}


def perplexities(args) -> dict:
    args.work.mkdir(exist_ok=True)
    text = evaluation.load_text("wikitext2", "test", args.data_dir)
    text_file = args.work / "wikitext-2-test.txt"
    text_file.write_text(text)
    results = {}
    for name in args.models:
        model, tokenizer = grasprune.load_model(name, "cpu", "float32")
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        label = Path(name.rstrip("/")).name.removesuffix(".gguf")
        results[label] = {"transformers": transformers_perplexity(model, ids, args.windows),
                          "parameters": grasprune.model_summary(model)["parameters"]}
        for outtype in args.outtypes:
            path = args.work / f"{label}-{outtype}.gguf"
            summary = export_gguf.write_gguf(model, tokenizer, path, outtype, export_gguf.source_gguf(name))
            results[label][outtype] = {
                "file": str(path), "bytes": summary["bytes"],
                "matrices_not_in_outtype": summary["matrices_not_in_outtype"],
                "tokens": token_agreement(ids.tolist(), llama_tokens(args.bin, path, text_file)),
                "llama_cpp_perplexity": llama_perplexity(args.bin, path, text_file, args.threads, args.windows)}
            print(json.dumps({label: results[label]}), flush=True)
    return results


def speeds(args) -> dict:
    runs = {str(path): [] for path in args.files}
    for _ in range(args.rounds):
        for path in args.files:
            runs[str(path)].append(llama_bench(args.bin, path, args.threads))
    return {path: {kind: sorted(r[kind] for r in rs)[len(rs) // 2] for kind in ("prompt", "generation")}
            | {"runs": rs} for path, rs in runs.items()}


def main() -> None:
    p = cli.ArgumentParser(prog="llamacpp.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("perplexity", help="export, then llama.cpp's and transformers' perplexity")
    ppl.add_argument("--models", nargs="+", required=True, help="the dense model first, then pruned checkpoints")
    ppl.add_argument("--outtypes", nargs="+", default=["f16", "q8_0"])
    ppl.add_argument("--data-dir", required=True)
    ppl.add_argument("--windows", type=int, help="the first N windows of 2048 tokens (default: all 148)")
    ppl.add_argument("--work", type=Path, default=Path("llamacpp-work"), help="where the GGUF files go")
    speed = sub.add_parser("speed", help="llama-bench, files alternating")
    speed.add_argument("files", nargs="+", type=Path)
    speed.add_argument("--rounds", type=int, default=5)
    for q in (ppl, speed):
        q.add_argument("--bin", required=True, type=Path, help="llama.cpp's build/bin folder")
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--output", required=True)
    args = p.parse_args()
    results = perplexities(args) if args.command == "perplexity" else speeds(args)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(cli.run_cli("llamacpp.py", main))
