"""Chat rendering and label masks agree with transformers, token for token.

For the SmolLM2 tokenizer with its own template and with the DeepSeek-LLM template: our input_ids
equal transformers' `tokenizer(apply_chat_template(messages, tokenize=False))`, and the trained
tokens, decoded run by run, are exactly each assistant reply plus its end-of-turn token, in
English and Chinese, single-turn, multi-turn and with a system prompt. A hypothesis test checks
the same on random conversations.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
from data.templates import DEEPSEEK

# deepseek-llm-7b-chat's tokenizer_config.json chat_template, as published (written out here, not
# imported from data/, so the test checks our built-in against the original).
DEEPSEEK_LLM_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def chat(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


CONVERSATIONS = {
    "single": chat(("What is the capital of France?", "Paris is the capital of France.")),
    "multi": chat(("Hi!", "Hello! How can I help?"), ("Name a colour.", "Blue."),
                  ("Another one?", "Green, like grass.\n\nOr red.")),
    "system": chat(("Tell me a joke.", "Why did the sailor bring a ladder? To reach the high seas."),
                   ("Ha.", "Glad you liked it!"), system="You are a funny pirate."),
    "chinese": chat(("你好，最近总是睡不好。", "你好，睡眠问题很常见。你一般几点睡觉？")),
    "chinese_multi_system": chat(
        ("医生，我最近压力很大。", "我理解你的感受。能说说压力主要来自哪里吗？"),
        ("工作和家庭都有。", "两方面同时有压力确实很辛苦。我们可以一件一件来谈。"),
        system="现在你是一个心理专家，请用专业的知识帮我解决问题。"),
}


@pytest.fixture(scope="module")
def hf_tok(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module", params=["model", "deepseek"])
def pair(request, smollm2_dir, hf_tok):
    """(our ChatTokenizer, transformers tokenizer) with the same template."""
    if request.param == "model":
        return data.load_tokenizer(smollm2_dir), hf_tok
    import copy
    hf = copy.deepcopy(hf_tok)
    hf.chat_template = DEEPSEEK_LLM_TEMPLATE
    return data.load_tokenizer(smollm2_dir, template="deepseek"), hf


def trained_runs(tok, ids, labels) -> list[str]:
    """The trained tokens, decoded run by run (a run: consecutive trained positions)."""
    runs, current = [], []
    for i, y in zip(ids, labels):
        if y != data.IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def expected_runs(tok, messages) -> list[str]:
    """Each reply plus its end-of-turn token; DeepSeek's prompt ends at "Assistant:", so the model
    also writes the space before the reply."""
    lead = " " if tok.template_name == "deepseek" else ""
    return [lead + m["content"] + tok.eos_token for m in messages
            if m["role"] == "assistant" and m.get("weight", 1)]


def test_deepseek_builtin_is_the_published_template():
    assert DEEPSEEK == DEEPSEEK_LLM_TEMPLATE


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_and_trained_spans_match_transformers(pair, name):
    tok, hf = pair
    messages = CONVERSATIONS[name]
    text = hf.apply_chat_template(messages, tokenize=False)
    assert tok.render(messages) == text
    [(ids, labels, unterminated)] = data.tokenize_conversations(tok, [messages])
    assert ids == hf(text)["input_ids"]
    assert trained_runs(tok, ids, labels) == expected_runs(tok, messages)
    assert unterminated == 0


@pytest.mark.parametrize("name", ["single", "chinese_multi_system"])
def test_generation_prompt_matches_transformers(pair, name):
    tok, hf = pair
    prompt = CONVERSATIONS[name][:-1]
    text = hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.render(prompt, add_generation_prompt=True) == text
    assert tok.encode_chat(prompt, add_generation_prompt=True) == hf(text)["input_ids"]


def test_builtin_templates_render_like_transformers(smollm2_dir, hf_tok):
    import copy
    for name, source in data.BUILTIN_TEMPLATES.items():
        hf = copy.deepcopy(hf_tok)
        hf.chat_template = source
        tok = data.load_tokenizer(smollm2_dir, template=name)
        for messages in CONVERSATIONS.values():
            for gen in (False, True):
                assert tok.render(messages, gen) == hf.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=gen), (name, gen)


def test_conversation_opening_with_the_assistant(smollm2_dir, hf_tok):
    """SmolLM2's template adds its default system prompt only when there are messages, so the
    prompt for an opening reply is not a prefix of the chat: the reply's own text still trains."""
    tok = data.load_tokenizer(smollm2_dir)
    messages = [{"role": "assistant", "content": "Welcome aboard!"}] + CONVERSATIONS["single"]
    [(ids, labels, _)] = data.tokenize_conversations(tok, [messages])
    assert ids == hf_tok(hf_tok.apply_chat_template(messages, tokenize=False))["input_ids"]
    assert trained_runs(tok, ids, labels) == expected_runs(tok, messages)


@pytest.mark.parametrize("mask", ["assistant", "last"])
def test_weight_zero_replies_are_context_not_trained(pair, mask):
    """OpenAI's "weight": 0 on an assistant message: rendered like any other (the ids are still
    transformers'), its tokens untrained; the other replies train exactly as before."""
    tok, hf = pair
    messages = [dict(m) for m in CONVERSATIONS["multi"]]
    messages[1]["weight"], messages[3]["weight"] = 0, 1  # the first reply is context only
    [(ids, labels, _)] = data.tokenize_conversations(tok, [messages], mask)
    assert ids == hf(hf.apply_chat_template(messages, tokenize=False))["input_ids"]
    trained = trained_runs(tok, ids, labels)
    assert trained == (expected_runs(tok, messages) if mask == "assistant" else expected_runs(tok, messages)[-1:])
    assert len(trained) == (2 if mask == "assistant" else 1) and "Hello! How can I help?" not in "".join(trained)
    messages[-1]["weight"] = 0  # --mask last: the final reply is context, so nothing of it trains
    [(_, labels, _)] = data.tokenize_conversations(tok, [messages], mask)
    assert trained_runs(tok, ids, labels) == (expected_runs(tok, messages) if mask == "assistant" else [])


def test_tokenizer_attributes(smollm2_dir):
    tok = data.load_tokenizer(smollm2_dir)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.eos_id == tok.tokenizer.token_to_id("<|im_end|>")
    assert tok.pad_id == tok.eos_id  # SmolLM2 pads with <|im_end|>: safe, labels are masked by position
    assert tok.stop_ids == {tok.eos_id}
    assert tok.decode(tok.encode("Ahoy, 世界!")) == "Ahoy, 世界!"


def test_no_double_bos(smollm2_dir, tmp_path):
    """A tokenizer whose post-processor adds BOS, with a template that writes bos_token: one BOS."""
    import json
    import shutil
    spec = json.loads((smollm2_dir / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                              "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                                   "tokens": ["<|im_start|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(smollm2_dir / "tokenizer_config.json", tmp_path)
    tok = data.load_tokenizer(tmp_path, template="deepseek")
    ids = tok.encode_chat(CONVERSATIONS["single"])
    assert ids[:2] != [tok.bos_id, tok.bos_id] and ids[0] == tok.bos_id
    assert tok.encode("hi")[0] == tok.bos_id  # plain text still gets the post-processor's BOS


# --- property: random conversations --------------------------------------------------------------

ALPHABET = list("abcxyzABC  .,!?'-\n0123") + list("你好世界。，") + ["é", "ß", "🙂"]
words = st.text(alphabet=ALPHABET, min_size=1, max_size=24)
# Replies start and end with a visible character: a reply that starts with "\n" after a prompt
# ending in "\n" can share a token with the prompt, and then no exact split exists.
reply = words.map(str.strip).filter(bool)
turns = st.lists(st.tuples(words, reply), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=turns, system=st.none() | reply, mask=st.sampled_from(["assistant", "last"]))
def test_random_conversations_train_exactly_the_replies(pair, turns, system, mask):
    tok, hf = pair
    messages = chat(*turns, system=system)
    [(ids, labels, _)] = data.tokenize_conversations(tok, [messages], mask)
    assert ids == hf(hf.apply_chat_template(messages, tokenize=False))["input_ids"]
    expected = expected_runs(tok, messages)
    assert trained_runs(tok, ids, labels) == (expected if mask == "assistant" else expected[-1:])
