"""Token-by-token generation with a KV cache: the prompt is run once, then one token per step."""

from collections.abc import Iterator

import torch

from .llama import KVCache, Llama


def next_token(logits, seen, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
               generator=None) -> int:
    """Pick the next token from logits (vocab,), in the order transformers applies the same knobs.

    repetition_penalty (> 1) makes every token already in `seen` (prompt and reply) less likely;
    temperature 0 is greedy; top_k keeps the k most likely tokens, top_p the smallest set whose
    probability reaches p.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(seen), device=logits.device)
        scores = logits[idx]
        logits[idx] = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort()  # ascending, as transformers does
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int, stop_ids=(), **sampling
             ) -> Iterator[int]:
    """Yield new token ids until a stop token (not yielded) or max_new_tokens."""
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, dtype, device)
    seen = set(prompt_ids)
    logits = model(torch.tensor([prompt_ids], device=device), kv_cache=cache)[0, -1]  # prefill
    for _ in range(max_new_tokens):
        token = next_token(logits, seen, **sampling)
        if token in stop_ids:
            return
        yield token
        seen.add(token)
        logits = model(torch.tensor([[token]], device=device), kv_cache=cache)[0, -1]
