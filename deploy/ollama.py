"""Ollama Modelfiles whose TEMPLATE and SYSTEM give exactly the prompt the model's chat template does.

Ollama formats a chat with a Go template (the Modelfile's TEMPLATE), not with the model's Jinja
template. Without one it guesses a built-in template by string distance, which for SmolLM2 drops
the default system prompt the model was trained with. So the export writes the TEMPLATE itself:

    1. For each family below (ChatML, Llama 3, DeepSeek), its Go template is rendered the way
       Ollama renders a chat (the Modelfile's SYSTEM put first unless the chat has a system
       message, consecutive messages of one role joined by a blank line, then the template run over
       .Messages; llama.cpp's tokenizer then adds BOS where the GGUF says so).
    2. The model's own chat template is rendered (data/chat_template.py, as transformers does)
       for the same conversations, with the generation prompt.
    3. The default system prompt is what the Jinja rendering of a chat with no system message
       holds where the family puts a system turn.
    4. A family is used only if both renderings are equal, character for character, on every probe
       conversation; otherwise the Modelfile has no TEMPLATE, and the export says why.

The Go templates are run by `render_go`, an interpreter of the subset of Go's text/template they
use (text, {{ .Field }}, {{ range }}, {{ if }}/{{ else if }}/{{ else }}, eq/ne/not/and/or, the
{{- -}} trim markers). tests/test_ollama.py checks it against Go itself where `go` is installed.
"""

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from data.chat_template import ChatTemplateError, compile_template, render

# The Go templates. `{eos}` is replaced by the model's EOS token text before use.
FAMILIES = {
    # <|im_start|>role\ncontent<|im_end|>\n per message, then the assistant's header.
    "ChatML": ("{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n", ("<|im_end|>",)),
    # Llama 3 Instruct: header tokens around the role, <|eot_id|> after each message. BOS is
    # llama.cpp's to add (add_bos_token), not the template's.
    "Llama 3": ("{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}"
                "<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",)),
    # DeepSeek-LLM chat: "User: ...\n\n", "Assistant: ...<eos>", a system message as bare text.
    "DeepSeek": ('{{ range .Messages }}{{ if eq .Role "user" }}User: {{ .Content }}\n\n'
                 '{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}{eos}'
                 '{{ else if eq .Role "system" }}{{ .Content }}\n\n{{ end }}{{ end }}Assistant:', ()),
}

# Conversations both renderings must agree on: with and without a system message, multi-turn,
# newlines and non-ASCII inside contents. None has consecutive messages of one role (Ollama would
# join them) or a content with surrounding whitespace (see WHITESPACE_PROBE).
PROBES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Bonjour,\nça va ?"}, {"role": "assistant", "content": "Oui, merci."},
     {"role": "user", "content": "中文呢？"}],
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]
# Templates that trim contents (Llama 3's `| trim`) differ from any Go template on this one: Go's
# text/template has no trim, and Ollama adds none. Reported in the Modelfile, not a refusal.
WHITESPACE_PROBE = [{"role": "user", "content": " padded \n"}]
SYSTEM_MARK = "\x00system\x00"
# Sampling as chat.py does by default: greedy, no repetition penalty (Ollama's own defaults are
# temperature 0.8, top_k 40, top_p 0.9 and repeat_penalty 1.1, which change the replies).
# tests/test_ollama.py checks these against chat.py's flag defaults.
SAMPLING = {"temperature": 0, "repeat_penalty": 1}


@dataclass
class OllamaChat:
    """What a Modelfile needs to chat like chat.py: the Go TEMPLATE and default SYSTEM (None when
    there is none), the stop strings, and `problem` (why there is no TEMPLATE) or `caveat`."""
    family: str | None
    template: str | None
    system: str | None
    stops: list[str] = field(default_factory=list)
    problem: str | None = None
    caveat: str | None = None


def translate(chat_template: str | None, tokens: dict[str, str | None], add_bos: bool,
              origin: str = "chat template") -> OllamaChat:
    """The Ollama TEMPLATE/SYSTEM that reproduce `chat_template`'s rendering, checked on PROBES.

    tokens: bos_token/eos_token/... texts (the template's variables); add_bos: whether llama.cpp
    adds BOS when it tokenizes (the GGUF's tokenizer.ggml.add_bos_token)."""
    eos = tokens.get("eos_token")
    stops = [eos] if eos else []
    if not chat_template:
        return OllamaChat(None, None, None, stops, problem="the model has no chat template")
    special = {k: v for k, v in tokens.items() if v is not None}
    try:
        compiled = compile_template(chat_template, origin)
        jinja = lambda messages: render(compiled, messages, True, special, origin)  # noqa: E731
        expected = [jinja(m) for m in PROBES]
        whitespace = jinja(WHITESPACE_PROBE)
    except ChatTemplateError as e:
        return OllamaChat(None, None, None, stops, problem=f"its chat template fails on a plain chat ({e})")
    bos = tokens.get("bos_token") or ""
    # The template's own BOS: llama.cpp's tokenizer puts BOS first when add_bos (chat.py then drops
    # the template's as a double); otherwise the Go template must write it too, as a lead.
    leads = [""] + ([bos] if bos and not add_bos else [])
    wanted = [_as_read(e, bos, add_bos) for e in expected]
    for (name, (go_source, family_stops)), lead in itertools.product(FAMILIES.items(), leads):
        go_template = lead + go_source.replace("{eos}", eos or "")
        system = _default_system(go_template, wanted[0], bos, add_bos)
        if system is False:
            continue
        if [ollama_prompt(go_template, m, system, bos, add_bos) for m in PROBES] != wanted:
            continue
        if '"""' in go_template or (system and ('"""' in system or system.endswith('"'))):
            return OllamaChat(name, None, None, stops, problem='it holds """, which a Modelfile cannot quote')
        caveat = None
        if ollama_prompt(go_template, WHITESPACE_PROBE, system, bos, add_bos) != _as_read(whitespace, bos, add_bos):
            caveat = ("the chat template strips whitespace around each message, which Ollama's Go "
                      "template cannot: a message that starts or ends with spaces or newlines is "
                      "rendered with them")
        stops += [s for s in family_stops if s not in stops]
        return OllamaChat(name, go_template, system, stops, caveat=caveat)
    return OllamaChat(None, None, None, stops, problem=f"its chat template is not one Ollama can be given "
                      f"exactly (checked: {', '.join(FAMILIES)})")


def _as_read(text: str, bos: str, add_bos: bool) -> str:
    """`text` with the BOS llama.cpp (and the tokenizer's post-processor) put first."""
    return bos + text if add_bos and bos and not text.startswith(bos) else text


def ollama_prompt(go_template: str, messages: list[dict], system: str | None, bos: str, add_bos: bool) -> str:
    """The text Ollama hands to llama.cpp for `messages`, BOS included where llama.cpp adds it.

    Ollama's chat handler puts the Modelfile's SYSTEM first unless the chat starts with a system
    message, then joins consecutive messages of one role with a blank line and passes every system
    message's text, joined the same way, as .System (its template.Execute and collate)."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + list(messages)
    collated = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    systems = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text = render_go(go_template, {"System": systems, "Messages": collated})
    return (bos if add_bos and bos else "") + text


def _default_system(go_template: str, plain: str, bos: str, add_bos: bool) -> str | None | bool:
    """The system prompt the chat template adds to PROBES[0] (which has none; `plain` is its
    rendering as read): None if it adds none, False if the rendering does not fit this family."""
    if ollama_prompt(go_template, PROBES[0], None, bos, add_bos) == plain:
        return None
    before, _, after = ollama_prompt(go_template, PROBES[0], SYSTEM_MARK, bos, add_bos).partition(SYSTEM_MARK)
    if len(plain) > len(before) + len(after) and plain.startswith(before) and plain.endswith(after):
        return plain[len(before):len(plain) - len(after)]
    return False


def modelfile(gguf_path: Path, chat: OllamaChat, adapter_path: Path | None = None) -> str:
    """The text of modelfile_path(adapter_path or gguf_path): FROM the model's GGUF (and ADAPTER),
    TEMPLATE, SYSTEM, stops, chat.py's greedy sampling. Paths are relative to the Modelfile, as
    Ollama reads them."""
    path = modelfile_path(adapter_path or gguf_path)
    here = lambda p: "./" + Path(os.path.relpath(Path(p).resolve(), path.parent.resolve())).as_posix()  # noqa: E731
    name = path.name.removesuffix(".Modelfile")
    lines = [f"# ollama create {name} -f {path.name} && ollama run {name}"]
    if chat.template is not None:
        lines.append(f"# TEMPLATE and SYSTEM give the prompt the model's chat template gives ({chat.family}"
                     f"{', its default system prompt included' if chat.system else ''}), checked at export "
                     f"on {len(PROBES)} conversations.")
        if chat.caveat:
            lines.append(f"# Except: {chat.caveat}.")
    else:
        lines.append(f"# No TEMPLATE: {chat.problem}. Ollama will guess one from the GGUF's chat template;")
        lines.append("# write a TEMPLATE (Go template syntax) if its prompts must match the model's.")
    lines.append(f"FROM {here(gguf_path)}")
    if adapter_path is not None:
        lines.append(f"ADAPTER {here(adapter_path)}")
    if chat.template is not None:
        lines.append(f'TEMPLATE """{chat.template}"""')
    if chat.system:
        lines.append(f'SYSTEM """{chat.system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in chat.stops]
    lines.append("# Greedy, as chat.py answers by default; for Ollama's sampling instead, delete the next two lines.")
    lines += [f"PARAMETER {k} {v}" for k, v in SAMPLING.items()]
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    """Where a GGUF's Modelfile goes: beside it, named after it (one per GGUF in a folder)."""
    return gguf_path.with_name(gguf_path.name.removesuffix(".gguf") + ".Modelfile")


# ----------------------------------------------------------------------------- Go templates

class GoTemplateError(ValueError):
    """A Go template outside the subset `render_go` runs."""


_ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.S)
_ARG = re.compile(r'"(?:[^"\\]|\\.)*"|\$?\.[A-Za-z_][A-Za-z0-9_]*|\.|[a-z]+')


def render_go(source: str, data: dict) -> str:
    """Run a Go text/template (the subset described in this module's docstring) on `data`."""
    tokens, pos, trim_next = [], 0, False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        tokens += [("text", text), ("action", m.group(2).strip())]
        pos, trim_next = m.end(), bool(m.group(3))
    tail = source[pos:]
    tokens.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    if "{{" in "".join(t for kind, t in tokens if kind == "text"):
        raise GoTemplateError("unparsed {{ in the template")
    body, rest = _parse(tokens, 0, ())
    if rest != len(tokens):
        raise GoTemplateError(f"unexpected {{{{ {tokens[rest][1]} }}}}")
    out = []
    _run(body, data, data, out)
    return "".join(out)


def _parse(tokens, i, until):
    """Nodes from tokens[i:] up to an action starting with one of `until`; (nodes, index)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
            continue
        word = value.split(" ", 1)[0]
        if word in until:
            return nodes, i
        if word in ("if", "range"):
            branches, i = [], i
            cond = value[len(word):].strip()
            while True:
                body, i = _parse(tokens, i + 1, ("else", "end"))
                if i == len(tokens):
                    raise GoTemplateError(f"{{{{ {word} }}}} without {{{{ end }}}}")
                branches.append((cond, body))
                action = tokens[i][1]
                if action == "end":
                    break
                if word == "range" or not (action == "else" or action.startswith("else if ")):
                    raise GoTemplateError(f"unsupported {{{{ {action} }}}}")
                cond = action[len("else if "):].strip() if action != "else" else None
            nodes.append((word, branches))
            i += 1
        elif word in ("else", "end"):
            raise GoTemplateError(f"{{{{ {value} }}}} without if or range")
        else:
            nodes.append(("print", value))
            i += 1
    return nodes, i


def _run(nodes, dot, root, out):
    for kind, value in nodes:
        if kind == "text":
            out.append(value)
        elif kind == "print":
            v = _eval(value, dot, root)
            if isinstance(v, (dict, list)):
                raise GoTemplateError(f"{{{{ {value} }}}} prints a collection (Go's own format)")
            out.append("<no value>" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
        elif kind == "range":
            (cond, body), = value
            for item in _eval(cond, dot, root) or []:
                _run(body, item, root, out)
        else:  # if / else if / else
            for cond, body in value:
                if cond is None or bool(_eval(cond, dot, root)):  # Go: false, 0, "", nil, empty are false
                    _run(body, dot, root, out)
                    break


def _eval(pipeline: str, dot, root):
    args = _ARG.findall(pipeline)
    if "".join(args) != pipeline.replace(" ", ""):
        raise GoTemplateError(f"unsupported pipeline {pipeline!r}")
    values = [_value(a, dot, root) for a in args[1:]]
    fn = args[0]
    if fn in ("eq", "ne", "and", "or", "not"):
        if fn == "eq":
            return any(values[0] == v for v in values[1:])
        if fn == "ne":
            return values[0] != values[1]
        if fn == "not":
            return not values[0]
        pick = (lambda v: not v) if fn == "and" else bool  # the first false (and) or true (or) value
        return next((v for v in values if pick(v)), values[-1])
    if len(args) != 1:
        raise GoTemplateError(f"unsupported pipeline {pipeline!r}")
    return _value(fn, dot, root)


def _value(arg: str, dot, root):
    if arg.startswith('"'):
        if "\\" in arg:
            raise GoTemplateError(f"unsupported escape in {arg}")
        return arg[1:-1]
    if arg == ".":
        return dot
    if arg.startswith("$."):
        return root.get(arg[2:])
    if arg.startswith("."):
        return dot.get(arg[1:]) if isinstance(dot, dict) else None
    raise GoTemplateError(f"unsupported function {arg!r}")
