"""The base model's fingerprint (model/fingerprint.py) and the adapter's base check.

Proves: a change to any byte of a weight file, even mid-file where the old first-and-last-MiB
fingerprint was blind, changes a model's fingerprint; each weight file is hashed once (then read
from the cache, which the tests keep out of ~/.cache); an adapter that records its base
(nanolora_base.json) refuses another base of the same shapes in merge.py, chat.py and the adapter
GGUF export, naming both, with exit code 2 and nothing written, unless --allow-other-base; a peft
adapter (no record) merges onto any base of the right shapes, as before. train.py's side (the
record beside every adapter, --resume on a changed base, old run_config.json files) is in
test_bad_input.py.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

import chat
import lora
import merge
from conftest import save_tiny_hf
from lora.adapter import BASE_FILE, base_record
from model import fingerprint
from model.fingerprint import legacy_model_fingerprint, model_fingerprint
from model.load import load_model
from test_lora import peft_adapter, randomize_lora
from test_merge import assert_failed_cleanly, run_merge


def change_mid_file(path):
    """Flip one byte in the middle of a file: same size, same first and last MiB."""
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_any_changed_byte_changes_the_fingerprint(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    save_file({"w": torch.randn(3 * 2**18)}, model / "model.safetensors")  # 3 MiB: edges apart
    before, legacy = model_fingerprint(model), legacy_model_fingerprint(model)
    change_mid_file(model / "model.safetensors")
    assert legacy_model_fingerprint(model) == legacy  # the old fingerprint's blind spot
    assert model_fingerprint(model) != before


def test_each_weight_file_is_hashed_once(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "file_sha256.json"
    monkeypatch.setenv("NANOLORA_HASH_CACHE", str(cache))
    model = save_tiny_hf(tmp_path / "model", shard_size="100KB")  # several shards
    shards = sorted(model.glob("*.safetensors"))
    hashed = []
    real = fingerprint.file_sha256

    def counting(path, *args, **kwargs):
        hashed.append(path.name)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(fingerprint, "file_sha256", counting)
    first = model_fingerprint(model)
    weights = [name for name in hashed if name.endswith(".safetensors")]
    assert len(shards) > 1 and sorted(weights) == [p.name for p in shards]
    assert set(json.loads(cache.read_text())) == {str(p.resolve()) for p in shards}
    hashed.clear()
    assert model_fingerprint(model) == first  # from the cache: no weight file read again
    assert not [name for name in hashed if name.endswith(".safetensors")]
    change_mid_file(shards[0])  # rewritten: a new mtime, so hashed again
    assert model_fingerprint(model) != first
    assert [name for name in hashed if name.endswith(".safetensors")] == [shards[0].name]


def test_large_files_hash_behind_a_bar_and_a_broken_cache_is_ignored(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "file_sha256.json"
    monkeypatch.setenv("NANOLORA_HASH_CACHE", str(cache))
    cache.write_text('{"torn": ')  # a cache cut short (by a full disk, say): hashed anew, rewritten
    blob = tmp_path / "w.safetensors"
    blob.write_bytes(bytes(range(256)) * 4096)
    monkeypatch.setattr(fingerprint, "SHOW_PROGRESS", 0)  # every file counts as large
    assert fingerprint.cached_file_sha256(blob) == fingerprint.file_sha256(blob)
    assert json.loads(cache.read_text())[str(blob.resolve())]["size"] == blob.stat().st_size


# ----------------------------------------------------------------------------- the adapter's base

@pytest.fixture
def adapter_on_a(tmp_path):
    """Base A, base B of the same shapes with other weights, and an adapter trained on A that
    records it as train.py's do."""
    a, b = save_tiny_hf(tmp_path / "base-a", seed=0), save_tiny_hf(tmp_path / "base-b", seed=1)
    model = load_model(a)
    cfg = lora.LoRAConfig(r=4, alpha=8, targets=["o_proj", "down_proj"])
    lora.inject_lora(model, cfg)
    randomize_lora(model)
    adapter = tmp_path / "adapter"
    lora.save_adapter(model, cfg, adapter, str(a))
    (adapter / BASE_FILE).write_text(base_record(a, model_fingerprint(a)))
    return a, b, adapter


def test_merge_refuses_another_base_naming_both(adapter_on_a, tmp_path, capsys):
    a, b, adapter = adapter_on_a
    code, _, err = run_merge(capsys, "--base", b, "--adapter", adapter, "--output", tmp_path / "out")
    assert_failed_cleanly(code, err, tmp_path, "--allow-other-base")
    assert f"was trained on the base {a.resolve()}; {b} holds other weights" in err
    code, _, err = run_merge(capsys, "--base", b, "--adapter", adapter, "--adapter-gguf", tmp_path / "a.gguf")
    assert code == 2 and "--allow-other-base" in err and not (tmp_path / "a.gguf").exists()
    code, _, err = run_merge(capsys, "--base", a, "--adapter", adapter, "--output", tmp_path / "out")
    assert code == 0 and "warning" not in err, err  # its own base


def test_merge_onto_another_base_with_the_flag(adapter_on_a, tmp_path, capsys):
    a, b, adapter = adapter_on_a
    code, out, err = run_merge(capsys, "--base", b, "--adapter", adapter, "--output", tmp_path / "out",
                               "--allow-other-base")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(a.resolve()) in warnings[0] and "--allow-other-base" in warnings[0]
    assert "merged model:" in out


def test_chat_refuses_another_base_before_loading(adapter_on_a, capsys):
    a, b, adapter = adapter_on_a
    code = chat.main(["--model", str(b), "--adapter", str(adapter), "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"chat.py: error: the adapter {adapter} was trained on the base {a.resolve()}; {b}" in err


def test_gguf_export_refuses_another_base(adapter_on_a, tmp_path, capsys):
    from deploy.adapter_gguf import main as export_main
    a, b, adapter = adapter_on_a
    code = export_main(["export", str(adapter), str(tmp_path / "a.gguf"), "--base", str(b)])
    assert code == 2 and "--allow-other-base" in capsys.readouterr().err
    assert not (tmp_path / "a.gguf").exists()


def test_peft_adapter_without_a_record_merges_onto_any_base(tmp_path, capsys):
    """As before: nothing says which base a peft adapter belongs to, so the shapes must do."""
    a, b = save_tiny_hf(tmp_path / "base-a", seed=0), save_tiny_hf(tmp_path / "base-b", seed=1)
    peft_adapter(a, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / BASE_FILE).exists()
    code, _, err = run_merge(capsys, "--base", b, "--adapter", tmp_path / "adapter", "--output",
                             tmp_path / "out", "--no-check")
    assert code == 0 and "warning" not in err, err
