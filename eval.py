"""Judge a dense or GRASPrune-pruned causal LM by the two numbers pruning papers report.

* Perplexity, SparseGPT/Wanda protocol: WikiText-2 raw test rows joined with "\n\n",
  tokenized once, cut into non-overlapping windows of `seq_len` tokens (the tail that does
  not fill a window is dropped); perplexity = exp(mean next-token NLL over all windows).
  PTB and C4 the same way where their text is given.
* Zero-shot accuracy on PIQA, WinoGrande, HellaSwag, ARC-Easy and ARC-Challenge with the
  prompts, text cleaning, target delimiter, tokenization and metrics of
  lm-evaluation-harness 0.4 (read from lm_eval 0.4.13): every answer choice is scored by
  the log-likelihood of its continuation given the context; `acc` is right when the best
  choice is the gold one, `acc_norm` when the best log-likelihood per character of the
  choice is.

    python eval.py --model HuggingFaceTB/SmolLM2-135M --data-dir ../shared/data --output r.json

From Python: `evaluate()` runs it all and `markdown_table()` sets results side by side;
`perplexity()` is grasprune.perplexity (grasprune.py's `--eval` measures the same way).
"""

import argparse
import json
import math
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

import grasprune
from grasprune import perplexity

# -----------------------------------------------------------------------------
# zero-shot tasks: what lm-evaluation-harness 0.4 scores for each dataset row


class Item(NamedTuple):
    """One question, as the harness's (context, continuation) requests, one per choice."""
    contexts: list[str]
    continuations: list[str]  # the target delimiter " " included
    choices: list[str]  # the harness's doc_to_choice; acc_norm divides by len(choice)
    gold: int


def multiple_choice(context: str, choices: list[str], gold: int) -> Item:
    """One shared context, each choice after the target delimiter " "."""
    return Item([context] * len(choices), [" " + c for c in choices], choices, gold)


def piqa_item(doc: dict) -> Item:
    return multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def arc_item(doc: dict) -> Item:
    choices = doc["choices"]
    return multiple_choice(f"Question: {doc['question']}\nAnswer:", list(choices["text"]),
                           list(choices["label"]).index(doc["answerKey"]))


def hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag cleaning: WikiHow's " [title]" becomes a sentence break, other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict) -> Item:
    context = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return multiple_choice(hellaswag_clean(context), [hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def winogrande_item(doc: dict) -> Item:
    """Partial scoring: each option fills the blank of the prefix, and the same suffix is scored after it."""
    sentence = doc["sentence"]
    blank = sentence.index("_")
    prefixes = [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]]
    suffix = " " + sentence[blank + 1:].strip()
    return Item(prefixes, [suffix, suffix], prefixes, int(doc["answer"]) - 1)


class Task(NamedTuple):
    hub: tuple[str, str | None, str]  # (dataset, config, split) as lm_eval 0.4.13 loads it
    local: str  # the same split under --data-dir (layout of shared/data)
    item: Callable[[dict], Item]
    metrics: tuple[str, ...]  # those the harness reports; the last is the headline


TASKS = {
    "piqa": Task(("baber/piqa", None, "validation"), "piqa/validation.jsonl", piqa_item, ("acc", "acc_norm")),
    "winogrande": Task(("allenai/winogrande", "winogrande_xl", "validation"), "winogrande_xl/validation.jsonl",
                       winogrande_item, ("acc",)),
    "hellaswag": Task(("Rowan/hellaswag", None, "validation"), "hellaswag/validation.jsonl", hellaswag_item,
                      ("acc", "acc_norm")),
    "arc_easy": Task(("allenai/ai2_arc", "ARC-Easy", "test"), "ai2_arc/ARC-Easy/test.jsonl", arc_item,
                     ("acc", "acc_norm")),
    "arc_challenge": Task(("allenai/ai2_arc", "ARC-Challenge", "test"), "ai2_arc/ARC-Challenge/test.jsonl",
                          arc_item, ("acc", "acc_norm")),
}


def load_docs(task: str, data_dir: str | None) -> list[dict]:
    """The task's evaluation rows: from `data_dir` if given, else from the Hub through `datasets`.

    Raises grasprune.UsageError with a one-line fix when the data cannot be reached.
    """
    spec = TASKS[task]
    if data_dir is not None:
        path = Path(data_dir) / spec.local
        if not path.is_file():
            raise grasprune.UsageError(f"{task}: {path} not found; --data-dir must be laid out like shared/data "
                                       f"(it needs {spec.local})")
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    name, config, split = spec.hub
    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # offline, gated, moved: the fix is the same
        raise grasprune.UsageError(f"{task}: cannot load {name} from the Hugging Face Hub ({type(e).__name__}); "
                                   f"pass --data-dir DIR with local copies laid out like shared/data") from e


# -----------------------------------------------------------------------------
# scoring


def encode_requests(tokenizer, requests: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per (context, continuation), as the harness's HF model makes them.

    Trailing spaces move from the context to the continuation; the continuation's ids are
    those of context + continuation past the context's own ids, so a token that spans the
    boundary counts as continuation. Both use the tokenizer's default special tokens.
    """
    context_ids = tokenizer([context.rstrip() for context, _ in requests]).input_ids
    whole_ids = tokenizer([context + continuation for context, continuation in requests]).input_ids
    return [(c, w[len(c):]) for c, w in zip(context_ids, whole_ids)]


@dataclass
class Row:
    """A context and the continuations scored after it, packed into one sequence."""
    context: list[int]
    continuations: list[list[int]] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)  # index of each continuation's request

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def pack(rows: list[Row], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, position ids and additive 4D attention mask for `rows`, and
    for every scored token its (row, position, target id, request).

    A row is the context followed by each continuation minus its last token; a
    continuation's block sees the context and its own earlier tokens and takes positions
    right after the context, so each choice gets exactly the logits it would get alone.
    """
    length = max(r.length for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    allowed = torch.eye(length, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding sees itself
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scored = []  # (row, position, target, request)
    for b, row in enumerate(rows):
        n = len(row.context)
        ids[b, :n] = torch.tensor(row.context)
        positions[b, :n] = torch.arange(n)
        allowed[b, :n, :n] = causal[:n, :n]
        start = n
        for cont, request in zip(row.continuations, row.requests):
            k = len(cont) - 1
            ids[b, start:start + k] = torch.tensor(cont[:-1])
            positions[b, start:start + k] = torch.arange(n, n + k)
            allowed[b, start:start + k, :n] = True
            allowed[b, start:start + k, start:start + k] = causal[:k, :k]
            # the context's last position predicts the first token, the block the rest
            for position, target in zip([n - 1, *range(start, start + k)], cont):
                scored.append((b, position, target, request))
            start += k
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, positions, mask[:, None], torch.tensor(scored).T


@torch.inference_mode()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], batch_size: int,
                   desc: str | None = None) -> list[float]:
    """log p(continuation | context), summed over the continuation's tokens, per request.

    Requests whose context ids are equal share one packed row, so an N-choice question
    runs its context through the model once, not N times. Rows are sorted by length and
    `batch_size` of them go through the model at once; only the scored positions go
    through the LM head, with a float32 log-softmax.
    """
    groups: dict[tuple[int, ...], Row] = {}
    for i, (context, continuation) in enumerate(encode_requests(tokenizer, requests)):
        if not continuation:  # the harness refuses these too
            raise ValueError(f"continuation {requests[i][1]!r} has no tokens of its own after {requests[i][0]!r}")
        row = groups.setdefault(tuple(context), Row(context))
        row.continuations.append(continuation)
        row.requests.append(i)
    rows = sorted(groups.values(), key=lambda r: r.length, reverse=True)
    dtype, device = next(model.parameters()).dtype, grasprune.input_device(model)
    scores = torch.zeros(len(requests), dtype=torch.float64)
    with tqdm(total=len(requests), desc=desc, unit="choice") as bar:
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            ids, positions, mask, (b, pos, target, request) = pack(chunk, dtype)
            hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      position_ids=positions.to(device)).last_hidden_state
            logits = model.get_output_embeddings()(hidden[b.to(hidden.device), pos.to(hidden.device)])
            logprobs = F.log_softmax(logits.float(), dim=-1).gather(1, target.to(logits.device)[:, None])[:, 0]
            scores.index_add_(0, request, logprobs.double().cpu())
            bar.update(sum(len(r.requests) for r in chunk))
    return scores.tolist()


def argmax(values: list[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy's argmax)."""
    return max(range(len(values)), key=values.__getitem__)


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error with the sample standard deviation, as the harness reports them."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def join_shards(shards: list[dict]) -> dict:
    """One task's result from its scores on disjoint slices of its items (eval.py --shard): each
    metric is the mean over all items and its stderr is mean_and_stderr's over all items, exact
    because every item scores 0 or 1 (the sample variance of 0/1 values is n p (1 - p) / (n - 1))."""
    shards = sorted(shards, key=lambda r: r["items"][0])
    if [r["items"][1] for r in shards[:-1]] != [r["items"][0] for r in shards[1:]] or shards[0]["items"][0]:
        raise ValueError(f"the slices {[r['items'] for r in shards]} do not tile the items from the first on")
    totals = {r["of"] for r in shards if "of" in r}  # results written before eval.py recorded it lack it
    if len(totals) > 1:
        raise ValueError(f"the slices are of different item lists (of {sorted(totals)} items)")
    n = sum(r["n"] for r in shards)
    result = {"metric": shards[0]["metric"], "n": n, "items": [0, shards[-1]["items"][1]],
              "seconds": round(sum(r["seconds"] for r in shards), 1)} | ({"of": totals.pop()} if totals else {})
    for metric in [key for key in shards[0] if f"{key}_stderr" in shards[0]]:
        p = sum(r[metric] * r["n"] for r in shards) / n
        result[metric], result[f"{metric}_stderr"] = p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
    return result


def score_items(model, tokenizer, items: list[Item], metrics: tuple[str, ...], batch_size: int,
                desc: str | None = None) -> dict:
    """The harness's multiple-choice metrics over `items`: each metric, its stderr, and n."""
    requests = [pair for item in items for pair in zip(item.contexts, item.continuations)]
    lls = loglikelihoods(model, tokenizer, requests, batch_size, desc)
    correct = {"acc": [], "acc_norm": []}
    start = 0
    for item in items:
        ll = lls[start:start + len(item.choices)]
        start += len(item.choices)
        correct["acc"].append(float(argmax(ll) == item.gold))
        correct["acc_norm"].append(float(argmax([x / len(c) for x, c in zip(ll, item.choices)]) == item.gold))
    result = {}
    for metric in metrics:
        result[metric], result[f"{metric}_stderr"] = mean_and_stderr(correct[metric])
    result["metric"] = metrics[-1]
    result["n"] = len(items)
    return result


def zero_shot(model, tokenizer, tasks: tuple[str, ...], data_dir: str | None, limit: int | None,
              batch_size: int, shard: tuple[int, int] = (1, 1)) -> dict:
    """Results per task (the first `limit` rows of each when given; with `shard` (i, n), only the
    i-th of n contiguous slices of them, its bounds under "items" and the number of rows it is
    a slice of under "of", so that a join can tell whether all slices are in).

    A task whose data cannot be reached (or whose shard is empty) prints one line saying so and
    gets {"error": line}; the other tasks still run.
    """
    results = {}
    for task in tasks:
        try:
            docs = load_docs(task, data_dir)[:limit]
            first, end = (len(docs) * (shard[0] - 1) // shard[1], len(docs) * shard[0] // shard[1])
            if first == end:
                raise grasprune.UsageError(f"{task}: shard {shard[0]}/{shard[1]} of its {len(docs)} items is empty")
        except grasprune.UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            results[task] = {"error": str(e)}
            continue
        start = time.time()
        items = [TASKS[task].item(doc) for doc in docs[first:end]]
        results[task] = score_items(model, tokenizer, items, TASKS[task].metrics, batch_size, desc=task)
        results[task] |= {"items": [first, end], "of": len(docs), "seconds": round(time.time() - start, 1)}
    return results


def mean_of_tasks(results: dict) -> dict | None:
    """Unweighted mean of the tasks' headline metrics; its stderr treats the tasks as independent."""
    done = {task: r for task, r in results.items() if "error" not in r}
    if not done:
        return None
    values = [r[r["metric"]] for r in done.values()]
    errors = [r[f"{r['metric']}_stderr"] for r in done.values()]
    stderr = None if None in errors else math.sqrt(sum(e * e for e in errors)) / len(errors)
    return {"value": sum(values) / len(values), "stderr": stderr, "n": sum(r["n"] for r in done.values()),
            "tasks": list(done)}


# -----------------------------------------------------------------------------
# the whole evaluation


PPL_SPLITS = {"wikitext2": "test", "ptb": "test", "c4": "validation"}


def evaluate(model, tokenizer, tasks: tuple[str, ...] = tuple(TASKS), ppl: tuple[str, ...] = ("wikitext2",),
             data_dir: str | None = None, seq_len: int = 2048, limit: int | None = None,
             batch_size: int = 16, shard: tuple[int, int] = (1, 1)) -> dict:
    """Perplexity on each of `ppl` and accuracy on each of `tasks`, with the model's sizes and timings.

    `ppl` names sources of grasprune.load_text (wikitext2, ptb, c4, or a text file);
    `limit` keeps the first `limit` items of every task and windows of every text; `shard`
    (i, n) scores the i-th of n slices of every task's items (zero_shot).
    Data that cannot be reached is reported under "errors" and the rest still runs.
    """
    start = time.time()
    result = {"summary": grasprune.model_summary(model), "perplexity": {}, "errors": {}}
    for source in ppl:
        t = time.time()
        try:
            text = grasprune.load_text(source, PPL_SPLITS.get(source, "test"), data_dir)
        except grasprune.UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            result["errors"][source] = str(e)
            continue
        # SparseGPT scores C4 on its first 256 windows only
        windows = min(limit or 256, 256) if source == "c4" else limit
        result["perplexity"][source] = {
            "ppl": perplexity(model, tokenizer, text, seq_len, limit_windows=windows),
            "seq_len": min(seq_len, model.config.max_position_embeddings), "seconds": round(time.time() - t, 1)}
    scores = zero_shot(model, tokenizer, tasks, data_dir, limit, batch_size, shard)
    result["tasks"] = {task: r for task, r in scores.items() if "error" not in r}
    result["errors"].update({task: r["error"] for task, r in scores.items() if "error" in r})
    result["mean"] = mean_of_tasks(result["tasks"])
    result["seconds"] = round(time.time() - start, 1)
    return result


def markdown_table(results: dict[str, dict]) -> str:
    """One row per labelled evaluate() result: size, perplexities, headline task metrics and their mean in %."""
    first = next(iter(results.values()))
    sources, tasks = list(first["perplexity"]), list(first["tasks"])
    header = ["model", "params (M)", *(f"{s} ppl" for s in sources),
              *(f"{t} {first['tasks'][t]['metric']}" for t in tasks), "mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in results.items():
        cells = [label, f"{r['summary']['parameters'] / 1e6:.1f}",
                 *(f"{r['perplexity'][s]['ppl']:.2f}" for s in sources),
                 *(f"{100 * r['tasks'][t][r['tasks'][t]['metric']]:.2f}" for t in tasks),
                 f"{100 * r['mean']['value']:.2f}" if r["mean"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shard_of(text: str) -> tuple[int, int]:
    """--shard I/N as (I, N), 1 <= I <= N."""
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, got {text!r}")
    return int(i), int(n)


def main(argv: list[str] | None = None) -> int:
    parser = grasprune.ArgumentParser(prog="eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="hub id, local HF folder, .gguf file, or an output folder of grasprune.py")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--device-map", help="auto: spread a model too big for one GPU over all GPUs and CPU memory")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS),
                        help="zero-shot tasks (none: perplexity only)")
    parser.add_argument("--ppl", nargs="*", default=["wikitext2"],
                        help="perplexity on wikitext2, ptb, c4 or a text file (none: skip)")
    parser.add_argument("--seq-len", type=int, default=2048, help="perplexity window, capped at the model's context")
    parser.add_argument("--data-dir", help="local copies laid out like shared/data; no network")
    parser.add_argument("--limit", type=int, help="first N items per task and windows per text, for quick runs")
    parser.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    parser.add_argument("--shard", type=shard_of, default=(1, 1), metavar="I/N",
                        help="score only the I-th of N slices of every task's items (a long run in parts; "
                             "experiments/report.py joins them); perplexity is not split: pass --ppl alone")
    parser.add_argument("--output", help="write the results JSON here")
    try:
        args = parser.parse_args(argv)
        for name in ("seq_len", "batch_size") + (("limit",) if args.limit is not None else ()):
            if getattr(args, name) < 1:
                raise grasprune.UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if args.shard != (1, 1) and args.ppl:
            raise grasprune.UsageError("--shard splits the zero-shot tasks only: run the perplexity on its own, "
                                       "and pass --ppl with no source here")
        if args.output and not Path(args.output).parent.is_dir():
            raise grasprune.UsageError(f"--output {args.output}: no folder {Path(args.output).parent}")
        model, tokenizer = grasprune.load_model(args.model, args.device, args.dtype, args.device_map)
    except grasprune.UsageError as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    result = evaluate(model, tokenizer, args.tasks, args.ppl, args.data_dir, args.seq_len, args.limit,
                      args.batch_size, args.shard)
    result = {"model": args.model, **result,
              "settings": {**vars(args), "device": str(grasprune.input_device(model)),
                           "dtype": str(next(model.parameters()).dtype)},
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "datasets": datasets.__version__}}
    print(markdown_table({args.model: result}))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["errors"] else 0  # a task whose data could not be reached (its line said why)


if __name__ == "__main__":
    sys.exit(main())
