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

From Python: `load_data()` reads the texts and task files, `evaluate()` scores them and
`markdown_table()` sets results side by side. grasprune.py reads its calibration corpora with
`load_text()` and measures `--eval` with `quality()` (the perplexity below and a greedy probe).
"""

import argparse
import contextlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
import torch.nn.functional as F
import transformers

import cli
import grasprune
from grasprune import UsageError, reading

# -----------------------------------------------------------------------------
# corpora and perplexity

# Each corpus: hub dataset, local file under --data-dir, text field, and the separator that the
# SparseGPT/Wanda perplexity protocol joins rows with.
CORPORA = {
    "wikitext2": (("Salesforce/wikitext", "wikitext-2-raw-v1"), "wikitext-2-raw-v1/{split}.parquet", "text", "\n\n"),
    "ptb": (("ptb-text-only/ptb_text_only", "penn_treebank"), "ptb/{split}.jsonl", "sentence", " "),
    "c4": (("allenai/c4", "en"), "c4/{split}.jsonl", "text", " "),
    "boolq": (("google/boolq", None), "boolq/{split}.jsonl", "passage", "\n\n"),  # Wikipedia paragraphs
}
C4_DOCUMENTS = 5000  # C4 splits are huge: the first documents already hold millions of tokens.


def read_rows(path: Path, field: str) -> list[str]:
    """Rows of one text field from a local .parquet or .jsonl file."""
    with reading(str(path)):
        if path.stat().st_size == 0:
            raise UsageError(f"{path} is empty")
        rows = datasets.load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path),
                                     split="train")
    if field not in rows.column_names:
        raise UsageError(f"{path} has no {field!r} field (its fields: {', '.join(rows.column_names)})")
    return rows[field]


def load_text(source: str, split: str, data_dir: str | None = None) -> str:
    """Text of a corpus split (wikitext2, ptb, c4, boolq's passages) from the hub or --data-dir, or of a local
    .txt/.jsonl/.parquet file; corpus rows joined as the SparseGPT/Wanda protocol does."""
    if source not in CORPORA:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"text source {source!r} is neither {', '.join(CORPORA)} nor a file")
        if path.suffix in (".jsonl", ".json", ".parquet"):
            return "\n\n".join(read_rows(path, "text"))
        with reading(str(path)):  # not UTF-8, unreadable
            return path.read_text(encoding="utf-8")
    (hub_id, hub_config), local, field, sep = CORPORA[source]
    if data_dir is not None:
        path = Path(data_dir) / local.format(split=split)
        if not path.is_file():
            raise UsageError(f"{source} {split} is not in --data-dir: no file {path}")
        rows = read_rows(path, field)
    else:
        try:
            rows = datasets.load_dataset(hub_id, hub_config, split=split, streaming=source == "c4")
            rows = [row[field] for _, row in zip(range(C4_DOCUMENTS), rows)] if source == "c4" else rows[field]
        except (OSError, ValueError) as err:  # ConnectionError offline, DatasetNotFoundError, bad config
            raise UsageError(f"cannot load {source} ({split}) from the Hugging Face hub ({type(err).__name__}); "
                             "pass --data-dir DIR with local copies laid out like shared/data, or a local text file")
    if source == "boolq":  # several questions share one passage: each passage once
        rows = list(dict.fromkeys(rows))
    return sep.join(rows)


def token_windows(tokenizer, text: str, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """(n, seq_len): the text tokenized once with the tokenizer's default special tokens (a LLaMA
    tokenizer puts one BOS at the very start), cut into non-overlapping windows, the first `limit`."""
    if seq_len < 2:
        raise UsageError(f"perplexity windows of {seq_len} tokens predict nothing; use at least 2")
    if limit is not None and limit < 1:
        raise UsageError(f"the first {limit} windows of a text: give at least 1")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len if limit is None else min(ids.numel() // seq_len, limit)
    if n == 0:
        raise UsageError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def perplexity(model, tokenizer, text: str, seq_len: int = 2048, batch_size: int = 1,
               limit_windows: int | None = None) -> float:
    """exp of the mean next-token NLL over the non-overlapping `seq_len`-token windows of `text`
    (the SparseGPT/Wanda protocol), `seq_len` capped at the model's context length; `limit_windows`
    keeps only the first windows."""
    windows = token_windows(tokenizer, text, min(seq_len, model.config.max_position_embeddings), limit_windows)
    return windows_perplexity(model, windows, batch_size)


@torch.no_grad()  # not inference_mode: FSDP2 reuses its gather buffers outside it
def windows_perplexity(model, windows: torch.Tensor, batch_size: int = 1) -> float:
    """exp of the mean next-token NLL over (n, L) windows of token ids (token_windows')."""
    nll = 0.0
    for batch in grasprune.progress(windows.split(batch_size), desc=f"perplexity ({windows.shape[1]}-token windows)"):
        batch = batch.to(grasprune.input_device(model))
        logits = model(batch).logits[:, :-1].float()
        targets = batch[:, 1:].to(logits.device)  # under --device-map the LM head may sit elsewhere
        nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
    # every window predicts seq_len - 1 tokens, so this is also the mean of per-window means
    return math.exp(nll / windows[:, 1:].numel())


EVAL_PROMPT = "The capital of France is"


def quality(model, tokenizer, text: str, windows: int | None) -> dict:
    """grasprune.py --eval: WikiText-2 test perplexity (2048-token windows), and one prompt's greedy
    continuation with its decode speed (batch 1), to see what pruning did."""
    ppl = perplexity(model, tokenizer, text, seq_len=2048, limit_windows=windows)
    prompt = tokenizer(EVAL_PROMPT, return_tensors="pt").input_ids.to(grasprune.input_device(model))
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32,
                         min_new_tokens=32, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    return {"perplexity": ppl, "decode_tokens_per_s": 32 / seconds, "prompt": EVAL_PROMPT,
            "continuation": tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)}

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

    Raises UsageError with a one-line fix when the data cannot be reached or read.
    """
    spec = TASKS[task]
    if data_dir is not None:
        path = Path(data_dir) / spec.local
        if not path.is_file():
            raise UsageError(f"{task}: {path} not found; --data-dir must be laid out like shared/data "
                             f"(it needs {spec.local})")
        with reading(str(path)), open(path, encoding="utf-8") as f:
            lines = f.readlines()
        docs = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                with reading(f"{path} line {number}"):  # not JSON, or a row without the task's fields
                    docs.append(json.loads(line))
                    spec.item(docs[-1])
        return docs
    name, config, split = spec.hub
    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # offline, gated, moved: the fix is the same
        raise UsageError(f"{task}: cannot load {name} from the Hugging Face Hub ({type(e).__name__}); "
                         f"pass --data-dir DIR with local copies laid out like shared/data") from e


def load_data(tasks: tuple[str, ...], ppl: tuple[str, ...], data_dir: str | None) -> dict:
    """Every text (`ppl`: sources of load_text) and task file an evaluation reads, read before any
    model is loaded or scored: a missing or malformed one is refused at once, with its name."""
    return {"texts": {source: load_text(source, PPL_SPLITS.get(source, "test"), data_dir) for source in ppl},
            "docs": {task: load_docs(task, data_dir) for task in tasks}}


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


@torch.no_grad()
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
    with grasprune.progress(total=len(requests), desc=desc, unit="choice") as bar:
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


def zero_shot(model, tokenizer, docs: dict[str, list[dict]], limit: int | None, batch_size: int,
              shard: tuple[int, int] = (1, 1)) -> dict:
    """Results per task of `docs` (load_data's): the first `limit` rows of each when given; with
    `shard` (i, n), only the i-th of n contiguous slices of them, its bounds under "items" and the
    number of rows it is a slice of under "of", so that a join can tell whether all slices are in.
    A task whose shard is empty prints one line saying so and gets {"error": line}; the others run.
    """
    results = {}
    for task, rows in docs.items():
        rows = rows[:limit]
        first, end = (len(rows) * (shard[0] - 1) // shard[1], len(rows) * shard[0] // shard[1])
        if first == end:
            message = f"{task}: shard {shard[0]}/{shard[1]} of its {len(rows)} items is empty"
            print(f"error: {message}", file=sys.stderr)
            results[task] = {"error": message}
            continue
        start = time.time()
        items = [TASKS[task].item(doc) for doc in rows[first:end]]
        results[task] = score_items(model, tokenizer, items, TASKS[task].metrics, batch_size, desc=task)
        results[task] |= {"items": [first, end], "of": len(rows), "seconds": round(time.time() - start, 1)}
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


def evaluate(model, tokenizer, data: dict, seq_len: int = 2048, limit: int | None = None, batch_size: int = 16,
             shard: tuple[int, int] = (1, 1)) -> dict:
    """Perplexity on each text and accuracy on each task of `data` (load_data's), with the model's
    sizes and timings. `limit` keeps the first `limit` items of every task and windows of every
    text; `shard` (i, n) scores the i-th of n slices of every task's items (zero_shot). Every text
    is cut into windows before anything is scored, so one too short for a window is refused at once.
    """
    start = time.time()
    seq_len = min(seq_len, model.config.max_position_embeddings)
    windows = {}
    for source, text in data["texts"].items():
        first = min(limit or 256, 256) if source == "c4" else limit  # SparseGPT scores C4's first 256 windows
        try:
            windows[source] = token_windows(tokenizer, text, seq_len, first)
        except UsageError as err:
            raise UsageError(f"--ppl {source}: {err} (lower --seq-len)") from None
    result = {"summary": grasprune.model_summary(model), "perplexity": {}}
    for source, ids in windows.items():
        t = time.time()
        result["perplexity"][source] = {"ppl": windows_perplexity(model, ids), "seq_len": seq_len,
                                        "seconds": round(time.time() - t, 1)}
    scores = zero_shot(model, tokenizer, data["docs"], limit, batch_size, shard)
    result["tasks"] = {task: r for task, r in scores.items() if "error" not in r}
    result["errors"] = {task: r["error"] for task, r in scores.items() if "error" in r}
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


def write_results(path: Path, result: dict) -> None:
    """The results JSON, written whole (a temporary file renamed into place). Should that fail at
    the end of a long run, the results are kept beside it (or in the temporary folder), said where."""
    text = json.dumps(result, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        for folder in (path.parent, tempfile.gettempdir()):
            with contextlib.suppress(OSError):
                handle, kept = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=".json", dir=folder)
                with os.fdopen(handle, "w") as f:
                    f.write(text)
                raise UsageError(f"cannot write {path} ({grasprune.cause_of(err)}); the results are in {kept}")
        raise


def run(argv: list[str] | None = None) -> int:
    """The command line's run: every check and every data file before the weights load."""
    parser = cli.ArgumentParser(prog="eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="hub id, local HF folder, .gguf file, or an output folder of grasprune.py")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--device-map", help="auto: spread a model too big for one GPU over all GPUs and CPU memory")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS),
                        help="zero-shot tasks (none: perplexity only)")
    parser.add_argument("--ppl", nargs="*", default=["wikitext2"],
                        help=f"perplexity on {', '.join(CORPORA)} or a text file (none: skip)")
    parser.add_argument("--seq-len", type=int, default=2048, help="perplexity window, capped at the model's context")
    parser.add_argument("--data-dir", help="local copies laid out like shared/data; no network")
    parser.add_argument("--limit", type=int, help="first N items per task and windows per text, for quick runs")
    parser.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    parser.add_argument("--shard", type=shard_of, default=(1, 1), metavar="I/N",
                        help="score only the I-th of N slices of every task's items (a long run in parts; "
                             "experiments/report.py joins them); perplexity is not split: pass --ppl alone")
    parser.add_argument("--output", help="write the results JSON here")
    args = parser.parse_args(argv)
    for name, least in (("seq_len", 2), ("batch_size", 1)) + ((("limit", 1),) if args.limit is not None else ()):
        if getattr(args, name) < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.shard != (1, 1) and args.ppl:
        raise UsageError("--shard splits the zero-shot tasks only: run the perplexity on its own, "
                         "and pass --ppl with no source here")
    if args.output:
        cli.check_output(Path(args.output), True, folder=False, inputs=(args.model, args.data_dir, *args.ppl))
    grasprune.load_config(args.model)
    data = load_data(args.tasks, args.ppl, args.data_dir)
    model, tokenizer = grasprune.load_model(args.model, args.device, args.dtype, args.device_map)
    result = evaluate(model, tokenizer, data, args.seq_len, args.limit, args.batch_size, args.shard)
    result = {"model": args.model, **result,
              "settings": {**vars(args), "device": str(grasprune.input_device(model)),
                           "dtype": str(next(model.parameters()).dtype)},
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "datasets": datasets.__version__},
              "hardware": cli.hardware()}
    print(markdown_table({args.model: result}))
    if args.output:
        write_results(Path(args.output), result)
    return 1 if result["errors"] else 0  # a task whose shard was empty (its line said why)


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli("eval", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
