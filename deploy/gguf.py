"""GGUF out, and the command line of both ways: a Hugging Face directory exported as a llama.cpp
model file with its Ollama Modelfile; a GGUF imported (model/gguf.py does the import).

    import:  FILE.gguf --dequantize, un-permute q/k, rebuild tokenizer--> DIR/ (config.json,
             model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)
    export:  DIR --permute q/k, cast or quantize, copy tokenizer--> OUT.gguf (+ OUT.Modelfile for Ollama)

    python -m deploy.gguf import FILE.gguf OUT_DIR
    python -m deploy.gguf export HF_DIR OUT.gguf [--type f32|f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0] [--overwrite]

All binary work goes through the `gguf` package (llama.cpp's own reader, writer and quantizers);
no quant format is written by hand. Types: f32 is exact; f16 and bf16 round each weight; q8_0,
q5_x and q4_x are llama.cpp's block quantizations, written by the `gguf` package. The k-quants
(Q4_K_M and the like) are not offered: the `gguf` package can read them but not write them (only
llama.cpp's llama-quantize does), and we never hand-write a quant format; run llama-quantize on an
f16 export for those. (It also writes TQ1_0/TQ2_0, ternary, and MXFP4, power-of-two scales: for
models trained so.) In the q5/q4 files the output matrix (token_embd when it is tied to it) stays
Q8_0, as llama-quantize keeps it at Q6_K.

OUT.Modelfile (deploy/ollama.py) has the TEMPLATE and SYSTEM that make Ollama prompt the model as
its chat template does. Neither command overwrites anything unasked (export replaces an existing
OUT.gguf and its Modelfile only with --overwrite), and both write under a temporary name renamed
at the end, so a failure (a full disk, Ctrl-C) leaves nothing half-written.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import gguf
import numpy as np
from tokenizers import Tokenizer

from data.chat_template import saved_template
from model.config import ConfigError, LlamaConfig
from model.errors import run_command
from model.files import LoadError, read_safetensors, safetensors_files
from model.llama import rope_frequencies
from model.gguf import (GGUF_ARCH, PRE_TOKENIZERS, PROBE_TEXT, GGUFError, atomic_path, import_gguf, permute_qk,
                        permuted_heads, tensor_names)

from . import ollama

Q, FT = gguf.GGMLQuantizationType, gguf.LlamaFileType
OUT_TYPES = {  # --type -> (type of the 2-D weights, general.file_type)
    "f32": (Q.F32, FT.ALL_F32), "f16": (Q.F16, FT.MOSTLY_F16), "bf16": (Q.BF16, FT.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, FT.MOSTLY_Q5_1), "q5_0": (Q.Q5_0, FT.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, FT.MOSTLY_Q4_1), "q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0),
}
BLOCK_TYPES = {Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0}  # rows of 32-value blocks
OUTPUT_TYPE = {Q.Q5_1: Q.Q8_0, Q.Q5_0: Q.Q8_0, Q.Q4_1: Q.Q8_0, Q.Q4_0: Q.Q8_0}  # for the output matrix


def export_gguf(hf_dir: str | Path, out_path: str | Path, out_type: str = "f16",
                overwrite: bool = False) -> ollama.OllamaChat:
    """Write a llama.cpp-loadable GGUF, and OUT.Modelfile for Ollama beside it, from a model directory.

    An existing out_path or Modelfile is an error unless `overwrite`; then those two are replaced.
    Returns the Modelfile's chat settings (`.problem` says why it has no TEMPLATE, if it has none)."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    modelfile = ollama.modelfile_path(out_path)
    if out_type not in OUT_TYPES:
        raise GGUFError(f"type {out_type!r}: choose one of {', '.join(OUT_TYPES)}")
    check_outputs([out_path, modelfile], overwrite)
    if not hf_dir.is_dir():
        raise GGUFError(f"{hf_dir}: not a model directory")
    try:
        config = LlamaConfig.from_file(hf_dir / "config.json")
        files = safetensors_files(hf_dir)
    except (ConfigError, LoadError) as e:
        raise GGUFError(str(e)) from None
    vocab = vocab_from_hf(hf_dir, config)  # read and checked before anything is written
    chat = ollama_chat(vocab)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Both under temporary names; the GGUF is renamed first, then its Modelfile: a failure
    # anywhere leaves neither.
    with atomic_path(modelfile) as modelfile_tmp, atomic_path(out_path) as tmp:
        modelfile_tmp.write_text(ollama.modelfile(out_path, chat), encoding="utf-8")
        write_gguf_file(tmp, hf_dir.resolve().name, config, vocab, files, out_type)
    return chat


def check_outputs(paths: list[Path], overwrite: bool):
    for path in paths:
        if path.is_dir():
            raise GGUFError(f"{path}: is a directory; export writes a file there")
        if path.exists() and not overwrite:
            raise GGUFError(f"{path}: already exists (pass --overwrite to replace it)")


def ollama_chat(vocab: dict) -> ollama.OllamaChat:
    """The Modelfile's TEMPLATE, SYSTEM and stops for this vocabulary's chat template."""
    ids = vocab["ids"]
    tokens = {f"{k}_token": vocab["tokens"][ids[k]] if ids[k] is not None else None for k in ("bos", "eos", "unk", "pad")}
    return ollama.translate(vocab["chat_template"], tokens, vocab["add_bos"])


def write_gguf_file(path: Path, name: str, config: LlamaConfig, vocab: dict, files: list[Path], out_type: str):
    qtype, file_type = OUT_TYPES[out_type]
    writer = gguf.GGUFWriter(path, GGUF_ARCH[config.architecture])
    try:
        writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, config)
        add_vocab(writer, vocab)
        add_tensors(writer, files, config, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()  # also on failure: the half-written file is closed before it is removed


def add_hyperparameters(writer: gguf.GGUFWriter, config: LlamaConfig):
    """What llama.cpp reads to build the model, under `<arch>.*` keys (the writer adds the prefix)."""
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if (config.rope_scaling or {}).get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    # llama3 rope scaling is a tensor, not metadata: see add_tensors.


def add_tensors(writer: gguf.GGUFWriter, files: list[Path], config: LlamaConfig, qtype):
    """Every checkpoint tensor, renamed, q/k permuted, 2-D ones cast or quantized (1-D stay F32)."""
    gguf_names = tensor_names(config)
    for f in files:
        with read_safetensors(f) as sf:
            for key in sf.keys():
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # no `output` tensor: llama.cpp reuses token_embd
                if key not in gguf_names:
                    raise GGUFError(f"{f}: tensor {key!r} has no GGUF name")
                w = sf.get_tensor(key).float().numpy()
                if heads := permuted_heads(gguf_names[key], config):
                    w = permute_qk(w, heads)
                _add_tensor(writer, gguf_names[key], w, qtype, config.tie_word_embeddings)
    if (config.rope_scaling or {}).get("rope_type") == "llama3":
        # llama.cpp divides each rotary frequency by its factor here (convert_hf_to_gguf's rope_freqs).
        factors = rope_frequencies(dataclasses.replace(config, rope_scaling=None)) / rope_frequencies(config)
        _add_tensor(writer, "rope_freqs.weight", factors.numpy(), gguf.GGMLQuantizationType.F32)


def _add_tensor(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype, tied: bool = False):
    if w.ndim == 1:
        qtype = Q.F32  # norms and biases: small and precision-sensitive
    elif name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = OUTPUT_TYPE.get(qtype, qtype)  # every logit goes through it: 4 bits cost the most here
    if qtype in BLOCK_TYPES and w.shape[-1] % 32:
        qtype = Q.F16  # rows must hold whole 32-value blocks (as llama.cpp does)
    data = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)  # (for uint8 bytes, the writer works out the shape)


def vocab_from_hf(hf_dir: Path, config: LlamaConfig) -> dict:
    """tokenizer.json's byte-level BPE vocabulary (padded to vocab_size) and specials, as GGUF stores them."""
    path = hf_dir / "tokenizer.json"
    if not path.exists():
        what = "a SentencePiece tokenizer.model" if (hf_dir / "tokenizer.model").exists() else "no tokenizer"
        raise GGUFError(f"{hf_dir}: has {what}; GGUF export needs a byte-level BPE tokenizer.json")
    try:
        spec, tok = json.loads(path.read_text()), Tokenizer.from_file(str(path))
    except Exception as e:  # invalid JSON, or tokenizers' plain Exception for a file it cannot parse
        raise GGUFError(f"{path}: not a readable tokenizer.json ({e})") from None
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError(f"{path}: only byte-level BPE tokenizers (GPT-2 style) can be exported; "
                        "SentencePiece-style ones (Llama 2, Mistral) are not supported yet")
    pre = next((name for name, make in PRE_TOKENIZERS.items() if _same_split(make(), tok.pre_tokenizer)), None)
    if pre is None:
        raise GGUFError(f"{path}: pre-tokenizer not recognised (supported: {', '.join(PRE_TOKENIZERS)})")
    id_to_token = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if max(id_to_token) >= config.vocab_size:
        raise GGUFError(f"{path}: token id {max(id_to_token)} does not fit vocab_size {config.vocab_size}")
    special = {t["id"]: t["special"] for t in spec.get("added_tokens", [])}
    T = gguf.TokenType
    tokens = [id_to_token.get(i, f"[PAD{i}]") for i in range(config.vocab_size)]
    types = [T.UNUSED if i not in id_to_token else T.NORMAL if i not in special
             else T.CONTROL if special[i] else T.USER_DEFINED for i in range(config.vocab_size)]
    tc_path = hf_dir / "tokenizer_config.json"
    try:
        tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GGUFError(f"{tc_path}: not valid JSON ({e})") from None
    # chat_template.jinja (where transformers 5 saves it, and merge.py an adapter's) wins, as in transformers
    template = saved_template(hf_dir) or tc.get("chat_template")
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    ids = {"bos": _token_id(tc.get("bos_token"), tok, config.bos_token_id),
           "eos": _token_id(tc.get("eos_token"), tok, eos),
           "pad": _token_id(tc.get("pad_token"), tok), "unk": _token_id(tc.get("unk_token"), tok)}
    # Llama 3 adds BOS through the post-processor only, so ask the tokenizer what it does.
    add_bos = tc.get("add_bos_token", ids["bos"] is not None and tok.encode("a").ids[:1] == [ids["bos"]])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return dict(tokens=tokens, types=types, merges=merges, pre=pre, ids=ids, add_bos=bool(add_bos),
                chat_template=template)


def _same_split(a, b) -> bool:
    """Whether two pre-tokenizers cut PROBE_TEXT into the same pieces."""
    pieces = [[piece for piece, _ in p.pre_tokenize_str(PROBE_TEXT)] for p in (a, b) if p is not None]
    return len(pieces) == 2 and pieces[0] == pieces[1]


def _token_id(token, tok: Tokenizer, default: int | None = None) -> int | None:
    if isinstance(token, dict):  # older files write {"content": "<s>", ...}
        token = token.get("content")
    found = tok.token_to_id(token) if token else None
    return found if found is not None else default


def add_vocab(writer: gguf.GGUFWriter, vocab: dict):
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, add in [("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)]:
        if vocab["ids"][key] is not None:
            add(vocab["ids"][key])
    writer.add_add_bos_token(vocab["add_bos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.gguf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="GGUF file -> Hugging Face directory (float32)")
    imp.add_argument("gguf_file")
    imp.add_argument("out_dir")
    export_parser(sub, "hf_dir", "Hugging Face directory", OUT_TYPES, "f16")
    args = parser.parse_args(argv)
    return run_command("python -m deploy.gguf", convert, args)


def export_parser(sub, source: str, what: str, types, default: str) -> argparse.ArgumentParser:
    """The `export SOURCE OUT.gguf [--type] [--overwrite]` subcommand (here and in deploy/adapter_gguf.py)."""
    exp = sub.add_parser("export", help=f"{what} -> GGUF file (+ its Ollama Modelfile)")
    exp.add_argument(source)
    exp.add_argument("out_gguf")
    exp.add_argument("--type", default=default, choices=list(types), help=f"tensor type (default {default})")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf and its Modelfile")
    return exp


def convert(args):
    if args.command == "import":
        print(import_gguf(args.gguf_file, args.out_dir))
    else:
        chat = export_gguf(args.hf_dir, args.out_gguf, args.type, overwrite=args.overwrite)
        print(args.out_gguf)
        print(describe_modelfile(Path(args.out_gguf), chat))


def describe_modelfile(gguf_path: Path, chat: ollama.OllamaChat) -> str:
    """One line on the Modelfile written beside a GGUF (a warning when it has no TEMPLATE)."""
    path = ollama.modelfile_path(gguf_path)
    if chat.template is None:
        return f"warning: {path} has no TEMPLATE: {chat.problem}"
    system = ", default system prompt" if chat.system else ""
    return f"{path}: {chat.family} TEMPLATE{system}, stops {', '.join(chat.stops)}" + (
        f" (caveat: {chat.caveat})" if chat.caveat else "")


if __name__ == "__main__":
    sys.exit(main())
