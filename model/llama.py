"""The Llama network in plain PyTorch, with Hugging Face module names.

    embed_tokens -> [ x + attn(norm(x)) ; x + mlp(norm(x)) ] * num_hidden_layers -> norm -> lm_head

Module and parameter names are those of transformers' `LlamaForCausalLM` (`model.layers.0.self_attn.
q_proj.weight`, ...), and RoPE rotates halves of each head as transformers does, so checkpoints
load with no key map and no q/k permutation, and LoRA adapters carry the names PEFT uses.

Packed rows (data.collate(..., pack=True): several documents a row) attend within their documents,
by one of three kernels that compute the same thing (`packed_kernel` picks): FlashAttention's
variable-length kernel, one SDPA call per document (`document_attention`), or SDPA with a
block-diagonal mask, the twin the other two are tested against.
"""

import functools
import inspect
import math
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import fused, offload
from .config import LlamaConfig

# `enable_gqa` lets SDPA share each K/V head between its query heads without copying (torch >= 2.5).
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@functools.cache
def varlen_kernel():
    """torch's FlashAttention over packed documents (CUDA) in the form with windows and GQA (torch
    2.12 has it), or None; imported on first use, as it imports torch's compiler stack."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # (an older torch)
        return None
    return varlen_attn if {"window_size", "enable_gqa"} <= set(inspect.signature(varlen_attn).parameters) else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if fused.enabled():
            return fused.RMSNormFunction.apply(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):
    """RMSNorm (Zhang & Sennrich 2019, eq. 4): x / RMS(x) * weight, RMS(x) = sqrt(mean(x^2) + eps),
    over the last dimension. Normalised in float32 (or wider), cast back, then scaled: the order
    transformers uses. The textbook twin of fused.RMSNormFunction."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_rotate(x, cos, sin):
    """Rotary position embedding (Su et al. 2021, eq. 34, with transformers' half rotation):
    x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) for the halves x1, x2 of each head.
    x (B, heads, T, head_dim); cos, sin (B, 1, T, head_dim). The textbook twin of fused.RoPE."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def attention(q, k, v, mask=None, is_causal=False):
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1): softmax(q k^T / sqrt(d)) v, with
    each query seeing only the keys `mask` allows (or, is_causal, those at or before it). q (B, H,
    T, D); k, v (B, Hkv, S, D), each K/V head shared by H / Hkv query heads (GQA). What SDPA's
    kernels compute, op by op: the (B, H, T, S) scores exist."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1)  # fp32 or wider
    return weights.to(q.dtype) @ v  # (B, H, T, D)


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, (head_dim // 2,) in float32."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def neftune_noise(x, alpha: float):
    """NEFTune (Jain et al. 2023, Algorithm 1): the input embeddings x (B, L, d) plus uniform noise
    U(-a, a), a = alpha / sqrt(L d). L is the rows' length as batched (padding included), as
    transformers' and TRL's trainers read it. Training only: evaluation and generation see x."""
    bound = alpha / math.sqrt(x.shape[1] * x.shape[2])
    return x + torch.empty_like(x).uniform_(-bound, bound)


class KVCache:
    """Keys and values of the positions seen so far, preallocated for `max_len` positions.

    Pass one to `Llama.forward` when generating: the prompt is run once (prefill), then one token
    per call. `length` is the number of positions already cached.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Store k, v (B, n_kv_heads, T, head_dim) after the cached ones; return all of them."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} requested")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class PackedDocuments(NamedTuple):
    """Packed rows, each document kept apart from the others without a (B, 1, T, T) mask. Two
    kernels read it (`packed_kernel` picks one): FlashAttention's variable-length kernel, reading
    the (B, T) rows as one sequence of B*T tokens, document k being tokens cu_seqlens[k] up to
    cu_seqlens[k + 1]; and `document_attention`, one SDPA call per document, reading `spans`."""
    cu_seqlens: torch.Tensor  # (documents + 1,) int32, 0 first and B*T last
    max_len: int  # the longest document's length
    spans: torch.Tensor  # (documents, 3) int64, each document's (row, start, end); stays on the CPU
    kernel: str = "documents"  # which reads it: "documents" (any device), or "varlen" (hidden_states sets it)

    def to(self, device, non_blocking: bool = False) -> "PackedDocuments":
        """cu_seqlens on `device`; spans stay on the CPU, where reading them makes no one wait."""
        return self._replace(cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking))


def packed_documents(document_ids: torch.Tensor) -> PackedDocuments:
    """PackedDocuments of document_ids (B, T), whose documents are runs of one id within a row
    (data.collate's; its padding is a document of its own). It takes a nonzero(), a max() and a
    copy to the CPU, which on a GPU make the host wait: train.py computes it on the CPU, before the
    batch moves, so that the step itself never waits."""
    B, T = document_ids.shape
    starts = torch.ones((B, T), dtype=torch.bool, device=document_ids.device)  # every row starts one
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    cu = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([B * T], device=starts.device)])
    row, start = cu[:-1] // T, cu[:-1] % T  # no document crosses a row: every row starts one
    spans = torch.stack([row, start, start + cu[1:] - cu[:-1]], dim=1).cpu()  # (documents, 3)
    return PackedDocuments(cu.to(torch.int32), int((cu[1:] - cu[:-1]).max()), spans)


def varlen_runs(x: torch.Tensor, config: LlamaConfig) -> bool:
    """Whether packed rows take the varlen kernel for activations like x: CUDA of compute capability
    8.0 or more, bf16/fp16 (under autocast, its dtype), a head size it takes, a torch that has it."""
    if not (x.is_cuda and config.head_dim % 8 == 0 and config.head_dim <= 256 and varlen_kernel() is not None):
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(x.device) >= (8, 0)


_MODELLED_CUDA = False  # modelled_cuda(): fake CPU tensors standing for a CUDA step


@contextmanager
def modelled_cuda():
    """Inside, packed rows take a CUDA device's path on any device: --estimate-memory counts a CUDA
    step on fake CPU tensors (a CPU-only torch has no autograd on CUDA ones, fake or not), the
    varlen kernel modelled by the per-document path (both keep an output and a log-sum-exp per
    token and head, neither a mask nor the scores)."""
    global _MODELLED_CUDA
    before, _MODELLED_CUDA = _MODELLED_CUDA, True
    try:
        yield
    finally:  # (nested: the outer one's setting comes back)
        _MODELLED_CUDA = before


def packed_kernel(x: torch.Tensor, config: LlamaConfig) -> str:
    """How packed rows keep their documents apart, for activations like x:

        "varlen"     FlashAttention's variable-length kernel, one call for all documents, where it
                     runs (`varlen_runs`: CUDA, bf16/fp16, a torch that has it, as 2.12 does)
        "documents"  one SDPA call per document (`document_attention`), elsewhere on CUDA (an
                     older torch, fp32, a head size flash refuses): each call causal, no mask
        "mask"       SDPA with the block-diagonal (B, 1, T, T) mask, on the CPU, whose SDPA reads
                     a mask without forming the scores. On CUDA a mask keeps SDPA off flash, and
                     with GQA (in many torch versions) off the memory-efficient kernel too: the
                     math kernel then holds all B*H*T^2 scores in memory.

    The three compute the same thing; the mask path is the twin the other two are tested against."""
    if varlen_runs(x, config):
        return "varlen"
    return "documents" if x.is_cuda or _MODELLED_CUDA else "mask"


def document_attention(q, k, v, spans, window: int | None = None):
    """Causal attention within each packed document, one SDPA call per document. q (B, H, T, D);
    k, v (B, Hkv, T, D), each K/V head shared by H / Hkv query heads; spans (documents, 3), the
    (row, start, end) of each document, in order along each row and covering it (a CPU tensor)
    -> (B, H, T, D). A query sees the keys of its own document at or before it; with a window,
    only the last `window` of those, its own included.

    It computes what SDPA with the block-diagonal mask computes (the mask path is its twin),
    without the mask: each call is causal over one document, so CUDA's SDPA takes a kernel that
    never holds the scores, and no block of the (T, T) grid between two documents is computed.
    One kernel call per document is cheap for the few dozen documents of a packed micro-batch.
    torch.compile leaves this function out (one graph break per block; DecoderLayer.compile):
    traced, the loop would be unrolled and recompiled for every new number of documents; as a
    tensor, spans are only a size guard, that turns dynamic."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and not _SDPA_HAS_GQA:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, T, D)
    gqa = {"enable_gqa": n_rep > 1} if _SDPA_HAS_GQA else {}
    rows = [[] for _ in range(q.shape[0])]  # each row's documents' outputs, in order
    for b, s, e in spans.tolist():  # host ints: the host never waits for the device
        # (1, heads, L, D): kept 4-D, since SDPA's flash and memory-efficient kernels want that
        qd, kd, vd = q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e]
        if window is not None and e - s > window:  # a document longer than the window: its own mask
            i = torch.arange(e - s, device=q.device)
            # (L, L): query i sees keys j with i - window < j <= i
            allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
            rows[b].append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed, **gqa))
        else:
            rows[b].append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, **gqa))
    return torch.cat([torch.cat(pieces, dim=2) for pieces in rows])  # (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=config.o_bias)
        self.sliding_window = config.sliding_window

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None, layer: int = 0):
        """mask: None (causal), a bool (B|1, 1, T, S) mask, or PackedDocuments: packed rows, whose
        documents are kept apart by FlashAttention's variable-length kernel (its kernel "varlen") or
        by one SDPA call per document ("documents", document_attention). Where a debugger steps
        from here, file by file, on the fast path and on the textbook one: model/fused.py's
        docstring."""
        B, T, _ = x.shape
        if fused.enabled() and isinstance(self.q_proj, fused.SharedInputLinear):  # LoRA: lora/layer.py
            q, k, v = self.q_proj.forward_shared(x, (self.q_proj, self.k_proj, self.v_proj))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rope = fused.apply_rope if fused.enabled() else rope_rotate
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if isinstance(mask, PackedDocuments) and mask.kernel == "varlen":
            y = self.varlen_attention(q, k, v, mask)  # (B*T, H, D)
            return self.o_proj(y.view(B, T, self.n_heads * self.head_dim))
        if isinstance(mask, PackedDocuments):
            y = document_attention(q, k, v, mask.spans, self.sliding_window)  # (B, H, T, D)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, Hkv, S, D), S = cached + T
        # mask None means plain causal attention over T == S positions: SDPA's `is_causal` path is
        # the fast one (flash / memory-efficient kernels, no (T, S) mask in memory). Without a
        # cache that is always so, whatever T: a constant, so torch.compile does not break the
        # graph on a symbolic T > 1 when the lengths of micro-batches vary.
        is_causal = mask is None and (kv_cache is None or (k.shape[2] == T and T > 1))
        if not fused.enabled():  # the textbook twin: its (B, H, T, S) scores are in memory, by design
            y = attention(q, k, v, mask, is_causal)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if self.n_kv_heads != self.n_heads and not _SDPA_HAS_GQA:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        gqa = {"enable_gqa": self.n_kv_heads != self.n_heads} if _SDPA_HAS_GQA else {}
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def varlen_attention(self, q, k, v, documents: PackedDocuments):
        """Causal attention within each packed document, by FlashAttention's variable-length kernel:
        the B rows are one sequence of B*T tokens cut at documents.cu_seqlens. It computes what SDPA
        with the block-diagonal mask computes (the mask path is its twin), without the (B, 1, T, T)
        mask that keeps SDPA off its flash kernel. q (B, H, T, D), k, v (B, Hkv, T, D) ->
        (B*T, H, D)."""
        tokens = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])  # (B*T, heads, D)
        cu, n = documents.cu_seqlens, documents.max_len
        # (left, right) keys beside the query's own: all earlier ones, or window - 1 of them
        window = (-1, 0) if self.sliding_window is None else (self.sliding_window - 1, 0)
        return varlen_kernel()(tokens(q), tokens(k), tokens(v), cu, cu, n, n, window_size=window,
                           enable_gqa=self.n_kv_heads != self.n_heads)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), x (B, T, hidden) -> (B, T, hidden).

    With `tiles` = N > 1 (--tile-mlp), in training, the MLP runs over N tiles of the sequence
    (torch.tensor_split along T, uneven T allowed, never more tiles than T), each under its own
    non-reentrant checkpoint. Why: untiled, backward keeps gate(x), up(x) and their product, each
    (B, T, intermediate), for every layer (or, with grad_checkpointing, for the layer being
    recomputed), and intermediate is several times hidden. Tiled, each tile keeps only its input
    (a view of x, which is kept anyway) and its (B, T/N, intermediate) activations exist for one
    tile at a time, in forward, in the block's recompute and in backward. The cost: one more
    forward of each tile's MLP in backward (with grad_checkpointing, besides the block's). Tiles
    compute what the whole sequence does (a token's MLP reads that token only). LoRA dropout draws
    its masks per call, so a tiled run draws other, equally distributed masks than an untiled one
    (equal results need dropout 0); within a tile the recompute replays its masks (the checkpoint
    restores the RNG state). The textbook path (fused.textbook_path), evaluation and generation
    run untiled.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.tiles = 1  # sequence tiles in training (Llama sets it: --tile-mlp)

    def forward(self, x):
        tiles = min(self.tiles, x.shape[1])
        if tiles > 1 and self.training and torch.is_grad_enabled() and fused.enabled():
            # Each tile (B, ~T/N, hidden) is recomputed in its own backward; cat's backward saves nothing.
            return torch.cat([checkpoint(self.swiglu, t, use_reentrant=False)
                              for t in x.tensor_split(tiles, dim=1)], dim=1)
        return self.swiglu(x)

    def swiglu(self, x):
        """down(silu(gate(x)) * up(x)) of x (B, T, hidden), the whole sequence or one tile of it."""
        if fused.enabled() and isinstance(self.gate_proj, fused.SharedInputLinear):  # LoRA: lora/layer.py
            gate, up = self.gate_proj.forward_shared(x, (self.gate_proj, self.up_proj))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)  # gate, up: (B, T, intermediate)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def compile(self, *args, **kwargs):
        """torch.compile this block, document_attention left out of its graph (see there)."""
        global document_attention  # wrapped here, not decorated: disable imports torch's compiler stack
        if not hasattr(document_attention, "__wrapped__"):
            document_attention = torch.compiler.disable(document_attention)
        super().compile(*args, **kwargs)

    def forward(self, x, cos, sin, mask, kv_cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig, *, grad_checkpointing: bool = False, neftune_alpha: float = 0.0,
                 offload_activations: bool = False, tile_mlp: int = 1):
        """The options change training only (model.train()), and are off by default: train.py passes
        its --grad-checkpointing, --neftune-alpha, --offload-activations and --tile-mlp here, through
        load_model or meta_model."""
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # float32 always: cos/sin are computed in float32 and only then cast to the activations'
        # dtype. Not persistent: it is derived from the config, never read from a checkpoint.
        self.register_buffer("rope_inv_freq", rope_frequencies(config), persistent=False)
        self.grad_checkpointing = grad_checkpointing  # recompute each block in backward
        self.neftune_alpha = neftune_alpha  # NEFTune noise on the input embeddings (0: none)
        self.offload_activations = offload_activations  # saved activations in host memory (model/offload.py)
        for layer in self.model.layers:
            layer.mlp.tiles = tile_mlp  # sequence tiles of each MLP in training (1: untiled)

    def tie_weights(self):
        """Make lm_head share embed_tokens' weight when the config says so (call after to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids):
        """The embedding rows of input_ids (B, T) -> (B, T, hidden_size), on input_ids' device. With the
        table in host memory (--offload-embeddings) the ids go there and the rows come back: a wait
        each way, which only generation pays (training looks the rows up as its batches are made)."""
        table = self.model.embed_tokens.weight
        if table.device == input_ids.device:
            return self.model.embed_tokens(input_ids)
        return self.model.embed_tokens(input_ids.to(table.device)).to(input_ids.device)

    def rope(self, position_ids, dtype):
        """cos and sin for positions (B, T): each (B, 1, T, head_dim), in `dtype`."""
        freqs = position_ids[..., None].float() * self.rope_inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def attention_mask(self, T, start, document_ids):
        """Boolean (B|1, 1, T, start + T) mask, True where attention is allowed; None for plain causal.

        document_ids marks packed examples (and left padding): a token sees only earlier tokens of
        its own document. It covers every key: (B, T), or (B, start + T) with a filled KV cache (the
        cached positions' documents too: batched generation's left pads, model/generate.py). Right
        padding needs no mask: causal attention already keeps real tokens from seeing the pads
        after them, and pad positions carry no loss.
        """
        S = start + T
        window = self.config.sliding_window
        use_window = window is not None and S > window
        if document_ids is None and not use_window and (start == 0 or T == 1):
            return None
        device = self.rope_inv_freq.device
        q_pos = torch.arange(start, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        mask = k_pos <= q_pos  # (T, S)
        if use_window:
            mask = mask & (k_pos > q_pos - window)
        mask = mask[None, None]  # (1, 1, T, S)
        if document_ids is not None:
            if document_ids.shape[1] != S:
                raise ValueError(f"document_ids cover {document_ids.shape[1]} positions, the keys {S}")
            same_doc = document_ids[:, start:, None] == document_ids[:, None, :]  # (B, T, S)
            mask = mask & same_doc[:, None]
        return mask

    def hidden_states(self, input_ids, position_ids=None, document_ids=None, kv_cache=None, documents=None,
                      inputs_embeds=None):
        """The final-normed hidden states (B, T, hidden_size): everything but lm_head.

        inputs_embeds (B, T, hidden_size): the rows of the embedding table for input_ids, when the
        caller looked them up already (training with the table in host memory: --offload-embeddings).

        Packed rows (document_ids) attend within their documents, by the kernel `packed_kernel`
        picks: FlashAttention's varlen kernel or one SDPA call per document, both reading
        `documents` (packed_documents(document_ids), found here when not given: on a GPU that makes
        the host wait), or SDPA with a block-diagonal mask (the CPU). The textbook path
        (fused.textbook_path) always takes the mask, into attention() written out: that twin
        holds the (B, H, T, T) scores by design.
        """
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device)[None]
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, hidden_size)
        if self.neftune_alpha and self.training:
            x = neftune_noise(x, self.neftune_alpha)
        cos, sin = self.rope(position_ids, x.dtype)
        packed = document_ids is not None and kv_cache is None and fused.enabled()
        kernel = packed_kernel(x, self.config) if packed else "mask"
        if kernel == "mask":
            mask = self.attention_mask(T, start, document_ids)
        else:  # "varlen" or "documents": no mask
            documents = documents if documents is not None else packed_documents(document_ids)
            mask = documents.to(x.device)._replace(kernel=kernel)
        offloader = self.offloader(x, cos, sin, mask)
        for i, layer in enumerate(self.model.layers):
            with offloader.block(i) if offloader else nullcontext():  # saved tensors to the host
                if self.grad_checkpointing and self.training:
                    # Non-reentrant: works although the embedding output does not require grad.
                    x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return self.model.norm(x)

    def offloader(self, x, cos, sin, mask) -> offload.Offloader | None:
        """--offload-activations, in a training forward that autograd records: the hooks that keep
        each block's saved tensors in host memory (model/offload.py), leaving on the device what
        every block shares (cos, sin, the mask) and the model's own tensors."""
        if not (self.offload_activations and self.training and torch.is_grad_enabled()):
            return None
        shared = [cos, sin, mask.cu_seqlens if isinstance(mask, PackedDocuments) else mask]
        return offload.Offloader(x.device, keep=shared, resident=[*self.parameters(), *self.buffers()])

    def forward(self, input_ids, position_ids=None, document_ids=None, kv_cache=None, documents=None):
        """input_ids (B, T) -> logits (B, T, vocab_size)."""
        return self.lm_head(self.hidden_states(input_ids, position_ids, document_ids, kv_cache, documents))
