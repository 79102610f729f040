"""The model's chat template (its own Jinja code, from tokenizer_config.json, chat_template.jinja or
a GGUF's tokenizer.chat_template), compiled in a sandbox and rendered exactly as transformers'
`apply_chat_template` renders it.

data/ renders it to build training text; deploy/ollama.py renders it to translate it into Ollama's
Go template. The template is untrusted code from a model repository, hence the sandbox.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"  # transformers' file for the template (it wins over tokenizer_config.json)


class ChatTemplateError(UserError, ValueError, jinja2.TemplateError):
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


def saved_template(directory) -> str | None:
    """The chat template a directory carries as TEMPLATE_FILE, or None. An adapter saved by train.py
    carries the template its run rendered with (a --template one included), so that merge.py,
    chat.py and the GGUF export prompt the fine-tune as it was trained; a PEFT adapter from
    elsewhere usually has none, and the base's template applies."""
    path = Path(directory) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChatTemplateError(f"{path}: not valid UTF-8 ({e})") from None


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
