"""The model's tokenizer and chat template, read from a Hugging Face layout directory.

Only `tokenizer.json` (the `tokenizers` library's file) is read, with `tokenizer_config.json`,
`chat_template.jinja` and `generation_config.json` for the special tokens and the template. Text
is encoded as transformers' `tokenizer(text)` encodes it (the tokenizer's own post-processor adds
whatever special tokens it adds), except that a chat whose template already starts with the BOS
token never gets a second one.
"""

import hashlib
import json
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

from .chat_template import TEMPLATE_FILE, saved_template

from .formats import DataError
from .templates import BUILTIN_TEMPLATES, compile_template, render

# The files a tokenizer is saved as (transformers' save_pretrained), copied beside each adapter as
# PEFT and TRL do, with TEMPLATE_FILE.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Tokens that end a turn in some template family. One counts as a stop token for this model when it
# is in the vocabulary and the chat template writes it (the EOS token always counts).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
                      "<|end|>", "<end_of_turn>", "<|EOT|>", "</s>", "<｜end▁of▁sentence｜>")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _config_ids(value) -> list[int]:
    """eos_token_id from config/generation_config: an int, a list of ints, or absent."""
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


class ChatTokenizer:
    """A `tokenizers.Tokenizer` with the model's special tokens and chat template.

    pad_id is the tokenizer's pad token, or EOS when it has none. Padding with EOS is harmless
    here: `collate` sets labels to -100 at pad *positions*, never by comparing ids, so the EOS that
    ends each real reply is still trained.
    """

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str], chat_template: str | None,
                 template_name: str, extra_stop_ids: list[int] = (), template_origin: str | None = None):
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens  # bos_token, eos_token, unk_token, pad_token (those set)
        self.bos_token = special_tokens.get("bos_token")
        self.eos_token = special_tokens.get("eos_token")
        self.chat_template = chat_template  # the Jinja source in use; None if the model has none
        self.template_name = template_name  # a BUILTIN_TEMPLATES name, "model", or "adapter" (its trained one)
        # Where the template came from, for its errors: the model's file, or "built-in template 'chatml'".
        self.template_origin = template_origin or f"template {template_name!r}"
        self.bos_id = self._id(self.bos_token)
        self.eos_id = self._id(self.eos_token)
        pad_id = self._id(special_tokens.get("pad_token"))
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)
        self.stop_ids = self._stop_ids(extra_stop_ids)
        self._compiled = None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def _stop_ids(self, extra: list[int]) -> set[int]:
        """EOS, the generation config's EOS ids, and end-of-turn tokens the template writes."""
        ids = {self.eos_id, *extra}
        for token in END_OF_TURN_TOKENS:
            if self.chat_template and token in self.chat_template:
                ids.add(self._id(token))
        return {i for i in ids if i is not None}

    @cached_property
    def fingerprint(self) -> str:
        """A hash of everything that decides how a conversation is tokenized (the cache key)."""
        h = hashlib.sha256(self.tokenizer.to_str().encode())
        h.update(json.dumps([self.special_tokens, self.chat_template, sorted(self.stop_ids)]).encode())
        return h.hexdigest()[:16]

    # --- text ---

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, as transformers' `tokenizer(text)["input_ids"]`."""
        return self.tokenizer.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chats ---

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, by the chat template (transformers' apply_chat_template(tokenize=False))."""
        if self.chat_template is None:
            raise DataError("the model has no chat template: pass --template "
                            + "|".join(BUILTIN_TEMPLATES))
        if self._compiled is None:
            self._compiled = compile_template(self.chat_template, self.template_origin)
        return render(self._compiled, messages, add_generation_prompt, self.special_tokens,
                      self.template_origin)

    def encode_rendered(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) of each rendered chat, encoded in one parallel batch.

        The post-processor's own BOS is dropped when the template already wrote one: no double BOS.
        """
        out = []
        for text, enc in zip(texts, self.tokenizer.encode_batch(texts)):
            ids, offsets = enc.ids, enc.offsets
            if (len(ids) > 1 and self.bos_id is not None and ids[0] == ids[1] == self.bos_id
                    and text.startswith(self.bos_token)):
                ids, offsets = ids[1:], offsets[1:]
            out.append((ids, offsets))
        return out

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of a rendered conversation (the prompt, with add_generation_prompt=True)."""
        return self.encode_rendered([self.render(messages, add_generation_prompt)])[0][0]


def _chat_template(model_dir: Path, config: dict) -> tuple[str | None, str]:
    """The model's template and the file it came from: chat_template.jinja wins over
    tokenizer_config.json, as in transformers."""
    jinja_file = model_dir / TEMPLATE_FILE
    if jinja_file.exists():
        try:
            return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        except UnicodeDecodeError as e:
            raise DataError(f"{jinja_file}: not valid UTF-8 ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template if isinstance(template, str) else None), str(model_dir / "tokenizer_config.json")


def load_tokenizer(model_dir: str | Path, template: str | None = None, adapter_dir=None) -> ChatTokenizer:
    """The tokenizer of a local model directory; `template` names a built-in template to use instead.

    adapter_dir: an adapter to be applied to the model. The template it was trained with (its
    TEMPLATE_FILE, saved by train.py) replaces the model's, unless `template` names one."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise DataError(f"{model_dir}: no tokenizer.json (nanolora reads fast-tokenizer files only)")
    if template is not None and template not in BUILTIN_TEMPLATES:
        raise DataError(f"unknown template {template!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for a file it cannot parse
        raise DataError(f"{path}: not a readable tokenizer.json ({e})") from None
    config = _read_json(model_dir / "tokenizer_config.json")
    generation = _read_json(model_dir / "generation_config.json")
    model_config = _read_json(model_dir / "config.json")
    special = {name: _token_text(config.get(name))
               for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    # A tokenizer_config without bos/eos: fall back to the ids in generation_config / config.json.
    for name in ("bos_token", "eos_token"):
        ids = _config_ids(generation.get(f"{name}_id", model_config.get(f"{name}_id")))
        if special[name] is None and ids:
            special[name] = tokenizer.id_to_token(ids[0])
    special = {k: v for k, v in special.items() if v is not None}  # unset ones stay undefined in Jinja
    trained = saved_template(adapter_dir) if adapter_dir is not None and not template else None
    if template:
        source, origin = BUILTIN_TEMPLATES[template], f"built-in template {template!r}"
    elif trained is not None:
        source, origin = trained, str(Path(adapter_dir) / TEMPLATE_FILE)
    else:
        source, origin = _chat_template(model_dir, config)
    extra_stop = _config_ids(generation.get("eos_token_id"))
    name = template or ("adapter" if trained is not None else "model")
    return ChatTokenizer(tokenizer, special, source, name, extra_stop, origin)


def template_warning(tok: ChatTokenizer, template: str | None, adapter_dir) -> str | None:
    """The warning for a --template other than the one the adapter was trained with (its
    TEMPLATE_FILE), or None: the fine-tune's replies may suffer in a format it never saw."""
    trained = saved_template(adapter_dir) if adapter_dir is not None else None
    if trained is None or not template or tok.chat_template == trained:
        return None
    return (f"warning: --template {template} is not the template the adapter was trained with "
            f"({Path(adapter_dir) / TEMPLATE_FILE}); its replies may suffer")


def tokenizer_files(model_dir: str | Path, tok: ChatTokenizer) -> dict[str, str]:
    """The files to save beside an adapter (name -> text): the model's TOKENIZER_FILES, and the
    template `tok` renders with (the model's, or the one --template chose) both as TEMPLATE_FILE and
    as tokenizer_config.json's chat_template, so that whatever reads either prompts as training did."""
    model_dir = Path(model_dir)
    files = {name: (model_dir / name).read_text(encoding="utf-8")
             for name in TOKENIZER_FILES if (model_dir / name).is_file()}
    if tok.chat_template is not None:
        config = {**_read_json(model_dir / "tokenizer_config.json"), "chat_template": tok.chat_template}
        files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        files[TEMPLATE_FILE] = tok.chat_template
    return files
