"""Bad input to merge.py, chat.py, `python -m data.inspect` and `python -m deploy.gguf` is one line
`PROG: error: ...` naming the culprit and exit code 2, never a traceback, and it changes nothing.

Every case uses real files: a checkpoint cut in half, a garbage tokenizer.json, chat templates that
raise ({{ 1/0 }}, raise_exception) or do not compile, an adapter holding NaN, a base that fits fp16
alone but overflows once merged, a Modelfile or a GGUF already where an export would write, and a
disk that fills up mid-write (the lowest-level write mocked to leave part of a file, then fail with
ENOSPC or with safetensors' own SafetensorError). Each case asserts the exit code, no "Traceback",
one error line naming the file, tensor key or flag, and that the directory holding its inputs and
outputs is file for file, byte for byte and mtime for mtime what it was: the output never appears,
no temporary file is left, nothing is replaced.

The entry points run in-process (`main(argv)`, stderr read with capsys), since a Python process
costs seconds of torch import: a traceback there is an exception escaping `main`, which fails the
test by itself. Real processes only where a process is the point: chat.py started with its stdin
closed (`<&-`), and Ctrl-C (SIGINT) at its prompt (exit 130). A corrupt tokenization cache is not
an error at all: it is deleted, rebuilt and rewritten.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Callable

import gguf
import pytest
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import chat
import data
import lora
import merge
import model.files
import deploy.gguf
import model.gguf
from conftest import ROOT, save_tiny_hf
from data.inspect import main as inspect_main
from data.templates import BUILTIN_TEMPLATES
from model.load import load_model
from test_lora import randomize_lora

VOCAB = 260  # 256 byte tokens, <|im_start|> = 256, <|im_end|> = 257, and room to spare
TARGET = "model.layers.0.self_attn.q_proj"  # an adapted module
FP16_MAX = 65504.0  # and a float32 rounds to fp16's inf from 65520 up
PROMPT = ["--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"]


def write_tokenizer(model_dir: Path):
    """A byte-level BPE tokenizer.json (the 256 byte tokens, no merges, ChatML's two special
    tokens) and a tokenizer_config.json with ChatML: the smallest a chat model and GGUF export take."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(model_dir / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "chat_template": BUILTIN_TEMPLATES["chatml"]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    """model/ (a tiny chat model), adapter/ (a non-zero LoRA adapter for it) and chats.jsonl,
    built once; each test works on its own copy."""
    root = tmp_path_factory.mktemp("originals")
    model_dir = save_tiny_hf(root / "model", vocab_size=VOCAB, tie_word_embeddings=True,
                             bos_token_id=None, eos_token_id=257)
    write_tokenizer(model_dir)
    tiny = load_model(model_dir)
    cfg = lora.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
    lora.inject_lora(tiny, cfg)
    randomize_lora(tiny, std=0.5)  # B @ A of order 1: enough to push a weight past fp16's range
    lora.save_adapter(tiny, cfg, root / "adapter", str(model_dir))
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ahoy"}]}]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root


@pytest.fixture
def d(originals, tmp_path) -> Path:
    shutil.copytree(originals, tmp_path, dirs_exist_ok=True)
    return tmp_path


def snapshot(root: Path) -> dict:
    """Every file and folder under root: (bytes, mtime) of files, None for folders."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------- damage, for real

def cut_in_half(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_tensor(path: Path, key: str, change: Callable):
    """Rewrite one tensor of a safetensors file, metadata kept (a real file, as a diverged run or a
    hand edit leaves it)."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, path, metadata=metadata)


def with_nan(t):
    t[0, 0] = float("nan")
    return t


def fills_disk(error: Exception):
    """A stand-in for safetensors' save_file: part of the file reaches the disk, then it is full."""
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 4096)
        raise error
    return save_file


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
SAFETENSORS_ENOSPC = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def gguf_disk_full(writer, *args, **kwargs):
    """GGUFWriter.write_tensors_to_file on a disk that fills up after the header and a few bytes."""
    writer.fout[0].write(b"\0" * 4096)
    raise OSError(errno.ENOSPC, "No space left on device")


# ----------------------------------------------------------------------------- setups
# Each takes the test's directory, damages or fills it, and returns (argv, what the error line
# must name).

def merge_argv(d, *more):
    return ["--base", d / "model", "--adapter", d / "adapter", "--output", d / "out", *more]


def truncated_base_merge(d):
    cut_in_half(d / "model" / "model.safetensors")
    return merge_argv(d), [f"{d / 'model' / 'model.safetensors'}: not a readable safetensors file"]


def truncated_base_chat(d):
    cut_in_half(d / "model" / "model.safetensors")
    return ["--model", d / "model", *PROMPT], [f"{d / 'model' / 'model.safetensors'}: not a readable"]


def nan_adapter(d):
    key = f"base_model.model.{TARGET}.lora_B.weight"
    overwrite_tensor(d / "adapter" / "adapter_model.safetensors", key, with_nan)
    return merge_argv(d), [str(d / "adapter" / "adapter_model.safetensors"), key, "NaN"]


def overflows_fp16_once_merged(d):
    """One q_proj weight just inside fp16's range, where the adapter's update pushes it out."""
    A, B = (load_file(d / "adapter" / "adapter_model.safetensors")[f"base_model.model.{TARGET}.lora_{x}.weight"]
            for x in "AB")
    delta = 2.0 * (B @ A)  # scaling = alpha / r
    i, j = divmod(int(delta.abs().argmax()), delta.shape[1])
    sign, size = delta[i, j].sign(), delta[i, j].abs()
    assert size > 0.1
    weight = sign * (65520 - size / 2)  # alone it rounds to fp16's max; merged, to inf

    def edge(w):
        w[i, j] = weight
        return w
    overwrite_tensor(d / "model" / "model.safetensors", f"{TARGET}.weight", edge)
    assert weight.half().abs() == FP16_MAX and (weight + delta[i, j]).half().isinf()
    return merge_argv(d, "--dtype", "fp16"), [f"tensor {TARGET}.weight", "float16"]


def merge_disk_full(d):
    return merge_argv(d), [f"--output {d / 'out'}: not written", "No space left on device"]


def merge_disk_full_safetensors(d):
    return merge_argv(d), [f"--output {d / 'out'}: not written", "No space left on device"]


def merge_modelfile_exists(d):
    (d / "m.Modelfile").write_text("FROM ./mine.gguf\n")
    return merge_argv(d, "--gguf", d / "m.gguf"), [f"{d / 'm.Modelfile'} already exists"]


def export_argv(d, *more):
    return ["export", d / "model", d / "m.gguf", *more]


def export_gguf_exists(d):
    (d / "m.gguf").write_bytes(b"my other model")
    return export_argv(d), [f"{d / 'm.gguf'}: already exists", "--overwrite"]


def export_target_is_a_directory(d):
    (d / "m.gguf").mkdir()
    (d / "m.gguf" / "keep.txt").write_text("mine")
    return export_argv(d, "--overwrite"), [f"{d / 'm.gguf'}: is a directory"]


def export_modelfile_exists(d):
    (d / "m.Modelfile").write_text("FROM ./mine.gguf\n")
    return export_argv(d), [f"{d / 'm.Modelfile'}: already exists"]


def export_disk_full(d):
    return export_argv(d), [f"{d / 'm.gguf'}: not written", "No space left on device"]


def import_disk_full(d):
    deploy.gguf.export_gguf(d / "model", d / "m.gguf")  # the GGUF to import, written for real
    return ["import", d / "m.gguf", d / "imported"], [f"{d / 'imported'}: not written", "No space left"]


def garbage_tokenizer(d):
    (d / "model" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": [')
    return ["--model", d / "model", *PROMPT], [f"{d / 'model' / 'tokenizer.json'}: not a readable tokenizer.json"]


def garbage_tokenizer_export(d):
    garbage_tokenizer(d)
    return export_argv(d), [f"{d / 'model' / 'tokenizer.json'}: not a readable tokenizer.json"]


def template_divides_by_zero(d):
    (d / "model" / "chat_template.jinja").write_text("{{ 1/0 }}")
    return ["--model", d / "model", *PROMPT], [f"{d / 'model' / 'chat_template.jinja'}: chat template failed",
                                               "ZeroDivisionError"]


def template_does_not_compile(d):
    (d / "model" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}")
    return ["--model", d / "model", *PROMPT], [f"{d / 'model' / 'chat_template.jinja'}: chat template syntax error"]


def template_raises_exception(d):
    config = d / "model" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "chat_template": "{{ raise_exception('Roles must alternate') }}"}))
    return (["--model", d / "model", "--data", d / "chats.jsonl"],
            [f"{d / 'chats.jsonl'}:1:", f"{config}: chat template failed: Roles must alternate"])


def chat_argv(d):
    return ["--model", d / "model", "--device", "cpu", "--max-new-tokens", "2"]


def stdin_none(d):
    return chat_argv(d), ["stdin is closed", "--prompt"]


def stdin_closed_file(d):
    return chat_argv(d), ["stdin is closed", "--prompt"]


def stdin_at_eof(d):
    return chat_argv(d), []


def closed_stdin():
    f = StringIO("hi\n")
    f.close()
    return f


def chat_flag(flag, value, wanted):
    """chat.py with one number out of range: argparse names the flag, before the model loads."""
    return lambda d: (["--model", d / "model", *PROMPT, flag, value], [f"argument {flag}: {wanted}"])


def edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def adapter_field(key, value, wanted):
    """An adapter_config.json field of the wrong type or range (a hand edit): one line naming it."""
    def setup(d):
        edit_json(d / "adapter" / "adapter_config.json", **{key: value})
        return merge_argv(d), [f"{d / 'adapter' / 'adapter_config.json'}: {key} = {json.dumps(value)}: {wanted}"]
    return setup


def config_field(key, value, wanted):
    """A config.json field of the wrong type or range: one line naming the file and key."""
    def setup(d):
        edit_json(d / "model" / "config.json", **{key: value})
        return ["--model", d / "model", *PROMPT], [f"{d / 'model' / 'config.json'}: {key} = {json.dumps(value)}: {wanted}"]
    return setup


def adapter_as_model(d):
    return ["--model", d / "adapter", *PROMPT], [f"{d / 'adapter'}: a LoRA adapter, not a model",
                                                 "/model) as the model and this as --adapter", "merge.py"]


def adapter_as_base(d):
    return ["--base", d / "adapter", "--adapter", d / "adapter", "--output", d / "out"], [
        f"{d / 'adapter'}: a LoRA adapter, not a model"]


def run_dir_as_model(d):
    (d / "run").mkdir()
    shutil.move(d / "adapter", d / "run" / "adapter")
    (d / "run" / "run_config.json").write_text(json.dumps({"model": str(d / "model")}))
    return ["--model", d / "run", *PROMPT], [f"{d / 'run'}: a training run's directory, not a model",
                                             f"pass its base ({d / 'model'}) as the model and this as --adapter (chat.py; train.py --eval-only"]


@dataclass
class Case:
    id: str
    prog: str  # the entry point, as its error line names it
    setup: Callable  # (test dir) -> (argv, strings the error line must hold)
    patch: Callable | None = None  # (monkeypatch) -> None: the fault a real file cannot give
    code: int = 2


CASES = [
    Case("merge-base-cut-in-half", "merge.py", truncated_base_merge),
    Case("merge-nan-in-adapter", "merge.py", nan_adapter),
    Case("merge-fp16-overflow-once-merged", "merge.py", overflows_fp16_once_merged),
    Case("merge-disk-full-oserror", "merge.py", merge_disk_full,
         lambda mp: mp.setattr(model.files, "save_file", fills_disk(ENOSPC))),
    Case("merge-disk-full-safetensorerror", "merge.py", merge_disk_full_safetensors,
         lambda mp: mp.setattr(model.files, "save_file", fills_disk(SAFETENSORS_ENOSPC))),
    Case("merge-gguf-modelfile-exists", "merge.py", merge_modelfile_exists),
    Case("export-gguf-exists", "python -m deploy.gguf", export_gguf_exists),
    Case("export-target-is-a-directory", "python -m deploy.gguf", export_target_is_a_directory),
    Case("export-modelfile-exists", "python -m deploy.gguf", export_modelfile_exists),
    Case("export-disk-full", "python -m deploy.gguf", export_disk_full,
         lambda mp: mp.setattr(gguf.GGUFWriter, "write_tensors_to_file", gguf_disk_full)),
    Case("export-garbage-tokenizer", "python -m deploy.gguf", garbage_tokenizer_export),
    Case("import-disk-full", "python -m deploy.gguf", import_disk_full,
         lambda mp: mp.setattr(model.files, "save_file", fills_disk(SAFETENSORS_ENOSPC))),
    Case("chat-base-cut-in-half", "chat.py", truncated_base_chat),
    Case("chat-garbage-tokenizer", "chat.py", garbage_tokenizer),
    Case("chat-template-divides-by-zero", "chat.py", template_divides_by_zero),
    Case("chat-template-syntax-error", "chat.py", template_does_not_compile),
    Case("inspect-template-raise-exception", "python -m data.inspect", template_raises_exception),
    Case("chat-stdin-none", "chat.py", stdin_none, lambda mp: mp.setattr(sys, "stdin", None)),
    Case("chat-stdin-closed-file", "chat.py", stdin_closed_file, lambda mp: mp.setattr(sys, "stdin", closed_stdin())),
    Case("chat-stdin-eof-is-a-normal-end", "chat.py", stdin_at_eof, lambda mp: mp.setattr(sys, "stdin", StringIO("")),
         code=0),
    # every number a flag takes is checked before any work (argparse names the flag)
    Case("chat-max-new-tokens-negative", "chat.py", chat_flag("--max-new-tokens", "-3", "expected an integer >= 1")),
    Case("chat-temperature-negative", "chat.py", chat_flag("--temperature", "-0.5", "expected a number in [0, inf)")),
    Case("chat-top-k-negative", "chat.py", chat_flag("--top-k", "-1", "expected an integer >= 0")),
    Case("chat-top-p-zero", "chat.py", chat_flag("--top-p", "0", "expected a number in (0, 1]")),
    Case("chat-top-p-above-one", "chat.py", chat_flag("--top-p", "1.5", "expected a number in (0, 1]")),
    Case("chat-repetition-penalty-zero", "chat.py", chat_flag("--repetition-penalty", "0", "expected a number in (0, inf)")),
    Case("chat-seed-not-an-integer", "chat.py", chat_flag("--seed", "1.5", "expected an integer")),
    Case("merge-max-shard-size-infinite", "merge.py",
         lambda d: (merge_argv(d, "--max-shard-size", "infGB"), ["argument --max-shard-size: not a size"])),
    Case("inspect-n-negative", "python -m data.inspect",
         lambda d: (["--model", d / "model", "--data", d / "chats.jsonl", "--n", "-1"],
                    ["argument --n: expected an integer >= 0"])),
    # and every field read from a file
    Case("adapter-config-r-a-string", "merge.py", adapter_field("r", "8", "expected a positive integer")),
    Case("adapter-config-r-negative", "merge.py", adapter_field("r", -4, "expected a positive integer")),
    Case("adapter-config-alpha-a-string", "merge.py", adapter_field("lora_alpha", "16", "expected a number")),
    Case("adapter-config-use-dora-a-string", "merge.py", adapter_field("use_dora", "false", "expected true or false")),
    Case("config-hidden-size-a-string", "chat.py", config_field("hidden_size", "64", "expected a positive integer")),
    Case("config-num-layers-negative", "chat.py", config_field("num_hidden_layers", -1, "expected a positive integer")),
    Case("config-rms-norm-eps-a-string", "chat.py", config_field("rms_norm_eps", "1e-6", "expected a positive number")),
    # an adapter or a run's directory where a model belongs
    Case("chat-adapter-as-model", "chat.py", adapter_as_model),
    Case("merge-adapter-as-base", "merge.py", adapter_as_base),
    Case("chat-run-dir-as-model", "chat.py", run_dir_as_model),
]
MAINS = {"merge.py": merge.main, "chat.py": chat.main, "python -m deploy.gguf": deploy.gguf.main,
         "python -m data.inspect": inspect_main}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, d, capsys, monkeypatch):
    argv, culprits = case.setup(d)
    if case.patch:
        case.patch(monkeypatch)
    before = snapshot(d)
    capsys.readouterr()
    try:
        code = MAINS[case.prog]([str(a) for a in argv])
    except SystemExit as e:  # argparse's refusal of a flag
        code = e.code
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\n{case.id}: exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    assert code == case.code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    if case.code == 0:
        assert errors == []
    else:
        assert len(errors) == 1 and errors[0].startswith(f"{case.prog}: error: "), err
        assert err.rstrip().endswith(errors[0])  # the last word
        for culprit in culprits:
            assert culprit in errors[0]
    assert snapshot(d) == before


def test_export_overwrite_replaces_only_the_gguf_and_modelfile(d, capsys):
    (d / "m.gguf").write_bytes(b"my other model")
    (d / "m.Modelfile").write_text("FROM ./mine.gguf\n")
    (d / "other.Modelfile").write_text("FROM ./other.gguf\n")  # another export's, in the same folder
    (d / "notes.txt").write_text("mine")
    assert deploy.gguf.main([str(a) for a in export_argv(d, "--overwrite")]) == 0, capsys.readouterr().err
    assert (d / "m.gguf").read_bytes()[:4] == b"GGUF" and "FROM ./m.gguf" in (d / "m.Modelfile").read_text()
    assert (d / "notes.txt").read_text() == "mine" and (d / "other.Modelfile").read_text() == "FROM ./other.gguf\n"
    assert sorted(p.name for p in d.iterdir()) == ["adapter", "chats.jsonl", "m.Modelfile", "m.gguf", "model",
                                                   "notes.txt", "other.Modelfile"]


def test_adapter_save_on_a_full_disk_names_the_file(d, monkeypatch):
    tiny = load_model(d / "model")
    cfg = lora.LoRAConfig(r=2, targets=["q_proj"])
    lora.inject_lora(tiny, cfg)
    monkeypatch.setattr(model.files, "save_file", fills_disk(ENOSPC))
    before = snapshot(d)
    with pytest.raises(lora.LoRAError, match=r"new-adapter/adapter_model\.safetensors: adapter not saved "
                                             r"\(No space left on device"):
        lora.save_adapter(tiny, cfg, d / "new-adapter")
    assert snapshot(d) == before  # no new-adapter, no temporary directory


def test_safetensors_files_get_the_mode_of_their_neighbours(d, capsys):
    """safetensors' save_file creates its files 0600: each one nanolora writes (adapter, merged
    shards, a GGUF import, the tokenization cache) gets the mode of a plain file written beside it."""
    umask = os.umask(0o022)
    try:
        tiny = load_model(d / "model")
        cfg = lora.LoRAConfig(r=2, targets=["q_proj"])
        lora.inject_lora(tiny, cfg)
        lora.save_adapter(tiny, cfg, d / "new-adapter")
        assert merge.main([str(a) for a in merge_argv(d)]) == 0, capsys.readouterr().err
        deploy.gguf.export_gguf(d / "model", d / "m.gguf")
        assert deploy.gguf.main(["import", str(d / "m.gguf"), str(d / "imported")]) == 0
        data.tokenize_file(d / "chats.jsonl", data.load_tokenizer(d / "model"), 64, cache_dir=d / "cache")
        (d / "cache" / "plain.txt").write_text("beside the cache")
    finally:
        os.umask(umask)
    mode = lambda p: oct(p.stat().st_mode & 0o777)
    written = {d / "new-adapter" / "adapter_model.safetensors": d / "new-adapter" / "adapter_config.json",
               **{shard: d / "out" / "config.json" for shard in (d / "out").glob("*.safetensors")},
               d / "imported" / "model.safetensors": d / "imported" / "config.json",
               **{f: d / "cache" / "plain.txt" for f in (d / "cache").iterdir() if f.name != "plain.txt"}}
    assert len(written) >= 4 and mode(d / "out" / "config.json") == "0o644"
    assert {str(f): mode(f) for f in written} == {str(f): mode(plain) for f, plain in written.items()}


# ----------------------------------------------------------------------------- the cache

CACHE_DAMAGE = {
    "cut-in-half": cut_in_half,
    "garbage": lambda p: p.write_bytes(b"\x93NUMPY not a cache at all"),
    "empty": lambda p: p.write_bytes(b""),
    "missing-key": lambda p: save_file({k: v for k, v in load_file(p).items() if k != "labels"}, p,
                                       metadata={"n_records": "1"}),
    "lengths-disagree": lambda p: overwrite_tensor(p, "lengths", lambda t: t + 1),
    "lines-disagree": lambda p: overwrite_tensor(p, "lines", lambda t: t[:-1]),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_corrupt_tokenization_cache_is_rebuilt(d, capsys, damage):
    tok = data.load_tokenizer(d / "model")
    fresh = data.tokenize_file(d / "chats.jsonl", tok, 64, cache_dir=d / "cache")
    (cache_file,) = (d / "cache").iterdir()
    CACHE_DAMAGE[damage](cache_file)
    capsys.readouterr()
    rebuilt = data.tokenize_file(d / "chats.jsonl", tok, 64, cache_dir=d / "cache")
    err = capsys.readouterr().err
    assert not rebuilt.from_cache and rebuilt.examples == fresh.examples
    assert err.count("\n") == 1 and f"warning: {cache_file}: unreadable tokenization cache" in err
    again = data.tokenize_file(d / "chats.jsonl", tok, 64, cache_dir=d / "cache")  # rewritten, whole
    assert again.from_cache and again.examples == fresh.examples
    assert [p.name for p in (d / "cache").iterdir()] == [cache_file.name]


# ----------------------------------------------------------------------------- real processes

def test_chat_with_stdin_closed_is_one_line(originals):
    # `<&-` closes fd 0 before Python starts, so sys.stdin is None (stdin=DEVNULL would be EOF).
    result = subprocess.run(["bash", "-c", 'exec "$@" <&-', "bash", sys.executable, "chat.py", "--model",
                             str(originals / "model"), "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == "chat.py: error: stdin is closed; pass --prompt TEXT for a one-shot reply\n"


def test_chat_ctrl_c_at_the_prompt_ends_cleanly(originals):
    p = subprocess.Popen([sys.executable, "chat.py", "--model", str(originals / "model"), "--device", "cpu"],
                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert "/exit quits" in p.stderr.readline()  # the model is loaded: chat.py waits for a line
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err
    assert err.strip() == "chat.py: interrupted"
