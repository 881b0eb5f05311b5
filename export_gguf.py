"""Export a dense or GRASPrune-pruned model to one GGUF file that llama.cpp runs (and with it
Ollama, LM Studio and every other llama.cpp front end), on a CPU or a GPU, quantized.

    python export_gguf.py smollm2-s0.5 --outtype q8_0        # -> smollm2-s0.5-q8_0.gguf
    python export_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf     # the dense model, for comparison

A pruned model's layers differ in width, which llama.cpp's `deci` architecture (written for
NVIDIA's Nemotron-NAS models) reads: per-layer arrays of FFN widths, query heads and KV heads,
with head size, value size and rotary dimension given once. What the export does for it:

- tensors in transformers' [out, in] layout under llama.cpp's names; q and k (weights and
  biases) permuted from transformers' rotary layout (dimension i paired with i + head_dim/2)
  to llama.cpp's (2i paired with 2i + 1), per layer with that layer's own head count;
- a layer that kept no KV group has no attention tensors (llama.cpp skips attention where a
  layer has 0 heads), except where llama.cpp would then lose something: layer 0 (llama.cpp
  reads the head size from it) and a layer with an o_proj bias (which must still reach the
  residual stream) get one stand-in head whose q, k, v and output weights are zero: its
  attention adds exactly the bias, as the pruned model does;
- Llama-3.x rotary scaling (rope_type llama3) as the `rope_freqs` tensor llama.cpp divides
  each frequency by: the ratio of the plain frequencies to transformers' own scaled ones;
- the tokenizer: byte-level BPE (SmolLM2, Llama-3, Qwen2) or SentencePiece-style BPE (Llama-2,
  Mistral) from the transformers tokenizer, or carried over unchanged from the GGUF file the
  model came from;
- q8_0 quantizes each matrix whose rows are whole 32-value blocks; any other stays f16 (as
  llama.cpp's own tools do), and the summary says which. grasprune.py --ffn-multiple 32 keeps
  every pruned FFN width a multiple of 32.

Refused with one line and exit code 2, nothing written: other architectures (Qwen3's q/k norms
have no place in `deci`), other rotary scalings, other activations, other tokenizers.
"""

import json
import signal
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType, TokenType

import cli
import grasprune
from modeling_grasprune import load_pretrained

# --outtype -> (type of the matrices, file type llama.cpp reports)
OUTTYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
Q8_0_BLOCK = 32

# How byte-level BPE tokenizers split text before merging, by llama.cpp's name for each: the
# regular expressions of Llama-3 (tiktoken's cl100k) and of Qwen2 (digits one by one).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


class ExportError(grasprune.UsageError):
    """A model or tokenizer this export cannot write faithfully: one line, exit 2, no file."""


# ----------------------------------------------------------------------------------------------
# What llama.cpp can run


def check_exportable(config) -> None:
    """Refuse, from the config alone, a model whose GGUF would not compute what it does."""
    if config.model_type not in ("llama", "mistral", "qwen2"):
        extra = " (its per-head q/k norms have no place in llama.cpp's deci)" if config.model_type == "qwen3" else ""
        raise ExportError(f"cannot export model type {config.model_type!r}{extra}; llama, mistral and qwen2 export")
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ExportError(f"cannot export rope_type {rope_type!r}; plain and llama3 rotary embeddings export")
    if config.hidden_act != "silu":
        raise ExportError(f"cannot export activation {config.hidden_act!r}; llama.cpp's deci computes SiLU")


def rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q or k (weight or bias) from transformers' rotary layout, where dimension i of a
    head turns with i + head_dim / 2, to llama.cpp's, where 2i turns with 2i + 1."""
    return weight.reshape(n_head, 2, -1, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_frequency_factors(model) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` for Llama-3.x scaling: llama.cpp divides each plain rotary
    frequency by its factor, so the factor is plain / scaled, with the scaled frequencies taken
    from transformers' own implementation. None for unscaled rotary embeddings."""
    config = model.config
    if config.rope_parameters.get("rope_type", "default") == "default":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    if attention_factor != 1.0:
        raise ExportError(f"cannot export a rotary attention factor of {attention_factor}")
    dim = config.head_dim
    plain = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return plain / scaled


def layer_tensors(layer, i: int, head_dim: int) -> tuple[dict[str, torch.Tensor], int, int]:
    """One decoder layer's tensors under llama.cpp's names, with its query and KV head counts
    as llama.cpp will read them."""
    attn, mlp, hidden = layer.self_attn, layer.mlp, layer.post_attention_layernorm.weight.shape[0]
    out = {f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight}
    for proj, name in ((mlp.gate_proj, "ffn_gate"), (mlp.up_proj, "ffn_up"), (mlp.down_proj, "ffn_down")):
        out[f"blk.{i}.{name}.weight"] = proj.weight
        if proj.bias is not None:
            out[f"blk.{i}.{name}.bias"] = proj.bias
    if attn.o_proj.bias is not None:
        out[f"blk.{i}.attn_output.bias"] = attn.o_proj.bias
    if hasattr(attn, "k_proj"):
        n_head, n_head_kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        out[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight
        out[f"blk.{i}.attn_output.weight"] = attn.o_proj.weight
        for proj, name, heads in ((attn.q_proj, "attn_q", n_head), (attn.k_proj, "attn_k", n_head_kv),
                                  (attn.v_proj, "attn_v", None)):
            for kind in ("weight", "bias"):
                tensor = getattr(proj, kind)
                if tensor is not None:
                    out[f"blk.{i}.{name}.{kind}"] = tensor if heads is None else rope_permute(tensor, heads)
        return out, n_head, n_head_kv
    if i > 0 and attn.o_proj.bias is None:
        return out, 0, 0  # no attention at all: llama.cpp's attention-free layer
    # The stand-in head: zero values, so attention adds exactly o_proj's bias (or nothing).
    zeros = torch.zeros(head_dim, hidden)
    out |= {f"blk.{i}.attn_norm.weight": torch.ones(hidden), f"blk.{i}.attn_q.weight": zeros,
            f"blk.{i}.attn_k.weight": zeros, f"blk.{i}.attn_v.weight": zeros,
            f"blk.{i}.attn_output.weight": zeros.T}
    return out, 1, 1


def encode(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """A tensor's data as the file stores it. Vectors stay f32; q8_0 takes a matrix only when
    its rows are whole blocks of 32, else it is stored f16."""
    data = tensor.detach().float().cpu().numpy()
    if data.ndim == 1:
        qtype = GGMLQuantizationType.F32
    elif qtype == GGMLQuantizationType.Q8_0 and data.shape[-1] % Q8_0_BLOCK:
        qtype = GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


# ----------------------------------------------------------------------------------------------
# The tokenizer


def split_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how a byte-level BPE tokenizer splits text."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer])
    kinds = [step["type"] for step in steps if step]
    if kinds == ["ByteLevel"] and steps[0]["use_regex"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0]["individual_digits"] and steps[1]["use_regex"]:
        return "smollm"  # one digit at a time, then GPT-2's expression (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not steps[1]["use_regex"] and steps[0]["pattern"].get("Regex") in SPLITS:
        return SPLITS[steps[0]["pattern"]["Regex"]]
    raise ExportError(f"cannot name this tokenizer's pre-tokenizer ({' + '.join(kinds) or 'none'}) for llama.cpp")


def tokenizer_spec(tokenizer, vocab_size: int) -> dict:
    """The tokenizer's definition (tokenizers' JSON), refused here if llama.cpp cannot read it: the
    check that grasprune.py --gguf makes before pruning."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ExportError(f"cannot export a {type(tokenizer).__name__}: a tokenizers-backed tokenizer is needed")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ExportError(f"cannot export a {spec['model']['type']} tokenizer; BPE tokenizers export")
    ids = [*spec["model"]["vocab"].values(), *(token["id"] for token in spec["added_tokens"])]
    if max(ids) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(ids)}, the model only {vocab_size} embeddings")
    if not spec["model"].get("byte_fallback"):
        split_name(spec["pre_tokenizer"])
    return spec


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """The transformers tokenizer as llama.cpp reads it: byte-level BPE as `gpt2` (tokens,
    merges, pre-tokenizer), SentencePiece-style BPE (byte fallback, "▁" for spaces) as `llama`,
    whose merge order llama.cpp takes from token scores: the earlier a merge makes a token, the
    higher the token's score."""
    spec = tokenizer_spec(tokenizer, vocab_size)
    model = spec["model"]
    added = {token["id"]: token for token in spec["added_tokens"]}
    tokens = {i: t for t, i in model["vocab"].items()} | {i: token["content"] for i, token in added.items()}
    sentencepiece = bool(model.get("byte_fallback"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    rank = {}  # token -> index of the first merge that makes it
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    names, types, scores = [], [], []
    for i in range(vocab_size):
        token = tokens.get(i, f"[PAD{i}]")
        if i not in tokens:
            kind = TokenType.UNUSED
        elif sentencepiece and i == tokenizer.unk_token_id:
            kind = TokenType.UNKNOWN
        elif i in added:
            kind = TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        names.append(token)
        types.append(kind)
        scores.append(-float(rank.get(token, len(merges) + i)))
    # What the tokenizer does, read off its behavior: a "▁" put before the text, BOS and EOS added.
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False).input_ids)[0]
    writer.add_add_space_prefix(sentencepiece and first.startswith("\u2581"))
    ids = tokenizer("a").input_ids
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        writer.add_add_eos_token(True)
    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    writer.add_tokenizer_pre("default" if sentencepiece else split_name(spec["pre_tokenizer"]))
    writer.add_token_list(names)
    if sentencepiece:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    if not sentencepiece:
        writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        if getattr(tokenizer, f"{kind}_token_id") is not None:
            getattr(writer, f"add_{kind}_token_id")(getattr(tokenizer, f"{kind}_token_id"))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def copy_tokenizer(writer: gguf.GGUFWriter, source: str) -> None:
    """Every tokenizer field of another GGUF file, unchanged (the model's own, when it came
    from one: llama.cpp's converter wrote it)."""
    for key, field in gguf.GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            array = field.types[0] == GGUFValueType.ARRAY
            writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if array else None)


# ----------------------------------------------------------------------------------------------
# The file


def write_gguf(model, tokenizer, path: Path, outtype: str = "f16", tokenizer_from: str | None = None) -> dict:
    """Write `model` (dense or pruned) and its tokenizer (or the tokenizer fields of the GGUF
    file `tokenizer_from`) to `path` as llama.cpp's `deci` architecture. The file appears
    whole or not at all. Returns what was written: per-layer shapes and tensor types."""
    config = model.config
    check_exportable(config)
    qtype, file_type = OUTTYPES[outtype]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tensors = {"token_embd.weight": model.get_input_embeddings().weight, "output_norm.weight": model.model.norm.weight}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = model.get_output_embeddings().weight
    factors = rope_frequency_factors(model)
    if factors is not None:
        tensors["rope_freqs.weight"] = factors
    n_ff, n_head, n_head_kv = [], [], []
    for i, layer in enumerate(model.model.layers):
        layer_out, heads, kv_heads = layer_tensors(layer, i, head_dim)
        tensors |= layer_out
        n_ff.append(layer.mlp.gate_proj.out_features)
        n_head.append(heads)
        n_head_kv.append(kv_heads)
    if getattr(config, "sliding_window", None) and config.sliding_window < config.max_position_embeddings:
        print(f"export_gguf: note: llama.cpp attends over the whole context; it equals the model only within "
              f"its {config.sliding_window}-token sliding window", file=sys.stderr)

    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, "deci")
    try:
        writer.add_name(Path(str(config.name_or_path)).name or "model")
        writer.add_file_type(file_type)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(len(n_ff))
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        if qtype == GGMLQuantizationType.Q8_0:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer_from:
            copy_tokenizer(writer, tokenizer_from)
        else:
            add_tokenizer(writer, tokenizer, config.vocab_size)
        types = {}
        for name, tensor in tensors.items():
            data, types[name] = encode(tensor, qtype)
            writer.add_tensor(name, data, raw_dtype=types[name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    matrices = [name for name, tensor in tensors.items() if tensor.dim() == 2]
    return {"path": str(path), "outtype": outtype, "feed_forward_length": n_ff, "head_count": n_head,
            "head_count_kv": n_head_kv, "bytes": path.stat().st_size,
            "matrices_not_in_outtype": [name for name in matrices if types[name] != qtype]}


# ----------------------------------------------------------------------------------------------
# Command line


def source_gguf(model: str) -> str | None:
    """The GGUF file whose tokenizer the export carries over: the model itself, or the one a
    grasprune.py output folder was pruned from (its report says), if it is still there."""
    if model.endswith(".gguf"):
        return model
    report = Path(model) / "grasprune_report.json"
    with grasprune.reading(report):
        source = json.loads(report.read_text())["settings"]["model"] if report.is_file() else ""
    return source if source.endswith(".gguf") and Path(source).is_file() else None


def describe(summary: dict) -> str:
    """What write_gguf wrote, in one line."""
    others = summary["matrices_not_in_outtype"]
    stored = f"every matrix {summary['outtype']}" if not others else (
        f"{len(others)} matrices stored f16 (rows not whole blocks of {Q8_0_BLOCK}; grasprune.py --ffn-multiple "
        f"{Q8_0_BLOCK} aligns every FFN width): {', '.join(others)}")
    return (f"wrote {summary['path']} ({summary['bytes'] / 2**20:.1f} MiB, {summary['outtype']}); FFN widths "
            f"{summary['feed_forward_length']}, query heads {summary['head_count']}, KV heads "
            f"{summary['head_count_kv']}; {stored}")


def export(argv: list[str] | None = None) -> None:
    """The command line's run: every check before the weights are read, then the file."""
    p = cli.ArgumentParser(prog="export_gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a grasprune.py output folder, or a dense model: folder, hub id or .gguf file")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16", help="type of the weight matrices (default f16)")
    p.add_argument("--output", help="the GGUF file (default: <model name>-<outtype>.gguf here)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    name = Path(args.model.rstrip("/")).name.removesuffix(".gguf")
    output = Path(args.output or f"{name}-{args.outtype}.gguf")
    cli.check_output(output, args.overwrite, folder=False, inputs=(args.model,))
    check_exportable(grasprune.load_config(args.model))  # before any weight is read
    tokenizer_from = source_gguf(args.model)
    with grasprune.reading(f"the model {args.model!r}"):
        model, tokenizer = load_pretrained(args.model, dtype=torch.float32)
    print(f"export_gguf: {describe(write_gguf(model, tokenizer, output, args.outtype, tokenizer_from))}")


def main(argv: list[str] | None = None) -> int:
    return cli.run_cli("export_gguf", lambda: export(argv))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: no half file
    sys.exit(main())
