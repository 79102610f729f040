"""Ollama Modelfiles (deploy/ollama.py): the TEMPLATE and SYSTEM give the chat template's prompt.

What this proves:
- `render_go`, our interpreter of the Go template subset, prints what Go's own text/template prints
  (run with `go`, skipped where it is not installed) on every family template and on templates
  exercising trim markers, else-if chains, and/or/not and $ — so the checks below are Ollama's
  rendering, not our idea of it.
- For SmolLM2's real template and the built-in ChatML, Llama 3 and DeepSeek templates, Ollama's
  rendering of the Modelfile (SYSTEM put first, consecutive roles joined, the Go TEMPLATE, BOS
  added by llama.cpp where the GGUF says) equals the Jinja rendering (as chat.py tokenizes it) on
  conversations that are not the export's own probes.
- Templates that cannot be given exactly (Llama 3.1's dated system turn, Mistral's [INST], one that
  raises on a system message, none at all) get no TEMPLATE and a message saying why, and the
  Modelfile says so too; Llama 3's `| trim` is reported as a caveat.
- The Modelfile's TEMPLATE and SYSTEM survive Ollama's quoting: read back as its parser reads them.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from data.templates import BUILTIN_TEMPLATES, compile_template, render
from deploy.ollama import FAMILIES, GoTemplateError, modelfile, ollama_prompt, render_go, translate

CHATML_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
LLAMA3_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
DEEPSEEK_TOKENS = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}

# Not deploy/ollama.py's PROBES: longer, other languages, code, a system turn after the first.
CONVERSATIONS = [
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a pirate.\nSpeak like one."},
     {"role": "user", "content": "Where is the treasure?"},
     {"role": "assistant", "content": "Arr, buried deep!"},
     {"role": "user", "content": "How deep?"}],
    [{"role": "user", "content": "今天天气怎么样？"}, {"role": "assistant", "content": "晴天。"},
     {"role": "user", "content": "明天呢？"}, {"role": "assistant", "content": "下雨。"},
     {"role": "user", "content": "def f(x):\n    return {x: [1, 2]}  # {{ not a template }}"}],
    [{"role": "user", "content": "emoji 😀 and \"quotes\" and 'apostrophes'"}],
]

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def jinja_as_read(template: str, tokens: dict, messages, add_bos: bool) -> str:
    """What chat.py feeds the model, as text: the Jinja rendering, with the BOS the tokenizer's
    post-processor adds when the template wrote none (it never doubles one)."""
    text = render(compile_template(template), messages, True, tokens)
    return tokens["bos_token"] + text if add_bos and not text.startswith(tokens["bos_token"]) else text


def smollm2_template(smollm2_dir) -> str:
    return json.loads((smollm2_dir / "tokenizer_config.json").read_text())["chat_template"]


CASES = [  # (name, template source or a fixture's, tokens, add_bos, family, has a default system)
    ("smollm2", None, CHATML_TOKENS, False, "ChatML", True),
    ("chatml", BUILTIN_TEMPLATES["chatml"], CHATML_TOKENS, False, "ChatML", False),
    ("llama3", BUILTIN_TEMPLATES["llama3"], LLAMA3_TOKENS, True, "Llama 3", False),
    ("llama3-no-add-bos", BUILTIN_TEMPLATES["llama3"], LLAMA3_TOKENS, False, "Llama 3", False),
    ("deepseek", BUILTIN_TEMPLATES["deepseek"], DEEPSEEK_TOKENS, True, "DeepSeek", False),
]


@pytest.mark.parametrize("name, template, tokens, add_bos, family, has_system", CASES, ids=[c[0] for c in CASES])
def test_modelfile_prompts_as_the_chat_template(smollm2_dir, name, template, tokens, add_bos, family, has_system):
    template = template or smollm2_template(smollm2_dir)
    chat = translate(template, tokens, add_bos)
    assert chat.family == family and chat.problem is None
    assert (chat.system == SMOLLM2_SYSTEM) if name == "smollm2" else chat.system is None
    assert tokens["eos_token"] in chat.stops
    assert (chat.caveat is not None) == family.startswith("Llama 3")  # its `| trim`
    for messages in CONVERSATIONS:
        ollama = ollama_prompt(chat.template, messages, chat.system, tokens["bos_token"], add_bos)
        assert ollama == jinja_as_read(template, tokens, messages, add_bos), (name, messages)
    # The Modelfile carries exactly these, through Ollama's quoting.
    text = modelfile(Path("m.gguf"), chat)
    assert read_modelfile(text)["template"] == chat.template
    assert read_modelfile(text).get("system") == chat.system
    assert f"({family}" in text and ("default system prompt included" in text) == has_system


def test_a_wrong_family_is_not_taken(smollm2_dir):
    """One character off (no newline after the assistant's header) and the family is refused: the
    check compares whole renderings, it does not recognise a shape."""
    off = BUILTIN_TEMPLATES["chatml"].replace("<|im_start|>assistant\n", "<|im_start|>assistant")
    assert off != BUILTIN_TEMPLATES["chatml"]
    chat = translate(off, CHATML_TOKENS, False)
    assert chat.template is None and "not one Ollama can be given exactly" in chat.problem
    # SmolLM2's own template with its default system prompt dropped from SYSTEM no longer matches.
    smol = translate(smollm2_template(smollm2_dir), CHATML_TOKENS, False)
    messages = CONVERSATIONS[0]
    assert (ollama_prompt(smol.template, messages, None, "<|im_start|>", False)
            != jinja_as_read(smollm2_template(smollm2_dir), CHATML_TOKENS, messages, False))


LLAMA31_DATED = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{% if m['role'] == 'system' %}Cutting Knowledge Date: December 2023\n\n{% endif %}"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
             "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


@pytest.mark.parametrize("template, why", [
    (LLAMA31_DATED, "not one Ollama can be given exactly"),
    (MISTRAL, "not one Ollama can be given exactly"),
    (NO_SYSTEM, "fails on a plain chat (chat template: chat template failed: no system role)"),
    (None, "the model has no chat template"),
])
def test_untranslatable_templates_say_why(template, why):
    chat = translate(template, LLAMA3_TOKENS, True)
    assert chat.template is None and why in chat.problem
    text = modelfile(Path("m.gguf"), chat)
    assert "TEMPLATE" not in read_modelfile(text) and f"# No TEMPLATE: {chat.problem}" in text
    assert 'PARAMETER stop "<|eot_id|>"' in text


def test_adapter_modelfile_names_both_files(tmp_path):
    """Paths relative to the Modelfile (the adapter's), as Ollama resolves them; the comment names
    the Modelfile that holds it."""
    chat = translate(BUILTIN_TEMPLATES["chatml"], CHATML_TOKENS, False)
    lines = modelfile(tmp_path / "base" / "base.gguf", chat, adapter_path=tmp_path / "runs" / "ft.gguf").splitlines()
    assert lines[0] == "# ollama create ft -f ft.Modelfile && ollama run ft"
    assert lines[2:4] == ["FROM ./../base/base.gguf", "ADAPTER ./ft.gguf"]


def test_modelfile_samples_as_chat_py_does_by_default():
    """Ollama's defaults sample (temperature 0.8, repeat_penalty 1.1); the Modelfile sets chat.py's."""
    import chat
    defaults = chat.parse_args([])
    text = modelfile(Path("m.gguf"), translate(BUILTIN_TEMPLATES["chatml"], CHATML_TOKENS, False))
    params = dict(re.findall(r"^PARAMETER (temperature|repeat_penalty) (\S+)$", text, re.M))
    assert float(params["temperature"]) == defaults.temperature == 0
    assert float(params["repeat_penalty"]) == defaults.repetition_penalty == 1


def read_modelfile(text: str) -> dict:
    """TEMPLATE/SYSTEM/FROM values as Ollama's parser reads them: a value is its whole trimmed
    text up to the end of the line, unless it opens with \"\"\", which runs to the next \"\"\"."""
    out = {}
    for m in re.finditer(r'^(FROM|ADAPTER|TEMPLATE|SYSTEM) (?:"""(.*?)"""|([^\n]*))$', text, re.M | re.S):
        out[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3).strip()
    return out


# ----------------------------------------------------------------------------- render_go against Go

GO_TEMPLATES = [
    "{{- range .Messages }}\n  {{- .Role -}}  :  {{ .Content }}\n{{ end -}}\n\n  END",
    '{{ range .Messages }}{{ if eq .Role "user" }}U{{ else if eq .Role "assistant" }}A{{ else }}S{{ end }}'
    '[{{ .Content }}]{{ end }}',
    '{{ if and .System .Messages }}both{{ else if not .Messages }}none{{ else if or .Messages .System }}some{{ end }}'
    '{{ range .Messages }}{{ if ne .Role "system" }}{{ $.System }}|{{ .Content }}{{ end }}{{ end }}',
    '{{ if eq .System "a" "b" "" }}eq-many{{ end }}{{ eq .System "sys" }}{{ range .Messages }}{{ .Role }}{{ end }}',
] + [source.replace("{eos}", "<｜end▁of▁sentence｜>") for source, _ in FAMILIES.values()]

GO_DATA = [
    {"System": "", "Messages": []},
    {"System": "sys", "Messages": [{"Role": "system", "Content": "sys"}, {"Role": "user", "Content": " hi \n"},
                                   {"Role": "assistant", "Content": "你好"}, {"Role": "user", "Content": "x\n\ny"}]},
    {"System": "b", "Messages": [{"Role": "user", "Content": "only"}]},
]

GO_PROGRAM = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

func main() {
	var cases []struct {
		Template string
		Data     map[string]any
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var out []string
	for _, c := range cases {
		var b strings.Builder
		t := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		if err := t.Execute(&b, c.Data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt install golang-go)")
def test_render_go_matches_go_text_template(tmp_path):
    """Ollama parses TEMPLATE with text/template (option missingkey=zero) and executes it on a map
    of System and Messages (Role, Content): so does this program."""
    cases = [{"Template": t, "Data": d} for t in GO_TEMPLATES for d in GO_DATA]
    (tmp_path / "main.go").write_text(GO_PROGRAM)
    env_home = {"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "cache"), "GOPATH": str(tmp_path / "go"),
                "PATH": "/usr/bin:/bin:/usr/local/bin", "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    result = subprocess.run(["go", "run", str(tmp_path / "main.go")], input=json.dumps(cases),
                            capture_output=True, text=True, env=env_home, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = json.loads(result.stdout)
    for case, want in zip(cases, expected):
        assert render_go(case["Template"], case["Data"]) == want, case


@pytest.mark.parametrize("source", ["{{ range .Messages }}", "{{ end }}", "{{ template \"x\" }}",
                                    "{{ if .A }}x{{ else with .B }}y{{ end }}", "{{ printf \"%s\" .A }}",
                                    "{{ .A | len }}", "{{ .Messages }}"])
def test_render_go_refuses_what_it_does_not_run(source):
    with pytest.raises(GoTemplateError):
        render_go(source, {"A": "a", "Messages": []})
