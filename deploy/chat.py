"""A reply to a conversation, generated as chat.py and the demo print it: the prompt built by the
model's chat template, the text streamed as it is decoded, never ending inside a character.
"""

import time

import torch

from model.generate import generate


def reply(model, tok, messages, args, on_text=None) -> tuple[str, dict]:
    """Generate the assistant's reply to `messages`; stream text pieces to `on_text`."""
    prompt_ids = tok.encode_chat(messages, add_generation_prompt=True)
    generator = torch.Generator().manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, generator=generator)
    ids, shown = [], ""
    t0 = time.perf_counter()
    t_first = None
    for token in generate(model, prompt_ids, args.max_new_tokens, tok.stop_ids, **sampling):
        t_first = t_first or time.perf_counter()
        ids.append(token)
        text = tok.decode(ids, skip_special_tokens=True)
        if on_text and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            on_text(text[len(shown):])
            shown = text
    t_end = time.perf_counter()
    text = whole_characters(tok, ids)
    if on_text and len(text) > len(shown):
        on_text(text[len(shown):])
    t_first = t_first or t_end
    stats = {"prompt_tokens": len(prompt_ids), "new_tokens": len(ids),
             "prefill_tok_s": len(prompt_ids) / max(t_first - t0, 1e-9),
             "decode_tok_s": (len(ids) - 1) / (t_end - t_first) if len(ids) > 1 else 0.0}
    return text, stats


def whole_characters(tok, ids: list[int]) -> str:
    """The text of `ids` without a character the token budget cut in half: byte-level tokens may end
    inside a multi-byte UTF-8 character, which decodes to U+FFFD. A character spans at most 4 bytes,
    so dropping up to 3 trailing tokens finds where the last whole one ends."""
    text = tok.decode(ids, skip_special_tokens=True)
    for cut in range(1, min(3, len(ids)) + 1):
        if not text.endswith("\ufffd"):
            break
        text = tok.decode(ids[:-cut], skip_special_tokens=True)
    return text
