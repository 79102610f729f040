"""The Llama-family network, its config, and loading from safetensors, the hub and GGUF."""

from .config import ConfigError, LlamaConfig
from .llama import KVCache, Llama
from .files import LoadError
from .load import DEMO_MODEL, load_model, resolve_model_dir

__all__ = ["DEMO_MODEL", "ConfigError", "KVCache", "Llama", "LlamaConfig", "LoadError", "load_model", "resolve_model_dir"]
