"""Put LoRA into a built model by swapping modules, freeze the rest, report it, and fold it back.

The model class is never subclassed or edited: one walk over `named_modules` finds the target
`nn.Linear`s and `setattr` on their parents swaps in `LoRALinear`s that hold the same Parameters.
"""

import re
from contextlib import contextmanager

import torch
import torch.nn as nn
from rich.table import Table

from .config import LoRAConfig, LoRAError
from .layer import LoRALinear, merge_weight


def is_target(name: str, targets: list[str] | str) -> bool:
    """Whether the linear layer `name` gets LoRA, with PEFT's matching rules."""
    if targets == "all-linear":  # PEFT's "all-linear": every linear layer but the output layer
        return name.rsplit(".", 1)[-1] != "lm_head"
    if isinstance(targets, str):  # PEFT reads any other string as a regex over the full name
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _swap(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    # A new module is in training mode; keep the model's mode (else an eval model gets dropout).
    module.train(model.get_submodule(name).training)
    setattr(model.get_submodule(parent), child, module)


def _check_targets(model: nn.Module, cfg: LoRAConfig, linears: list[str], chosen: list[str]):
    example = linears[0] if linears else "none found"
    if isinstance(cfg.targets, list):
        unmatched = [t for t in cfg.targets if not any(is_target(n, [t]) for n in linears)]
        if unmatched:
            raise LoRAError(f"LoRA target(s) {', '.join(unmatched)} match no linear layer of the model "
                            f"(linear layers are named like {example})")
    if not chosen:
        raise LoRAError(f"LoRA targets {cfg.targets!r} match no linear layer (names are like {example})")
    if "lm_head" in chosen and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        raise LoRAError("LoRA on lm_head is not supported when it is tied to embed_tokens")


def inject_lora(model: nn.Module, cfg: LoRAConfig, quantize: str | None = None,
                compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze every parameter of `model`, then give the target linears LoRA; return their names.

    quantize="nf4" is QLoRA: every linear layer but lm_head is stored as bitsandbytes NF4 (double
    quantization, matmuls in `compute_dtype`), targeted or not, as in the QLoRA paper; lm_head
    (often tied to the embeddings) and the embeddings and norms stay as they are. A and B stay in
    float32. Quantization happens on each weight's device, one layer at a time. Best, the model
    was loaded with `load_model(..., replace_linear=quant.nf4_loader(dtype))`, which quantizes each
    layer as it is read (the peak: the NF4 model plus one layer); its NF4Linears are kept as they
    are. Otherwise they are quantized here, after a full-precision load (the peak: that model).
    Load the checkpoint first either way: the quantized base has bitsandbytes' state-dict layout,
    and only the adapter is ever saved.
    """
    if quantize not in (None, "nf4"):
        raise LoRAError(f"quantize {quantize!r} is not supported (only nf4)")
    if lora_modules(model):
        raise LoRAError("the model already has LoRA layers")
    kinds = (nn.Linear,)
    if quantize:
        from .quant import NF4Linear, check_nf4
        kinds = (nn.Linear, NF4Linear)  # NF4Linear: already quantized as loaded (quant.nf4_loader)
    # Names only, not modules: holding every old nn.Linear would keep the unquantized weights alive.
    linears = [name for name, m in model.named_modules() if isinstance(m, kinds)]
    chosen = [name for name in linears if is_target(name, cfg.targets)]
    _check_targets(model, cfg, linears, chosen)
    if quantize:
        check_nf4(model, [name for name in linears if name != "lm_head"])
    model.requires_grad_(False)  # everything frozen; LoRALinear then creates trainable A and B
    for name in linears:
        layer = model.get_submodule(name)
        if quantize and name != "lm_head" and not isinstance(layer, NF4Linear):
            layer = NF4Linear(layer, compute_dtype)
        if name in chosen:
            layer = LoRALinear(layer, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.dora)
        _swap(model, name, layer)
    return chosen


@contextmanager
def adapter_disabled(model: nn.Module):
    """Inside the block every LoRA layer computes its base layer alone, W0 x + b, exactly: the
    model before fine-tuning (chat.py --compare; a DPO reference policy)."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True


@torch.no_grad()
def merge_lora_(model: nn.Module) -> list[str]:
    """Fold each LoRALinear into a plain nn.Linear with W + scaling * B @ A, in place; return names.

    The merged model computes what the adapted one did, with no LoRA overhead. A layer with a frozen
    init adapter (lora/chain.py) merges it too: W + s0 B0 A0 + s B A, formed in float32 and rounded
    once. Refused for an NF4 base: merging into 4-bit weights would lose the update in rounding
    (merge.py merges a QLoRA adapter onto the full-precision checkpoint instead).
    """
    modules = lora_modules(model)
    if any(m.is_quantized for m in modules.values()):
        raise LoRAError("cannot merge LoRA into an NF4-quantized base; run merge.py on the "
                        "full-precision checkpoint instead")
    for name, m in modules.items():
        magnitude = m.lora_magnitude_vector if m.use_dora else None
        W = m.weight if m.init_A is None else merge_weight(m.weight, m.init_A, m.init_B, m.init_scaling)
        merged = merge_weight(W, m.lora_A.weight, m.lora_B.weight, m.scaling, magnitude)  # float32
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(merged.to(m.weight.dtype), requires_grad=False)
        linear.bias = m.bias
        _swap(model, name, linear)
    return list(modules)


def _numel(p: torch.Tensor) -> int:
    # An NF4 Params4bit packs two weights per byte; its quant_state knows the real shape.
    return p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel()


def trainable_table(model: nn.Module) -> Table:
    """A rich Table of trainable vs frozen parameter counts (tied weights counted once)."""
    groups = {}  # label -> [count, dtypes]
    for name, p in model.named_parameters():
        if p.requires_grad:
            label = ("trainable (DoRA magnitude)" if ".lora_magnitude_vector" in name else
                     "trainable (LoRA A, B)" if ".lora_" in name else "trainable (other)")
        else:
            label = "frozen, NF4" if hasattr(p, "quant_state") else "frozen"
        count, dtypes = groups.setdefault(label, [0, set()])
        groups[label][0] = count + _numel(p)
        dtypes.add("nf4" if hasattr(p, "quant_state") else str(p.dtype).removeprefix("torch."))
    total = sum(count for count, _ in groups.values()) or 1
    table = Table(title=f"parameters ({len(lora_modules(model))} LoRA layers)")
    for column in ("parameters", "count", "%", "dtype"):
        table.add_column(column, justify="left" if column in ("parameters", "dtype") else "right")
    for label, (count, dtypes) in sorted(groups.items(), key=lambda kv: not kv[0].startswith("train")):
        table.add_row(label, f"{count:,}", f"{100 * count / total:.3f}", ", ".join(sorted(dtypes)))
    table.add_row("total", f"{total:,}", "100.000", "")
    return table

