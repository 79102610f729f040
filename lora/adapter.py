"""Adapters on disk, in PEFT's format, so they load in peft and peft's load here.

    adapter_dir/
        adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, ...}
        adapter_model.safetensors    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
                                     (r, in) and ...lora_B.weight (out, r) for every LoRA layer,
                                     and for DoRA ...lora_magnitude_vector (out,)
        nanolora_base.json           {"path": the base trained on, "fingerprint": sha256 of its content}

PEFT's keys are our module names behind the prefix "base_model.model.": a `PeftModel` holds a
`LoraModel` as `.base_model`, which holds the transformers model as `.model`, and transformers'
module names are ours. Weights are saved in their own dtype (float32 while training).

nanolora_base.json is ours (peft ignores it): merge.py and chat.py refuse a base whose content
differs from the one the adapter was trained on (`check_base`) unless --allow-other-base. An
adapter without it (peft's, or from elsewhere) is applied to any base of the right shapes.
"""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from model.errors import key_mismatches, one_line
from model.files import save_safetensors
from model.fingerprint import model_fingerprint

from . import chain, pissa
from .config import LoRAConfig, LoRAError
from .inject import inject_lora, is_target, lora_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (transformers model)
QUANT_KEY = "nanolora.base_quantization"  # safetensors metadata: "nf4" for a QLoRA adapter
BASE_FILE = "nanolora_base.json"  # the base the adapter was trained on: its path and fingerprint

# PEFT options that change what an adapter computes and that nanolora does not implement: an
# adapter setting any of them is refused rather than loaded wrongly.
UNSUPPORTED = {
    "modules_to_save": "modules_to_save", "lora_bias": "lora_bias",
    "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern",
    "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)", "target_parameters": "target_parameters",
    "exclude_modules": "exclude_modules", "trainable_token_indices": "trainable_token_indices",
    "layer_replication": "layer_replication", "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA", "use_bdlora": "BD-LoRA",
}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key -> A (r, in), B (out, r) and, for DoRA, m (out,) Parameter, for every LoRALinear."""
    tensors = {}
    for name, m in lora_modules(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
        if m.use_dora:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    return tensors


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The target_modules to write: the leaf names (q_proj, ...) when they select exactly `names`
    among the model's linear layers, else the full names (say, only some layers were adapted)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or n in names]
    return leaves if [n for n in linears if is_target(n, leaves)] == names else names


def _as_plain_lora(modules: dict, cfg: LoRAConfig, tensors: dict, metadata: dict) -> tuple[int, float]:
    """Rewrite `tensors` (PEFT key -> A, B) in place as the plain LoRA of the original base that the
    layers compute where they started from PiSSA (rank 2r, lora/pissa.py) or carry a frozen init
    adapter (rank R = r + r0, lora/chain.py), recording the trained r in `metadata`; return the r
    and alpha to write (cfg's own for plain layers)."""
    started = [m.pissa_A0 is not None for m in modules.values()]
    chained = any(m.init_A is not None for m in modules.values())
    if any(started) and chained:
        raise LoRAError("some LoRA layers started from PiSSA and some carry an init adapter: cannot save one adapter")
    if any(started):
        if not all(started):
            raise LoRAError("some LoRA layers started from PiSSA and some did not: cannot save one adapter")
        convert = pissa.as_plain_lora
        metadata[pissa.PISSA_KEY] = str(cfg.r)
        r, alpha = 2 * cfg.r, pissa.plain_alpha(cfg.alpha, cfg.rslora)
    elif chained:
        r = cfg.r + chain.init_rank(modules)  # one rank for every layer: see lora/chain.py
        convert = lambda m, A, B: chain.stacked(m, A, B, rank=r)
        metadata[chain.INIT_KEY] = str(cfg.r)
        alpha = chain.stacked_alpha(cfg.scaling, r, cfg.rslora)
    else:
        return cfg.r, cfg.alpha
    for name, m in modules.items():
        a, b = f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"
        tensors[a], tensors[b] = (t.contiguous() for t in convert(m, tensors[a], tensors[b]))
    return r, alpha


def save_adapter(model: nn.Module, cfg: LoRAConfig, out_dir, base_model_name_or_path: str | None = None,
                 files: dict[str, str] | None = None):
    """Write `model`'s A and B and `cfg` to `out_dir` in PEFT's format, atomically.

    files: more files to write beside them (name -> text): train.py's are the run's tokenizer
    files and the chat template it trained with (data.tokenizer_files), as PEFT and TRL save them.
    Layers that started from PiSSA or carry an init adapter are written as the plain LoRA of the
    original base they amount to (`_as_plain_lora`)."""
    modules = lora_modules(model)
    if not modules:
        raise LoRAError("the model has no LoRA layers to save")
    tensors = {k: p.detach().to("cpu").contiguous() for k, p in adapter_state_dict(model).items()}
    metadata = {"format": "pt"}
    if any(m.is_quantized for m in modules.values()):
        metadata[QUANT_KEY] = "nf4"  # peft ignores metadata; merge.py reports it
    r, alpha = _as_plain_lora(modules, cfg, tensors, metadata)
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or cfg.base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": _target_modules(model, list(modules)),
        "bias": "none", "use_dora": cfg.dora, "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata=metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if not out_dir.exists():
            tmp.rename(out_dir)  # the whole adapter appears at once
        else:  # keep whatever else is in out_dir; replace each of our files atomically
            for name in (WEIGHTS_FILE, CONFIG_FILE, *(files or {})):
                os.replace(tmp / name, out_dir / name)
    except (OSError, SafetensorError) as e:  # a full disk, say: name the adapter, not our temp dir
        why = one_line(e)
        raise LoRAError(f"{out_dir / WEIGHTS_FILE}: adapter not saved ({why})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The adapter_config.json fields read, as PEFT writes them: a "8" or a "false" there would otherwise
# fail later as a traceback, or (bool("false")) silently mean the opposite.
FIELD_TYPES = {
    "r": (lambda v: _number(v) and isinstance(v, int) and v > 0, "a positive integer"),
    "lora_alpha": (_number, "a number"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(t, str) for t in v),
                       "a string or a list of strings"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string"),
}


def read_adapter_config(adapter_dir) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory; options nanolora cannot honour are errors."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise LoRAError(f"{path}: not found (an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if raw.get("peft_type") != "LORA":
        raise LoRAError(f"{path}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are supported")
    used = [label for key, label in UNSUPPORTED.items() if raw.get(key)]
    if raw.get("bias", "none") != "none":
        used.append(f"bias={raw['bias']!r}")
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(("pissa", "corda", "olora", "lora_ga")):  # the adapter applies to a changed base
        used.append(f"init_lora_weights={raw['init_lora_weights']!r} without conversion (it applies to the residual "
                    "base; save it from peft with path_initial_model_for_weight_conversion)")
    if used:
        raise LoRAError(f"{path}: uses {', '.join(used)}, which nanolora does not support")
    if not raw.get("target_modules") or "r" not in raw:
        raise LoRAError(f"{path}: needs r and target_modules")
    for key, (fits, wanted) in FIELD_TYPES.items():
        if key in raw and not fits(raw[key]):
            raise LoRAError(f"{path}: {key} = {json.dumps(raw[key])}: expected {wanted}")
    try:
        return LoRAConfig(r=raw["r"], alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                          targets=raw["target_modules"], rslora=bool(raw.get("use_rslora", False)),
                          dora=bool(raw.get("use_dora", False)),
                          base_model_name_or_path=raw.get("base_model_name_or_path"))
    except LoRAError as e:
        raise LoRAError(f"{path}: {e}") from None


def read_adapter_tensors(adapter_dir, metadata_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors (PEFT key -> tensor, on the CPU; none with metadata_only) and its
    safetensors metadata."""
    path = Path(adapter_dir) / WEIGHTS_FILE
    if not path.is_file():
        hint = " (adapter_model.bin is a pickle; convert it to safetensors)" if (
            Path(adapter_dir) / "adapter_model.bin").exists() else ""
        raise LoRAError(f"{path}: not found{hint}")
    try:
        with safe_open(path, framework="pt") as f:
            return {} if metadata_only else {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise LoRAError(f"{path}: not a readable safetensors file ({e})") from None


def check_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source):
    """Strict: the file's keys and shapes must be exactly those of `model`'s LoRA layers."""
    expected = {k: tuple(p.shape) for k, p in adapter_state_dict(model).items()}
    problems = key_mismatches(expected, {k: tuple(t.shape) for k, t in tensors.items()})
    if problems:
        raise LoRAError(f"{source}: adapter does not fit the model: " + "; ".join(problems))


def load_adapter(model: nn.Module, adapter_dir) -> LoRAConfig:
    """Load a PEFT LoRA adapter into `model`, injecting LoRA first if the model has none.

    To use an adapter on an NF4 base, inject with quantize="nf4" first, then load. LoRA layers that
    carry an init adapter (lora/chain.py) take only a checkpoint saved stacked with it (--resume),
    split back into their A and B; anywhere else such a checkpoint is the plain rank-R LoRA it is
    on disk (merge.py, chat.py), except in layers of its trained r, which need the init adapter.
    """
    cfg = read_adapter_config(adapter_dir)
    tensors, metadata = read_adapter_tensors(adapter_dir)
    modules = lora_modules(model)
    source = Path(adapter_dir) / WEIGHTS_FILE
    pissa_r, init_r = metadata.get(pissa.PISSA_KEY), metadata.get(chain.INIT_KEY)
    if any(m.init_A is not None for m in modules.values()):
        return _load_init_checkpoint(modules, cfg, tensors, init_r, source)
    if pissa_r and modules and all(m.lora_A.out_features == int(pissa_r) for m in modules.values()):
        return _load_pissa_checkpoint(model, modules, cfg, tensors, source)
    if init_r and modules and all(str(m.lora_A.out_features) == init_r for m in modules.values()):
        raise LoRAError(f"{source}: a checkpoint trained on an --init-adapter; attach that init adapter first")
    if not modules:
        try:
            inject_lora(model, cfg)
        except LoRAError as e:
            raise LoRAError(f"{adapter_dir}: {e}") from None
    elif any(abs(m.scaling - cfg.scaling) > 1e-12 * cfg.scaling for m in modules.values()):
        raise LoRAError(f"{adapter_dir}: adapter scaling {cfg.scaling:g} differs from the model's "
                        f"LoRA layers ({next(iter(modules.values())).scaling:g})")
    check_adapter_tensors(model, tensors, source)
    with torch.no_grad():
        for key, p in adapter_state_dict(model).items():
            p.copy_(tensors[key])  # copy_ casts to the parameter's dtype and device
    return cfg


def _load_pissa_checkpoint(model, modules, cfg, tensors, source) -> LoRAConfig:
    """A PiSSA run's checkpoint (rank 2r) into its rank-r layers on the original base (--resume):
    PiSSA's start rebuilt from the saved (A0, B0), then the trained A and B (lora/pissa.py)."""
    if any(m.pissa_A0 is not None for m in modules.values()):
        raise LoRAError(f"{source}: the model's LoRA layers already started from PiSSA; load a PiSSA "
                        "checkpoint onto the original base with plain LoRA layers")
    expected = {}
    for k, p in adapter_state_dict(model).items():
        shape = tuple(p.shape)
        expected[k] = (2 * shape[0], shape[1]) if ".lora_A." in k else (shape[0], 2 * shape[1])
    _check_stacked(expected, tensors, modules, cfg, source, "PiSSA adapter")
    for name, m in modules.items():
        pissa.split_(m, tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"])
    return cfg


def _check_stacked(expected: dict, tensors: dict, modules: dict, cfg: LoRAConfig, source, what: str):
    """A saved adapter's shapes against those a split needs, and its scaling against the layers'."""
    problems = key_mismatches(expected, {k: tuple(t.shape) for k, t in tensors.items()})
    if problems:
        raise LoRAError(f"{source}: {what} does not fit the model: " + "; ".join(problems))
    if any(abs(m.scaling - cfg.scaling) > 1e-12 * cfg.scaling for m in modules.values()):
        raise LoRAError(f"{source}: adapter scaling {cfg.scaling:g} differs from the model's LoRA layers")


def _load_init_checkpoint(modules, cfg, tensors, init_r: str | None, source) -> LoRAConfig:
    """A checkpoint saved stacked with an init adapter (rank R = r + r0; init_r, its metadata, the
    trained r) into rank-r layers that carry the same init adapter (--resume): the trained A and B
    split back out (lora/chain.py)."""
    r = next(iter(modules.values())).lora_A.out_features
    r0 = chain.init_rank(modules)
    if init_r != str(r):
        saved = f"a trained r of {init_r}" if init_r else "no init adapter"
        raise LoRAError(f"{source}: the model's LoRA layers (r {r}) carry an init adapter; this adapter was "
                        f"saved with {saved}")
    if cfg.r != r + r0:
        raise LoRAError(f"{source}: checkpoint was trained from another --init-adapter (rank {cfg.r - r}, "
                        f"the attached one has rank {r0})")
    expected = {}
    for name, m in modules.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (cfg.r, m.in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (m.out_features, cfg.r)
    _check_stacked(expected, tensors, modules, cfg, source, "adapter")
    for name, m in modules.items():
        A2, B2 = tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        try:
            chain.split_(m, A2, B2)
        except LoRAError as e:
            raise LoRAError(f"{source}: {name}: {e}") from None
    return cfg


def attach_init_adapter(model: nn.Module, adapter_dir) -> LoRAConfig:
    """Attach the PEFT adapter in `adapter_dir` to `model`'s LoRA layers as their frozen init
    adapter (lora/chain.py): the model then computes base + that adapter + the LoRA it trains.
    Inject LoRA first, on at least the modules the adapter adapts; returns the adapter's config."""
    cfg = read_adapter_config(adapter_dir)
    if cfg.dora:  # its magnitudes rescale whole rows of W0: not a term that adds beside the trained LoRA
        raise LoRAError(f"{adapter_dir}: a DoRA adapter cannot be an init adapter (merge it into the base instead)")
    tensors, _ = read_adapter_tensors(adapter_dir)
    source = Path(adapter_dir) / WEIGHTS_FILE
    names = sorted({k.removeprefix(PEFT_PREFIX).rpartition(".lora_")[0] for k in tensors if ".lora_" in k})
    expected = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight": () for n in names for ab in "AB"}
    problems = key_mismatches(expected, {k: () for k in tensors})  # keys only: chain checks the shapes
    if problems or not names:
        raise LoRAError(f"{source}: not a plain LoRA adapter: " + ("; ".join(problems) or "no LoRA weights"))
    layers = {n: (tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"])
              for n in names}
    chain.attach_init_(model, cfg, layers, Path(adapter_dir))
    return cfg


# -----------------------------------------------------------------------------
# the base an adapter belongs to

def base_record(base_dir, fingerprint: str) -> str:
    """nanolora_base.json's text: the base's directory and model.fingerprint.model_fingerprint."""
    return json.dumps({"path": str(Path(base_dir).resolve()), "fingerprint": fingerprint}, indent=2) + "\n"


def resolve_adapter_dir(path) -> Path:
    """An --adapter argument as an adapter directory: given a training run's directory, its final
    adapter (run/adapter); else the path as it is. A run stopped before its end has none: the
    message names its newest checkpoint's adapter instead."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    if (p / "adapter" / CONFIG_FILE).is_file():
        return p / "adapter"
    saved = sorted(a for a in (p / "checkpoints").glob("step-*/adapter")
                   if (a / CONFIG_FILE).is_file() and not a.parent.name.endswith(".tmp"))
    if saved:
        raise LoRAError(f"{p}: a training run without its final adapter (stopped before its end?); "
                        f"pass a checkpoint's, the newest being {saved[-1]}")
    return p  # not an adapter: reading its CONFIG_FILE says so


def adapter_base(adapter_dir) -> str | None:
    """The base an adapter names: the directory its nanolora_base.json records when it still exists,
    else adapter_config.json's base_model_name_or_path (what PEFT's from_pretrained loads), else None."""
    record = read_base_record(adapter_dir)
    if record and isinstance(record.get("path"), str) and Path(record["path"]).is_dir():
        return record["path"]
    return read_adapter_config(adapter_dir).base_model_name_or_path


def read_base_record(adapter_dir) -> dict | None:
    """The adapter's nanolora_base.json, or None if it has none (peft's adapters)."""
    path = Path(adapter_dir) / BASE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise LoRAError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(record, dict) and isinstance(record.get("fingerprint"), str)):
        raise LoRAError(f"{path}: needs a \"fingerprint\" (and \"path\") of the base model")
    return record


def check_base(adapter_dir, base_dir, allow_other: bool):
    """Refuse a base whose content is not the one the adapter was trained on, naming both; with
    allow_other (--allow-other-base), warn and go on. No nanolora_base.json: nothing to check."""
    record = read_base_record(adapter_dir)
    if record is None or model_fingerprint(Path(base_dir)) == record["fingerprint"]:
        return
    what = (f"the adapter {adapter_dir} was trained on the base {record.get('path')}; {base_dir} holds "
            "other weights (or config, tokenizer)")
    if not allow_other:
        raise LoRAError(f"{what}; pass --allow-other-base to apply it anyway")
    print(f"warning: {what}; applying it anyway (--allow-other-base)", file=sys.stderr)
