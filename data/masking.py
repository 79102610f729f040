"""Labels for a rendered conversation: train exactly the assistant's tokens and nothing else.

The spans come from the rendered text, never from searching token ids for marker strings:

    prompt_i = render(messages[:i], add_generation_prompt=True)   what the model is prompted with
    full     = render(messages)                                   what it is trained on

The model has to produce everything in full after prompt_i up to and including the end of its
turn, so for assistant message i we train

    [ len(prompt_i) ... end of the reply's content ]  +  the tokens after it, up to and including
                                                         the first end-of-turn token (stop_ids)

and map those character offsets to tokens with the tokenizer's offset mapping: a token is trained
if its characters overlap the span. With ChatML the span is exactly "reply<|im_end|>"; with
DeepSeek ("Assistant:" is the prompt) it is " reply<eos>", since the model must write the space.
(For the rare template whose prompt_i is not a prefix of full, e.g. a default system prompt that
only appears when there are messages, the span starts at the reply's content.)

A reply with "weight": 0 (OpenAI's fine-tuning format, data/formats.py) is context: it is located
like the others but not trained, under --mask assistant and last (last trains the final reply only
if its weight is not 0); --mask all trains every token regardless.

Labels align with input_ids (the Hugging Face convention: the loss shifts them by one); -100 marks
untrained positions.
"""

import jinja2

from model.loss import IGNORE_INDEX  # the one definition: what the loss skips

from .formats import TEXT_ROLE, RecordError

MASK_MODES = ("assistant", "last", "all")


def reply_spans(tok, messages: list[dict], full: str, mask: str) -> list[tuple[int, int, int]]:
    """(start, content_end, limit) character offsets in `full` of each assistant reply to train.

    start: where the generation prompt ends; content_end: where the reply's text ends; limit: where
    the next message's text starts (the reply's end-of-turn token must come before it).
    """
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mask == "last":
        replies = replies[-1:]
    spans, cursor = [], 0
    for i in replies:
        prompt = tok.render(messages[:i], add_generation_prompt=True)
        # A template may render a prompt that is not a prefix of the conversation (a default
        # system prompt only when there are messages, say): then the reply starts at its content.
        prefix = full.startswith(prompt)
        content = messages[i]["content"]
        at = full.find(content, len(prompt) if prefix else cursor)
        if at < 0:  # templates may trim the content (Llama 3's `| trim`)
            content = content.strip()
            at = full.find(content, len(prompt) if prefix else cursor)
        if at < 0:
            raise RecordError(f"the chat template does not write reply {i + 1} verbatim; "
                              "it cannot be located")
        start, end = (len(prompt) if prefix else at), at + len(content)
        cursor = end
        if messages[i].get("weight", 1) == 0:  # context only: located (the cursor moves past it), not trained
            continue
        nxt = messages[i + 1]["content"] if i + 1 < len(messages) else ""
        limit = full.find(nxt.strip(), end) if nxt.strip() else -1
        spans.append((start, end, limit if limit >= 0 else len(full)))
    return spans


def mask_labels(ids: list[int], offsets: list[tuple[int, int]], spans, stop_ids: set[int]):
    """labels for `ids`: the tokens of each span plus its end-of-turn token, -100 elsewhere.

    Returns (labels, n_unterminated): the number of replies with no end-of-turn token before the
    next message (the model would never learn to stop after those).
    """
    n = len(ids)
    labels = [IGNORE_INDEX] * n
    unterminated, j = 0, 0  # j walks the tokens once, left to right, across all spans
    for start, end, limit in spans:
        while j < n and offsets[j][1] <= start:  # tokens wholly before the reply: prompt
            j += 1
        while j < n and offsets[j][0] < end:  # tokens overlapping the reply's characters
            labels[j] = ids[j]
            j += 1
        k = j  # then up to and including the first end-of-turn token, if the turn has one
        while k < n and offsets[k][0] < limit and ids[k] not in stop_ids:
            k += 1
        if k < n and offsets[k][0] < limit:
            labels[j:k + 1] = ids[j:k + 1]
            j = k + 1
        else:
            unterminated += 1
    return labels, unterminated


def _render_one(tok, messages: list[dict], mask: str):
    """(text, spans): spans None means train every token."""
    if messages[0]["role"] == TEXT_ROLE:
        return messages[0]["content"], None
    full = tok.render(messages)
    return full, None if mask == "all" else reply_spans(tok, messages, full, mask)


def tokenize_conversations(tok, conversations: list[list[dict]], mask: str = "assistant"):
    """(input_ids, labels, n_unterminated) for each conversation, untruncated.

    Plain-text records are the tokenizer's encoding of the text followed by EOS, every token
    trained (the EOS separates documents). A bad record raises RecordError with `.index` set.
    """
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")
    texts, spans = [], []
    for n, messages in enumerate(conversations):
        try:
            text, span = _render_one(tok, messages, mask)
        except (RecordError, jinja2.TemplateError) as e:
            error = RecordError(str(e) if isinstance(e, RecordError) else f"chat template error: {e}")
            error.index = n  # the caller names the file and line
            raise error from None
        texts.append(text)
        spans.append(span)
    out = []
    for messages, span, (ids, offsets) in zip(conversations, spans, tok.encode_rendered(texts)):
        if messages[0]["role"] == TEXT_ROLE and tok.eos_id is not None:
            ids = ids + [tok.eos_id]
        if span is None:  # mask "all" or plain text: every token
            out.append((ids, list(ids), 0))
        else:
            out.append((ids, *mask_labels(ids, offsets, span, tok.stop_ids)))
    return out
