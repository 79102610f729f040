"""PiSSA (Meng et al. 2024): LoRA that starts from the principal singular components of W0.

    W0 = U S V^T,  s = scaling (alpha / r)
    A0 = sqrt(S_r / s) V_r^T  (r, in)       B0 = U_r sqrt(S_r / s)  (out, r)       so s B0 A0 = U_r S_r V_r^T
    W_res = W0 - s B0 A0                    the base keeps the residual: at step 0 the model is unchanged

Training then moves A and B from (A0, B0) on the residual base: the part of W0 with the largest
singular values trains, the rest stays frozen. Relative to the original W0 the trained layer adds

    s (B A - B0 A0) = s [B, -B0] [A; A0]

a plain LoRA of rank 2r (alpha scaled so the scaling stays s), which is how PEFT converts a PiSSA
adapter for the unmodified base (`path_initial_model_for_weight_conversion`). nanolora always saves
PiSSA adapters in that form, so merge.py, chat.py and peft apply them to the original checkpoint
as they are; the safetensors metadata records r, and --resume splits the adapter back into (A, B)
and (A0, B0) and rebuilds W_res from the original W0 exactly as the first run did.
"""

import math

import torch

from .config import LoRAError

PISSA_KEY = "nanolora.pissa_rank"  # safetensors metadata of a converted PiSSA adapter: its r


def niter_of(init: str) -> int | None:
    """"pissa" -> None (exact SVD), "pissa_niter_N" -> N (randomized SVD with N iterations)."""
    head, _, n = init.partition("_niter_")
    if head != "pissa" or (n and not n.isdigit()) or (init != "pissa" and not n):
        raise LoRAError(f"LoRA init {init!r}: expected pissa or pissa_niter_N")
    return int(n) if n else None


def principal_components(W: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """(A0, B0) of PiSSA for W (out, in), in float32: the top-r singular triplets, exactly (SVD) or
    by randomized SVD with `niter` subspace iterations (Halko et al.; torch.svd_lowrank, as PEFT's
    pissa_niter_N), split as sqrt(S / s) on each side."""
    W = W.float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.t()
    root = torch.sqrt(S / scaling)  # (r,)
    return torch.diag(root) @ Vh, U @ torch.diag(root)


@torch.no_grad()
def start_from_(layer, A0: torch.Tensor, B0: torch.Tensor):
    """Give a LoRALinear PiSSA's start: A = A0, B = B0 and the base W0 - s B0 A0 (formed in float32,
    rounded once to the base's dtype); A0 and B0 are kept for the conversion at saving."""
    residual = layer.weight.float() - layer.scaling * (B0.float() @ A0.float())
    layer.weight.copy_(residual.to(layer.weight.dtype))
    layer.lora_A.weight.copy_(A0)
    layer.lora_B.weight.copy_(B0)
    layer.pissa_A0, layer.pissa_B0 = A0.detach().float().clone(), B0.detach().float().clone()


def pissa_init_(modules: dict, niter: int | None = None):
    """PiSSA's start for every LoRALinear in `modules` (name -> layer), one layer at a time."""
    for name, m in modules.items():
        if m.is_quantized or m.use_dora:
            raise LoRAError(f"{name}: PiSSA on an NF4 or DoRA layer is not supported")
        A0, B0 = principal_components(m.weight, m.lora_A.out_features, m.scaling, niter)
        start_from_(m, A0, B0)


def as_plain_lora(m, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-2r LoRA of the original base that a PiSSA layer computes: [A; A0] and [B, -B0]."""
    return torch.cat([A, m.pissa_A0.to(A)]), torch.cat([B, -m.pissa_B0.to(B)], dim=1)


def plain_alpha(alpha: float, rslora: bool) -> float:
    """alpha of the rank-2r form with the same scaling: 2 alpha (alpha / r), sqrt(2) alpha (rsLoRA)."""
    return alpha * (math.sqrt(2) if rslora else 2)


@torch.no_grad()
def split_(m, A2: torch.Tensor, B2: torch.Tensor):
    """Inverse of as_plain_lora on a layer whose base is still the original W0 (--resume): PiSSA's
    start from the saved (A0, B0), then the trained A, B."""
    r = m.lora_A.out_features
    start_from_(m, A2[r:], -B2[:, r:])
    m.lora_A.weight.copy_(A2[:r])
    m.lora_B.weight.copy_(B2[:, :r])
