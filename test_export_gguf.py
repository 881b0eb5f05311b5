"""Tests of export_gguf.py: what the file holds, read back with the gguf package's reader, against
the model it came from; the tokenizer against llama.cpp's own converter (the SmolLM2 GGUF) and
against SentencePiece; and, where llama.cpp is built, llama.cpp's log-probabilities against
transformers' on the same tokens.

llama.cpp runs only when LLAMA_PERPLEXITY names its llama-perplexity binary (the README says how
to build it); those tests are skipped otherwise.
"""

import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

import eval as evaluation
import export_gguf
import grasprune
from conftest import (
    DATA,
    needs_smollm2,
    random_gate,
    smollm2_path,
    text_corpus,
    tiny_model,
)

LLAMA_PERPLEXITY = os.environ.get("LLAMA_PERPLEXITY")
needs_llama_cpp = pytest.mark.skipif(not LLAMA_PERPLEXITY, reason="set LLAMA_PERPLEXITY to llama.cpp's binary")


def pruned(name: str, no_attention: list[int] = (), seed: int = 1, **config):
    """A tiny model with a random mask and random scales sliced in, `no_attention` layers keeping
    no KV group."""
    model = tiny_model(name, **config)
    units = grasprune.find_units(model)
    gate = random_gate(units, seed)
    for layer in no_attention:
        units.kv(gate)[layer] = 0.0
    return grasprune.slice_model(model, units, gate)


# name -> (tiny model, attention-free layers, config changes)
MODELS = {
    "llama-mha untied": ("llama-mha", [], {"tie_word_embeddings": False}),
    "llama-gqa-bias, no attention in layers 0 and 1": ("llama-gqa-bias", [0, 1], {}),
    "mistral, no attention in layer 2": ("mistral", [2], {}),
    "mistral, no attention in layer 0, tied": ("mistral", [0], {"tie_word_embeddings": True}),
    "qwen2 tied": ("qwen2", [], {"tie_word_embeddings": True}),
    "qwen2, no attention in layer 1": ("qwen2", [1], {}),
    "llama3 rope, dense": ("llama-mha", None, {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
}


def model_of(case: str):
    name, no_attention, config = MODELS[case]
    return tiny_model(name, **config) if no_attention is None else pruned(name, no_attention, **config)


def unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout back to transformers': rows 2i and 2i + 1 of a head go to i and
    i + head_dim / 2 (written here independently of export_gguf.rope_permute)."""
    rows = weight.shape[0] // n_head
    return weight.reshape(n_head, rows // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_fields(path: Path) -> dict:
    """Every key of a GGUF file with its value."""
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()
            if not key.startswith("GGUF.")}


def read_back(path: Path) -> tuple[dict, dict]:
    """(fields, tensors) of a GGUF file: every key's value, every tensor as float32 [out, in]."""
    tensors = {}
    for t in gguf.GGUFReader(path).tensors:
        data = np.array(t.data)
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        tensors[t.name] = (data.astype(np.float32), t.tensor_type)
    return read_fields(path), tensors


def expected_tensors(model) -> dict[str, tuple[torch.Tensor, int | None]]:
    """What each GGUF tensor must hold, from the model's own modules: (weight, heads to unpermute)."""
    head_dim = model.config.head_dim or model.config.hidden_size // model.config.num_attention_heads
    out = {"token_embd.weight": (model.model.embed_tokens.weight, None),
           "output_norm.weight": (model.model.norm.weight, None)}
    if not model.config.tie_word_embeddings:
        out["output.weight"] = (model.lm_head.weight, None)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        out[f"blk.{i}.ffn_norm.weight"] = (layer.post_attention_layernorm.weight, None)
        for proj, name in ((mlp.gate_proj, "ffn_gate"), (mlp.up_proj, "ffn_up"), (mlp.down_proj, "ffn_down"),
                           (attn.o_proj, "attn_output")):
            out[f"blk.{i}.{name}.weight"] = (proj.weight, None)
            if proj.bias is not None:
                out[f"blk.{i}.{name}.bias"] = (proj.bias, None)
        if not hasattr(attn, "k_proj"):
            del out[f"blk.{i}.attn_output.weight"]  # no columns left; its bias stays
        else:
            out[f"blk.{i}.attn_norm.weight"] = (layer.input_layernorm.weight, None)
            for proj, name in ((attn.q_proj, "attn_q"), (attn.k_proj, "attn_k"), (attn.v_proj, "attn_v")):
                heads = None if name == "attn_v" else proj.out_features // head_dim
                out[f"blk.{i}.{name}.weight"] = (proj.weight, heads)
                if proj.bias is not None:
                    out[f"blk.{i}.{name}.bias"] = (proj.bias, heads)
    return out


@pytest.mark.parametrize("case", MODELS)
def test_f32_round_trip_is_exact(case, tmp_path, tokenizer):
    """Every per-layer array equals the model's shapes; every tensor, un-permuted, equals the
    model's weight bit for bit; a layer without attention has no attention tensors, or (layer 0,
    or a layer with an o_proj bias) one stand-in head of zeros."""
    model = model_of(case)
    summary = export_gguf.write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    fields, tensors = read_back(tmp_path / "m.gguf")
    config, layers = model.config, model.model.layers
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    assert fields["general.architecture"] == "deci" and fields["general.file_type"] == 0
    assert fields["deci.feed_forward_length"] == [layer.mlp.up_proj.out_features for layer in layers]
    stand_in = [not hasattr(layer.self_attn, "k_proj") and (i == 0 or layer.self_attn.o_proj.bias is not None)
                for i, layer in enumerate(layers)]
    heads = [layer.self_attn.q_proj.out_features // head_dim if hasattr(layer.self_attn, "q_proj") else int(s)
             for s, layer in zip(stand_in, layers)]
    kv_heads = [layer.self_attn.k_proj.out_features // head_dim if hasattr(layer.self_attn, "k_proj") else int(s)
                for s, layer in zip(stand_in, layers)]
    assert fields["deci.attention.head_count"] == heads == summary["head_count"]
    assert fields["deci.attention.head_count_kv"] == kv_heads
    for key, value in {"deci.attention.key_length": head_dim, "deci.attention.value_length": head_dim,
                       "deci.rope.dimension_count": head_dim, "deci.block_count": len(layers),
                       "deci.embedding_length": config.hidden_size, "deci.vocab_size": config.vocab_size,
                       "deci.context_length": config.max_position_embeddings}.items():
        assert fields[key] == value, key
    assert fields["deci.rope.freq_base"] == np.float32(config.rope_parameters["rope_theta"])
    assert fields["deci.attention.layer_norm_rms_epsilon"] == np.float32(config.rms_norm_eps)

    want = expected_tensors(model)
    extra = set(tensors) - set(want)
    for i, s in enumerate(stand_in):
        if s:  # the stand-in head: zero q, k, v and output weights, a norm of ones
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                data, _ = tensors.pop(f"blk.{i}.{name}.weight")
                assert not data.any() and data.shape[0 if name == "attn_output" else 1] == config.hidden_size
            assert (tensors.pop(f"blk.{i}.attn_norm.weight")[0] == 1).all()
            extra -= {f"blk.{i}.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm")}
    if config.rope_parameters["rope_type"] == "llama3":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        factors, _ = tensors.pop("rope_freqs.weight")
        plain = 1 / config.rope_parameters["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
        scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].numpy()
        np.testing.assert_allclose(plain / factors, scaled, rtol=1e-6)
        assert factors[0] == 1 and factors[-1] == 8  # fast frequencies kept, slow ones slowed by the factor
        extra.discard("rope_freqs.weight")
    assert extra == set() and set(tensors) == set(want)
    for name, (weight, heads) in want.items():
        data, qtype = tensors[name]
        assert qtype == GGMLQuantizationType.F32
        back = data if heads is None else unpermute(data, heads)
        assert np.array_equal(back, weight.detach().numpy()), name


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_f16_bf16_and_q8_0_round_within_their_rounding(outtype, tmp_path, tokenizer):
    """f16 and bf16 hold each weight rounded to nearest; q8_0 holds blocks of 32 within half a
    step of their scale, and a matrix whose rows are not whole blocks (pruned widths here are
    arbitrary) stays f16, as the summary says."""
    model = pruned("llama-mha", [1], hidden_size=64)
    summary = export_gguf.write_gguf(model, tokenizer, tmp_path / "m.gguf", outtype)
    _, tensors = read_back(tmp_path / "m.gguf")
    qtype = export_gguf.OUTTYPES[outtype][0]
    for name, (weight, heads) in expected_tensors(model).items():
        data, stored = tensors[name]
        w = weight.detach().float()
        back = torch.from_numpy(data if heads is None else unpermute(data, heads))
        if w.dim() == 1:
            assert stored == GGMLQuantizationType.F32 and torch.equal(back, w)
        elif stored == GGMLQuantizationType.F16:
            assert torch.equal(back, w.half().float()), name
            assert outtype == "f16" or w.shape[-1] % 32, name  # q8_0 falls back only for partial blocks
        elif stored == GGMLQuantizationType.BF16:
            assert torch.equal(back, w.bfloat16().float()), name
        else:
            assert stored == GGMLQuantizationType.Q8_0 and w.shape[-1] % 32 == 0
            step = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127  # stored as f16: 2^-11 off at most
            assert ((back.reshape(-1, 32) - w.reshape(-1, 32)).abs() <= step * (0.5 + 127 * 2**-11)).all(), name
    fallback = {name for name, (_, stored) in tensors.items() if stored not in (qtype, GGMLQuantizationType.F32)}
    assert fallback == set(summary["matrices_not_in_outtype"])
    assert bool(fallback) == (outtype == "q8_0")


def test_refused_models_write_nothing(tmp_path, tokenizer):
    for model, message in ((tiny_model("qwen3"), "q/k norms"),
                           (tiny_model("llama-mha", rope_scaling={"rope_type": "linear", "factor": 2.0}),
                            "rope_type 'linear'")):
        with pytest.raises(export_gguf.ExportError, match=message):
            export_gguf.write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# The tokenizer


def tokenizer_fields(fields: dict) -> dict:
    return {key: value for key, value in fields.items() if key.startswith("tokenizer.")}


@needs_smollm2
def test_smollm2_tokenizer_from_its_hf_copy_equals_llama_cpps_converter(tmp_path):
    """SmolLM2's GGUF was written by llama.cpp's own converter: exporting transformers' copy of
    its tokenizer gives the same tokens, types, merges, special ids, flags and chat template. The
    pre-tokenizer is named from how the copy splits text: the hub tokenizer's digits-then-GPT-2
    split is llama.cpp's 'smollm'; transformers' copy from the GGUF file splits as GPT-2 does
    (the same tokens, SmolLM2 has no multi-digit token), 'gpt-2'. Carried over from the file, the
    fields are the file's, unchanged."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path().parent, gguf_file=smollm2_path().name)
    model = tiny_model("llama-mha", vocab_size=len(tokenizer))  # only the tokenizer matters here
    tokenizer.save_pretrained(tmp_path / "hf")
    copy = type(tokenizer).from_pretrained(tmp_path / "hf")
    reference = tokenizer_fields(read_fields(smollm2_path()))
    export_gguf.write_gguf(model, copy, tmp_path / "copy.gguf", "q8_0")
    exported = tokenizer_fields(read_fields(tmp_path / "copy.gguf"))
    assert exported == reference | {"tokenizer.ggml.pre": "gpt-2"}
    copy.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    export_gguf.write_gguf(model, copy, tmp_path / "hub.gguf", "q8_0")
    assert tokenizer_fields(read_fields(tmp_path / "hub.gguf")) == reference
    export_gguf.write_gguf(model, copy, tmp_path / "carried.gguf", "q8_0", tokenizer_from=str(smollm2_path()))
    assert tokenizer_fields(read_fields(tmp_path / "carried.gguf")) == reference


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A SentencePiece BPE model with byte fallback (Llama-2's and Mistral's kind) trained here,
    as transformers builds such a tokenizer from its pieces and scores; and the model itself."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(text_corpus(words=40, seed=s) + " Über 42 café." for s in range(200)))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "spm"),
                                   model_type="bpe", vocab_size=320, byte_fallback=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spm.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), add_bos_token=True), sp


def test_sentencepiece_tokenizer_exports_as_llama_cpps_llama_vocabulary(sentencepiece_tokenizer, tmp_path):
    """tokens and their kinds as SentencePiece has them; the scores order every token that a
    merge makes as SentencePiece's own scores do (llama.cpp merges by score); BOS added, a space
    put before the text."""
    tokenizer, sp = sentencepiece_tokenizer
    text = "the of and Über 42 café"
    assert tokenizer(text).input_ids == [sp.bos_id(), *sp.encode(text)]
    export_gguf.write_gguf(tiny_model("llama-mha"), tokenizer, tmp_path / "m.gguf", "f16")
    fields = tokenizer_fields(read_fields(tmp_path / "m.gguf"))
    n = sp.get_piece_size()
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.tokens"][:n] == [
        sp.id_to_piece(i) for i in range(n)]
    kinds = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    assert fields["tokenizer.ggml.token_type"][:n] == kinds
    assert fields["tokenizer.ggml.token_type"][n:] == [5] * (320 - n)  # padding up to the embeddings
    made = [i for i in range(n) if kinds[i] == 1 and len(sp.id_to_piece(i)) > 1]
    ours = sorted(made, key=lambda i: -fields["tokenizer.ggml.scores"][i])
    assert ours == sorted(made, key=lambda i: -sp.get_score(i))
    assert fields["tokenizer.ggml.add_bos_token"] and fields["tokenizer.ggml.add_space_prefix"]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.unknown_token_id"]) == (sp.bos_id(),
                                                                                                   sp.unk_id())


# ----------------------------------------------------------------------------------------------
# llama.cpp itself


def llama_cpp_log_probs(gguf_path: Path, text_path: Path, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """llama-perplexity's tokens of a text, and its log-probabilities of every token at the scored
    positions (the second half of each n_ctx window), from its --kl-divergence-base file: per
    position a scale, a minimum and 16-bit steps above it."""
    out = gguf_path.with_suffix(".kld")
    subprocess.run([LLAMA_PERPLEXITY, "-m", str(gguf_path), "-f", str(text_path), "-c", str(n_ctx), "-b", str(n_ctx),
                    "-t", "2", "-ctk", "f32", "-ctv", "f32", "-fa", "off",  # the KV cache in f32, not f16
                    "--kl-divergence-base", str(out)], check=True, capture_output=True)
    raw = out.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw[8:20], dtype=np.int32)
    tokens = np.frombuffer(raw[20:20 + 4 * n_chunk * n_ctx], dtype=np.int32).reshape(n_chunk, n_ctx)
    row = 2 * ((n_vocab + 1) // 2) + 4
    steps = np.frombuffer(raw[20 + 4 * n_chunk * n_ctx:], dtype=np.uint16).reshape(n_chunk, n_ctx - 1 - n_ctx // 2, row)
    scale_min = steps[..., :4].copy().view(np.float32)
    return tokens, scale_min[..., 1:2] + scale_min[..., 0:1] * steps[..., 4:4 + n_vocab]


def assert_llama_cpp_matches(model, tokenizer, folder: Path, outtype: str, tolerance: float, n_ctx: int = 512):
    text = text_corpus(words=1600, seed=7)
    (folder / "text.txt").write_text(text)
    export_gguf.write_gguf(model, tokenizer, folder / "m.gguf", outtype)
    tokens, theirs = llama_cpp_log_probs(folder / "m.gguf", folder / "text.txt", n_ctx)
    ids = tokenizer(text).input_ids
    assert tokens.flatten().tolist() == ids[: tokens.size]  # the same tokenization
    windows = torch.from_numpy(tokens.astype(np.int64))
    if tokenizer("a").input_ids[0] == tokenizer.bos_token_id:
        windows[:, 0] = tokenizer.bos_token_id  # llama-perplexity starts every window with BOS
    with torch.no_grad():
        ours = model(windows).logits[:, n_ctx // 2:-1].float().log_softmax(-1).numpy()
    visible = theirs > theirs.min(-1, keepdims=True)  # llama.cpp clips log-probabilities 16 below the top
    assert np.abs(ours - theirs)[visible].max() < tolerance


LLAMA_CPP_CASES = ["llama-mha untied", "llama-gqa-bias, no attention in layers 0 and 1",
                   "mistral, no attention in layer 0, tied", "qwen2, no attention in layer 1", "llama3 rope, dense"]


@needs_llama_cpp
@pytest.mark.parametrize("case", LLAMA_CPP_CASES)
def test_llama_cpp_computes_what_transformers_computes(case, tmp_path, tokenizer):
    """Every log-probability llama.cpp reports, at every scored position, within 3e-4 of
    transformers' (its 16-bit storage steps are at most 2.4e-4)."""
    assert_llama_cpp_matches(model_of(case), tokenizer, tmp_path, "f32", 3e-4)


@needs_llama_cpp
def test_llama_cpp_runs_the_sentencepiece_tokenizer_and_q8_0(sentencepiece_tokenizer, tmp_path):
    tokenizer, _ = sentencepiece_tokenizer
    assert_llama_cpp_matches(pruned("llama-gqa-bias", [0]), tokenizer, tmp_path, "f32", 3e-4)
    assert_llama_cpp_matches(pruned("qwen2", [2]), tokenizer, tmp_path, "q8_0", 0.05)


@needs_llama_cpp
@needs_smollm2
def test_llama_cpp_on_pruned_smollm2_matches_on_wikitext(tmp_path):
    """A pruned SmolLM2 (30 layers, layer 4 without attention, its own tokenizer) exported to
    f32: llama.cpp's log-probabilities on real text equal transformers' within float32 rounding
    over 30 layers. Measured: mean difference 2.3e-4 (llama.cpp's 16-bit storage step), largest
    4.4e-3, an offset shared by a whole position (3.7e-3 already among tokens within 5 nats of the
    top), where a wrong permutation or width moves them by whole units."""
    model, tokenizer = grasprune.load_model(str(smollm2_path()))
    units = grasprune.find_units(model)
    gate = random_gate(units, seed=9)
    units.kv(gate)[4] = 0.0
    grasprune.slice_model(model, units, gate)
    text = evaluation.load_text("wikitext2", "test", str(DATA))[:6000]
    (tmp_path / "text.txt").write_text(text)
    export_gguf.write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    tokens, theirs = llama_cpp_log_probs(tmp_path / "m.gguf", tmp_path / "text.txt", 512)
    assert tokens.flatten().tolist() == tokenizer(text).input_ids[: tokens.size]
    with torch.no_grad():
        ours = model(torch.from_numpy(tokens.astype(np.int64))).logits[:, 256:-1].log_softmax(-1).numpy()
    visible = theirs > theirs.min(-1, keepdims=True)
    difference = np.abs(ours - theirs)[visible]
    assert difference.mean() < 5e-4 and difference.max() < 1e-2
