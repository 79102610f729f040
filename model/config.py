"""The model's shape, read from a Hugging Face `config.json`.

One dataclass covers the Llama family: Llama 2/3 (and DeepSeek-LLM, SmolLM2, TinyLlama, which are
`LlamaForCausalLM`), Mistral and Qwen2. Their differences are fields here, not subclasses.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(UserError, ValueError):
    """A config.json this project cannot build a model from."""


REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SIZES = REQUIRED_SIZES + ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
SCALES = ("rms_norm_eps", "rope_theta")


def check_numbers(hf: dict, source: str):
    """Each size a positive integer, each scale a positive number (an optional one may be null): a
    string or a negative size would otherwise fail deep in torch, as a traceback. A missing required
    key is left to the KeyError that names it."""
    for key in SIZES + SCALES:
        value = hf.get(key)
        if key not in hf or value is None and key not in REQUIRED_SIZES:
            continue
        kinds = int if key in SIZES else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
            wanted = "a positive integer" if key in SIZES else "a positive number"
            raise ConfigError(f"{source}: {key} = {json.dumps(value)}: expected {wanted}")


@dataclass
class LlamaConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096  # width of the residual stream
    intermediate_size: int = 11008  # width of the SwiGLU MLP
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int = 32  # fewer than query heads means grouped-query attention (GQA)
    head_dim: int = 128  # usually hidden_size // num_attention_heads, but some checkpoints set it
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v
    o_bias: bool = False  # Llama's `attention_bias` puts one on o_proj too
    mlp_bias: bool = False
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight (SmolLM2, Llama-3.2-1B)
    sliding_window: int | None = None  # Mistral v0.1 / Qwen2 with use_sliding_window
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "LlamaConfig":
        """Build from the dict of a Hugging Face config.json; `source` names it in errors."""
        archs = hf.get("architectures") or [_ARCH_BY_MODEL_TYPE.get(hf.get("model_type"), "?")]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: architecture {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        check_numbers(hf, source)
        heads = hf["num_attention_heads"]
        # transformers >= 5 writes `rope_parameters` (theta inside it); older files `rope_theta`
        # plus `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        is_qwen2 = arch == "Qwen2ForCausalLM"
        window = hf.get("sliding_window")
        if is_qwen2 and not hf.get("use_sliding_window", False):
            window = None
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            qkv_bias=True if is_qwen2 else hf.get("attention_bias", False),
            o_bias=False if is_qwen2 else hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            sliding_window=window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        try:
            return cls.from_hf(hf, source=str(path))
        except KeyError as e:
            raise ConfigError(f"{path}: missing field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """The config.json transformers reads back (used by the GGUF importer and tests)."""
        model_type = {v: k for k, v in _ARCH_BY_MODEL_TYPE.items()}[self.architecture]
        d = {k: v for k, v in asdict(self).items() if k not in ("architecture", "qkv_bias", "o_bias")}
        d.update(architectures=[self.architecture], model_type=model_type, hidden_act="silu")
        if self.architecture != "Qwen2ForCausalLM":
            d["attention_bias"] = self.qkv_bias
        d["rope_scaling"] = self.rope_scaling
        return d


_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
