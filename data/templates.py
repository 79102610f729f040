"""Chat templates: the model's own Jinja template, rendered the way transformers renders it.

A model only answers (and stops) well if it is fine-tuned on exactly the text it will be prompted
with, so we never hand-write a prompt format: the template that ships with the model (or a built-in
one chosen with `--template`) is rendered in jinja2's sandbox with the same settings, globals and
variables as transformers' `apply_chat_template` (data/chat_template.py, which the GGUF export
shares), and the tests check the output is identical.
"""

from .chat_template import ChatTemplateError, compile_template, render  # noqa: F401 (re-exported)

# ChatML (Qwen, SmolLM2, ...): every message is <|im_start|>role\ncontent<|im_end|>\n.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 Instruct: header tokens around the role, content trimmed, <|eot_id|> ends each turn.
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# DeepSeek-LLM chat (deepseek-llm-7b-chat's tokenizer_config.json, verbatim): bos, then system
# text + "\n\n", "User: " + content + "\n\n", "Assistant: " + content + eos. The generation
# prompt is "Assistant:" with no space, so the reply's first token carries the space.
DEEPSEEK = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "deepseek": DEEPSEEK}
