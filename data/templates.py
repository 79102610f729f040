"""Chat templates: the model's own Jinja template, rendered the way transformers renders it.

A model only answers (and stops) well if it is fine-tuned on exactly the text it will be prompted
with, so we never hand-write a prompt format: the template that ships with the model (or a built-in
one chosen with `--template`) is rendered in jinja2's sandbox with the same settings, globals and
variables as transformers' `apply_chat_template`, and the tests check the output is identical.
"""

import json
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .formats import DataError

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


class ChatTemplateError(DataError, jinja2.TemplateError):
    """A chat template that does not compile, or that fails while rendering; the message names
    where it came from. Also a jinja2.TemplateError, so that data.masking, which catches those per
    record, still names the data file's line whose messages made it fail."""


class GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (used by some templates to mark replies): render
    the body unchanged. transformers uses it for return_assistant_tokens_mask; we find the replies
    from character offsets instead, so the tag only has to parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers replaces jinja's tojson, which escapes HTML characters; so must we.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def compile_template(source: str, origin: str = "chat template") -> jinja2.Template:
    """Compile a chat template in the sandbox, with transformers' options and globals.

    The template is untrusted code from a model repository: ImmutableSandboxedEnvironment keeps it
    from reaching Python internals or mutating our objects. `origin` (the file it was read from)
    names it in a ChatTemplateError.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{origin}: chat template syntax error, template line {e.lineno}: "
                                f"{e.message}") from None


def render(template: jinja2.Template, messages: list[dict], add_generation_prompt: bool,
           special_tokens: dict[str, str], origin: str = "chat template") -> str:
    """Render messages as transformers does: special tokens (bos_token, eos_token, unk_token,
    pad_token, those that are set) and `add_generation_prompt` are template variables.

    Whatever the template raises (its own raise_exception, a {{ 1/0 }}, a sandbox refusal) is a
    ChatTemplateError naming `origin`: the template is the model's code, not ours."""
    try:
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens)
    except Exception as e:
        # jinja2's own errors (raise_exception's among them) carry the template's words; for any
        # other, the exception's name says what happened ("ZeroDivisionError: division by zero").
        why = str(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {e}"
        raise ChatTemplateError(f"{origin}: chat template failed: {why}") from None
