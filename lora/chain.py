"""A frozen init adapter under a trained LoRA: preference tuning from an SFT adapter without merging it.

The run starts from base + an adapter (A0 (r0, in), B0 (out, r0), its own scaling s0), which stays
frozen, and trains a new LoRA (A (r, in), B (out, r), scaling s) on top. Each LoRALinear computes

    h = W0 x + b + s0 B0 A0 x + s B A dropout(x)

and, with the trained LoRA switched off (lora.adapter_disabled), W0 x + b + s0 B0 A0 x: base + the
init adapter, the reference policy of DPO. Relative to the original W0 the two together add

    s0 B0 A0 + s B A = s [B, (s0 / s) B0] [A; A0]

a plain LoRA of rank r + r0 with the trained LoRA's scaling s, which is how save_adapter writes it:
one PEFT adapter of the original base, so merge.py, chat.py and peft use it as it is. A PEFT adapter
has one r (nanolora refuses rank_pattern), so every layer is written at the same rank R = r + r0
(r0 the largest init rank): a layer the init adapter does not reach gets zero rows in A and zero
columns in B, which add nothing. alpha is rewritten so the scaling stays s: alpha' = s R, or
s sqrt(R) with rsLoRA. (s0 / s) B0 is formed in float64 and rounded once to B's dtype.

The safetensors metadata records the trained r (INIT_KEY); --resume, with the same init adapter
attached, splits the saved adapter back (`split_`): its first r rows of A and columns of B are the
trained LoRA, and the rest must be the attached init adapter again.
"""

import math

import torch
import torch.nn as nn

from .config import LoRAConfig, LoRAError
from .inject import lora_modules

INIT_KEY = "nanolora.init_rank"  # safetensors metadata of an adapter saved stacked: the trained r


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def attach_init_(model: nn.Module, cfg: LoRAConfig, layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 source) -> None:
    """Make a plain LoRA adapter the frozen init adapter of `model`'s LoRA layers: layers maps a
    module name to its (A0 (r0, in), B0 (out, r0)), cfg is the adapter's config (its scaling is s0),
    and source names the adapter in errors (lora.attach_init_adapter reads them from a directory).
    Every check runs before any layer changes; modules the adapter does not adapt get no init
    adapter. A0 and B0 go to each layer's device, in A's dtype (float32)."""
    modules = lora_modules(model)
    dora = [n for n, m in modules.items() if m.use_dora]
    if dora:
        raise LoRAError(f"{source}: the model's LoRA layers {_some(dora)} are DoRA; an init adapter needs plain LoRA")
    known = {n for n, _ in model.named_modules()}
    absent = [n for n in layers if n not in known]
    if absent:
        raise LoRAError(f"{source}: the adapter does not fit the model: it adapts {_some(absent)}, which it lacks")
    uncovered = [n for n in layers if n not in modules]
    if uncovered:
        raise LoRAError(f"{source}: the adapter adapts {_some(uncovered)}, which have no LoRA layer in the "
                        "model; include them in --lora-targets")
    for name, (A0, B0) in layers.items():
        m = modules[name]
        need = ((cfg.r, m.in_features), (m.out_features, cfg.r))
        if (tuple(A0.shape), tuple(B0.shape)) != need:
            raise LoRAError(f"{source}: {name}: A {tuple(A0.shape)} and B {tuple(B0.shape)}, the model needs "
                            f"{need[0]} and {need[1]}")
        if m.init_A is not None or m.pissa_A0 is not None:
            raise LoRAError(f"{source}: {name} already has an init adapter or a PiSSA start")
    for name, (A0, B0) in layers.items():
        m = modules[name]
        like = m.lora_A.weight
        m.init_A = A0.detach().to(device=like.device, dtype=like.dtype, copy=True)
        m.init_B = B0.detach().to(device=like.device, dtype=like.dtype, copy=True)
        m.init_scaling = cfg.scaling


def init_rank(modules) -> int:
    """The largest init adapter rank r0 among LoRA layers (0 without one): R - r when saving."""
    return max((m.init_A.shape[0] for m in modules.values() if m.init_A is not None), default=0)


def stacked(m, A: torch.Tensor, B: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain LoRA of the original base that layer m computes with the trained A (r, in), B (out, r):

        A' = [A; A0; 0] (rank, in)      B' = [B, (s0 / s) B0, 0] (out, rank)      s B' A' = s B A + s0 B0 A0

    rank: the total, r + r0 by default; the zero blocks pad a layer up to it (all of it past r for a
    layer without an init adapter)."""
    blocks_A, blocks_B = [A], [B]
    if m.init_A is not None:
        blocks_A.append(m.init_A.to(A))
        factor = m.init_scaling / m.scaling  # s0 / s
        blocks_B.append((m.init_B.to(B.device, torch.float64) * factor).to(B.dtype))
    width = sum(a.shape[0] for a in blocks_A)
    rank = width if rank is None else rank
    if rank < width:
        raise LoRAError(f"cannot stack rank {width} (trained plus init adapter) into rank {rank}")
    blocks_A.append(A.new_zeros(rank - width, A.shape[1]))
    blocks_B.append(B.new_zeros(B.shape[0], rank - width))
    return torch.cat(blocks_A), torch.cat(blocks_B, dim=1)


def stacked_alpha(scaling: float, rank: int, rslora: bool) -> float:
    """alpha of the rank-R stacked form with scaling s: s R (alpha / R = s), or s sqrt(R) for rsLoRA."""
    return scaling * (math.sqrt(rank) if rslora else rank)


@torch.no_grad()
def split_(m, A2: torch.Tensor, B2: torch.Tensor):
    """Inverse of `stacked` on a layer whose init adapter is attached (--resume): A2 (R, in) and
    B2 (out, R) must be [A; A0; 0] and [B, (s0 / s) B0, 0] for this layer's A0, B0 (the products
    within float32 rounding: a few units of 2^-24 relative, where another adapter differs
    entirely); then A = A2[:r], B = B2[:, :r]."""
    r = m.lora_A.out_features
    A_ref, B_ref = stacked(m, A2[:r], B2[:, :r], rank=A2.shape[0])
    tolerance = 2.0 ** -20  # 16 float32 roundings: the factor's and the product's, with room
    if not (torch.allclose(A2[r:], A_ref[r:], rtol=tolerance, atol=0)
            and torch.allclose(B2[:, r:], B_ref[:, r:], rtol=tolerance, atol=0)):
        raise LoRAError("checkpoint was trained from another --init-adapter (its frozen part differs from the "
                        "attached one)")
    m.lora_A.weight.copy_(A2[:r])
    m.lora_B.weight.copy_(B2[:, :r])
