"""Token-by-token generation with a KV cache: the prompt is run once, then one token per step.

`generate` answers one prompt (chat.py). `sample_completions` samples, for GRPO (Shao et al. 2024,
DeepSeekMath section 4.1), a group of G completions of each of P prompts, all B = P * G rows in one
batch, and returns each sampled token's log-probability, which the loss's ratio needs:

    row  0  [pad pad  p0 p0 p0 | c c c EOS pad pad]   prompt 0, completion 0
    row  1  [pad pad  p0 p0 p0 | c c c c   c   c  ]   prompt 0, completion 1 (max_new_tokens)
    row  2  [p1  p1   p1 p1 p1 | c EOS pad pad pad]   prompt 1, completion 0 ...

Prompts of different lengths are left-padded, so that every row's next token is at the same
column. A row then computes what it would alone: its pads are a document of their own
(document_ids 0, the real tokens 1: `Llama.attention_mask` keeps a token to its own document, at
prefill and, the cache holding the pads, at every decoding step), and its position ids start at 0
at its first real token. A row that has stopped is fed a pad until every row has stopped; what it
computes then is never returned. The cost of the pads: a (B, 1, T, S) boolean mask at every
forward, which on CUDA keeps SDPA off its flash kernel (the prefill's (B, H, T, T) scores may then
exist: short prompts, as GRPO's are, make that small).
"""

from collections.abc import Iterator
from typing import NamedTuple

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


class Completion(NamedTuple):
    """One sampled completion of prompts[prompt_index]."""
    prompt_index: int
    token_ids: list[int]  # the new tokens, the stop token included when it came (stopped)
    logps: torch.Tensor  # (len(token_ids),) float32: log p of each, as sampled (sample_rows)
    stopped: bool  # True: ended by a stop token; False: cut at max_new_tokens


@torch.no_grad()
def sample_completions(model: Llama, prompts: list[list[int]], group_size: int, max_new_tokens: int,
                       stop_ids=(), *, temperature: float = 1.0, top_p: float = 1.0,
                       generator: torch.Generator | list[torch.Generator] | None = None) -> list[Completion]:
    """Sample `group_size` completions of each prompt, all in one batch with the KV cache (the
    module's docstring draws it): prompt 0's group first, then prompt 1's, ...

    The model runs in eval mode (no dropout; its mode is restored after), the adapter as it is set.
    Each row ends at its first stop token, which it keeps (the end of turn the policy learns to
    emit), or after max_new_tokens; decoding ends once every row has. Sampling is `next_token`'s
    (temperature, then top_p), drawn on the CPU from `generator` (sample_rows), or from
    generator[i] for prompt i's group when it is a list of len(prompts): a group's draws then do
    not depend on the other prompts of the batch (GRPO's ranks each sample a share of a step's
    prompts). Temperature 0 is greedy and draws nothing. logps are on the model's device.
    """
    if group_size < 1 or max_new_tokens < 1 or not prompts or not all(prompts):
        raise ValueError("sample_completions needs prompts, none empty, group_size >= 1 and "
                         "max_new_tokens >= 1")
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
        raise ValueError(f"sample_completions: {len(generator)} generators for {len(prompts)} prompts")
    device = model.lm_head.weight.device
    rows = [prompt for prompt in prompts for _ in range(group_size)]  # (B,) prompt 0's group first
    ids, position_ids, document_ids = left_pad(rows, max_new_tokens, device)
    B, width = ids.shape
    cache = KVCache(model.config, B, width + max_new_tokens, model.model.embed_tokens.weight.dtype, device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)  # rows that met a stop token; on the CPU, as the tokens are
    lengths = torch.zeros(B, dtype=torch.long)  # tokens each row keeps: those up to its stop
    tokens, logps = [], []  # per step: (B,) tokens on the CPU, (B,) logps on the device
    was_training = model.training
    model.eval()
    try:
        hidden = model.hidden_states(ids, position_ids, document_ids[:, :width], cache)  # prefill
        logits = model.lm_head(hidden[:, -1])  # (B, vocab): each row's last prompt token predicts
        for step in range(max_new_tokens):
            token, logp = sample_rows(logits, temperature, top_p, generator)
            tokens.append(token)
            logps.append(logp)
            lengths += ~done
            done |= torch.isin(token, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            feed = token.masked_fill(done, 0).to(device)[:, None]  # (B, 1): a pad once a row is done
            position = position_ids[:, -1:] + step + 1  # (B, 1): the token after the prompt's last, then on
            logits = model(feed, position, document_ids[:, :cache.length + 1], cache)[:, -1]
    finally:
        model.train(was_training)
    tokens, logps = torch.stack(tokens, 1), torch.stack(logps, 1)  # (B, steps)
    return [Completion(b // group_size, tokens[b, :n].tolist(), logps[b, :n], bool(done[b]))
            for b, n in enumerate(lengths.tolist())]


def left_pad(rows: list[list[int]], max_new_tokens: int, device):
    """The prompts right-aligned: input_ids (B, width), pads 0; position_ids (B, width), 0 at each
    row's first real token (the pads' clamped to 0: they see only pads); document_ids (B, width +
    max_new_tokens), 0 for a pad and 1 for every real and new token, so that its first S columns
    cover the S positions of the KV cache (`Llama.attention_mask`)."""
    width = max(len(r) for r in rows)
    pads = torch.tensor([width - len(r) for r in rows], device=device)[:, None]  # (B, 1)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
    columns = torch.arange(width + max_new_tokens, device=device)[None]  # (1, width + max_new_tokens)
    position_ids = (columns[:, :width] - pads).clamp(min=0)
    return ids, position_ids, (columns >= pads).long()


def sample_rows(logits, temperature: float, top_p: float, generator=None):
    """`next_token` for each row of logits (B, vocab) at once (temperature, then top_p, with its
    semantics and order; no top_k or repetition penalty) -> tokens (B,) on the CPU, and logps (B,)
    float32 on the logits' device.

    logps is log softmax(logits / temperature) of the token (temperature 1 when greedy): the
    policy's tempered distribution, taken before top_p truncates it. GRPO's ratio compares the
    policy now with the policy that sampled, and the trained model's log-probs are computed the same
    way, over the whole vocabulary; TRL's GRPOTrainer likewise computes its per-token log-probs on
    logits / temperature, untruncated.

    The draw is made on the CPU: the (B, vocab) probabilities are copied there and
    torch.multinomial draws from `generator` (a CPU generator; None: torch's default one; a list
    of k: the rows cut into k equal groups, each drawn from its own), so the draws do not depend
    on the model's device, and a run that seeds the generators alike samples alike. The copy makes the host wait for the device once a
    token, which decoding pays anyway to see whether every row has stopped. Greedy (temperature 0)
    takes the argmax and draws nothing.
    """
    logits = logits.float()
    if temperature <= 0:
        token = logits.argmax(-1)
        return token.cpu(), logits.log_softmax(-1).gather(-1, token[:, None])[:, 0]
    logits = logits / temperature
    logps = logits.log_softmax(-1)  # (B, vocab), before top_p
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1)  # ascending, as transformers does
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1).cpu()
    if isinstance(generator, (list, tuple)):  # each group of rows from its own generator
        groups = probs.split(probs.shape[0] // len(generator))
        token = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(groups, generator, strict=True)])[:, 0]
    else:
        token = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return token, logps.gather(-1, token.to(logps.device)[:, None])[:, 0]

