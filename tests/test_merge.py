"""Merging, checked against the maths, the unmerged forward and peft's merge_and_unload.

Proves: merge_weight is W + s * B @ A in float32; merge_lora_ keeps the logits; merge.py's output
loads in transformers and in our load_model with the logits of peft's merge_and_unload, for
adapters written by peft and by nanolora (QLoRA ones merge onto the full-precision base), from a
sharded base into sharded output with an index, with every non-weight file copied; bad input fails
with one line on stderr, exit code 2 and no OUT_DIR; the real SmolLM2 merges (and its peak RAM).
"""

import json
import re
import subprocess
import sys

import pytest
import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open

import lora
import merge
from conftest import ROOT, assert_logits_match, save_tiny_hf
from model.load import load_model
from test_lora import IDS, peft_adapter, randomize_lora

SIDE_FILES = {"tokenizer.json": "{}", "tokenizer_config.json": '{"chat_template": "{{ x }}"}',
              "chat_template.jinja": "{{ messages }}", "special_tokens_map.json": "{}"}


def base_with_side_files(path, arch="llama", **kwargs):
    """A tiny checkpoint plus the non-weight files a real model directory carries."""
    save_tiny_hf(path, arch, **kwargs)
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
    return path


def run_merge(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the setup printed (transformers' progress bars)
    code = merge.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def hf_logits(model_dir):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return hf(input_ids=IDS).logits


# ----------------------------------------------------------------------------- the maths

def test_merge_weight_is_the_formula():
    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(48, 32, generator=g), torch.randn(4, 32, generator=g), torch.randn(48, 4, generator=g)
    expected = W.double() + 0.75 * (B.double() @ A.double())
    assert (lora.merge_weight(W, A, B, 0.75).double() - expected).abs().max() < 1e-5
    merged_bf16 = lora.merge_weight(W.bfloat16(), A, B, 0.75)  # computed in fp32 whatever W's dtype
    assert merged_bf16.dtype == torch.float32
    assert torch.equal(merged_bf16, W.bfloat16().float() + 0.75 * (B @ A))


def test_merge_lora_keeps_logits(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    lora.inject_lora(model, lora.LoRAConfig(r=4, targets="all-linear", rslora=True))
    randomize_lora(model)
    W0, m = model.model.layers[0].mlp.up_proj.weight.clone(), model.model.layers[0].mlp.up_proj
    expected_W = W0 + m.scaling * m.lora_B.weight @ m.lora_A.weight
    before = model(IDS)
    assert len(lora.merge_lora_(model)) == 14 and not lora.lora_modules(model)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert torch.allclose(model.model.layers[0].mlp.up_proj.weight, expected_W, atol=1e-6)
    assert_logits_match(model(IDS), before, n_layers=2, what="merged vs unmerged")


# ----------------------------------------------------------------------------- merge.py

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merge_py_matches_peft_merge_and_unload(tmp_path, capsys, arch):
    base = base_with_side_files(tmp_path / "base", arch, shard_size="100KB")  # a sharded base
    twin = peft_adapter(base, tmp_path / "adapter", use_rslora=arch == "qwen2")
    reference = twin.merge_and_unload()(input_ids=IDS).logits
    code, out, err = run_merge(capsys, "--base", base, "--adapter", tmp_path / "adapter",
                               "--output", tmp_path / "out", "--max-shard-size", "60KB")
    assert code == 0, err
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert set(SIDE_FILES) | {"config.json", "generation_config.json", "model.safetensors.index.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded, with an index
    diff = float(re.search(r"max \|logit diff\| merged vs base\+adapter = (\S+)", out).group(1))
    assert diff < 1e-5  # the check merge.py printed
    assert_logits_match(hf_logits(tmp_path / "out"), reference, n_layers=2, what="merge.py in transformers")
    assert_logits_match(load_model(tmp_path / "out")(IDS), reference, n_layers=2, what="merge.py here")


def test_merge_py_qlora_adapter_and_bf16(tmp_path, capsys):
    base = base_with_side_files(tmp_path / "base", intermediate_size=128)
    model = load_model(base)
    cfg = lora.LoRAConfig(r=4, alpha=8, targets=["q_proj", "down_proj"])
    lora.inject_lora(model, cfg, quantize="nf4")
    randomize_lora(model)
    lora.save_adapter(model, cfg, tmp_path / "adapter", str(base))
    code, out, err = run_merge(capsys, "--base", base, "--adapter", tmp_path / "adapter",
                               "--output", tmp_path / "out", "--dtype", "bf16")
    assert code == 0, err
    assert "NF4-quantized base (QLoRA); merging onto the full-precision weights" in out
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    # The full-precision base + the adapter, rounded to bf16 once, is what was written.
    reference = load_model(base)
    lora.load_adapter(reference, tmp_path / "adapter")
    lora.merge_lora_(reference)
    merged = load_model(tmp_path / "out")
    for key, value in reference.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value.bfloat16().float()), key


def test_merge_py_our_adapter_matches_peft(tmp_path, capsys):
    import peft
    import transformers
    base = save_tiny_hf(tmp_path / "base", tie_word_embeddings=True)
    model = load_model(base)
    cfg = lora.LoRAConfig(r=4, alpha=16, targets="all-linear")
    lora.inject_lora(model, cfg)
    randomize_lora(model)
    lora.save_adapter(model, cfg, tmp_path / "adapter", str(base))
    code, _, err = run_merge(capsys, "--base", base, "--adapter", tmp_path / "adapter",
                             "--output", tmp_path / "out", "--no-check")
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").merge_and_unload()
    assert_logits_match(hf_logits(tmp_path / "out"), theirs(input_ids=IDS).logits, n_layers=2,
                        what="merge.py vs peft's merge")


def assert_failed_cleanly(code, err, tmp_path, needle):
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_merge_py_rejects_mismatched_adapters(tmp_path, capsys):
    base = save_tiny_hf(tmp_path / "base")
    other = save_tiny_hf(tmp_path / "other", intermediate_size=128)  # same names, other shapes
    peft_adapter(other, tmp_path / "wrong-shapes")
    code, _, err = run_merge(capsys, "--base", base, "--adapter", tmp_path / "wrong-shapes",
                             "--output", tmp_path / "out")
    assert_failed_cleanly(code, err, tmp_path, "adapter_model.safetensors: adapter does not fit")
    peft_adapter(base, tmp_path / "wrong-targets", targets=["q_proj"])
    config = tmp_path / "wrong-targets" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": ["c_attn"]}))
    code, _, err = run_merge(capsys, "--base", base, "--adapter", tmp_path / "wrong-targets",
                             "--output", tmp_path / "out")
    assert_failed_cleanly(code, err, tmp_path, "c_attn")
    code, _, err = run_merge(capsys, "--base", base, "--adapter", tmp_path / "missing",
                             "--output", tmp_path / "out")
    assert_failed_cleanly(code, err, tmp_path, "adapter_config.json: not found")


def test_merge_py_cli_exit_code_and_existing_output(tmp_path):
    base = save_tiny_hf(tmp_path / "base")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "merge.py", "--base", tmp_path / "base", "--adapter",
                             tmp_path / "adapter", "--output", tmp_path / "out"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"merge.py: error: --output {tmp_path / 'out'}: already exists "
                                     "and is not an empty directory")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert base.exists()


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_gguf_is_the_merge_delta_in_gguf_layout(tmp_path, capsys, rslora):
    """merge.py --gguf (f32) and --adapter-gguf on one tiny Llama (GQA, so q and k permute over
    different head counts): every merged GGUF tensor equals the base GGUF's plus llama.cpp's
    alpha / r * lora_b @ lora_a, read back from the files with the gguf package. So names, the
    A/B layout, the q/k row order and alpha are what llama.cpp's --lora computes with (the test
    against llama.cpp itself is tests/test_llama_cpp.py). rsLoRA checks alpha = scaling * r."""
    import gguf

    from conftest import write_byte_level_tokenizer
    from deploy.gguf import export_gguf
    base = save_tiny_hf(tmp_path / "base")
    write_byte_level_tokenizer(base)
    peft_adapter(base, tmp_path / "adapter", use_rslora=rslora)
    code, out, err = run_merge(capsys, "--base", base, "--adapter", tmp_path / "adapter", "--output", tmp_path / "out",
                               "--dtype", "fp32", "--gguf", tmp_path / "merged.gguf", "--gguf-type", "f32",
                               "--adapter-gguf", tmp_path / "adapter.gguf", "--base-gguf", tmp_path / "base.gguf")
    assert code == 0, err
    assert "ChatML TEMPLATE" in out
    export_gguf(base, tmp_path / "base.gguf", "f32")
    read = lambda name: {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / name).tensors}  # noqa: E731
    merged, plain, adapter = read("merged.gguf"), read("base.gguf"), read("adapter.gguf")
    fields = gguf.GGUFReader(tmp_path / "adapter.gguf").fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    alpha = fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx((16 / 8 ** 0.5 if rslora else 2.0) * 8)
    adapted = {k.removesuffix(".lora_a") for k in adapter if k.endswith(".lora_a")}
    assert len(adapted) == 2 * 7 and len(adapter) == 2 * len(adapted)
    for name, w in merged.items():
        if name in adapted:
            a, b = adapter[f"{name}.lora_a"], adapter[f"{name}.lora_b"]  # (r, in), (out, r)
            delta = alpha / a.shape[0] * b.astype(np.float64) @ a
            assert np.abs(delta).max() > 1e-3, name  # the adapter moves this weight
            np.testing.assert_allclose(w, plain[name] + delta, atol=1e-5, err_msg=name)  # fp32 rounding
        else:
            np.testing.assert_array_equal(w, plain[name], err_msg=name)
    modelfile = (tmp_path / "adapter.Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf\nTEMPLATE" in modelfile
    # python -m deploy.adapter_gguf export writes the same file (the base from adapter_config.json).
    import deploy.adapter_gguf
    assert deploy.adapter_gguf.main(["export", str(tmp_path / "adapter"), str(tmp_path / "cli" / "a.gguf"),
                           "--base", str(base)]) == 0
    cli = read("cli/a.gguf")
    assert cli.keys() == adapter.keys() and all(np.array_equal(cli[k], adapter[k]) for k in cli)
    assert "FROM ./base.gguf\nADAPTER ./a.gguf" in (tmp_path / "cli" / "a.Modelfile").read_text()
    # Without --output nothing is merged; an existing adapter GGUF is refused unless --overwrite.
    args = ("--base", base, "--adapter", tmp_path / "adapter", "--adapter-gguf", tmp_path / "adapter.gguf")
    code, _, err = run_merge(capsys, *args)
    assert code == 2 and "already exists (pass --overwrite" in err
    assert run_merge(capsys, *args, "--overwrite")[0] == 0


def test_lora_gguf_cli_errors(tmp_path, capsys):
    import deploy.adapter_gguf
    base = save_tiny_hf(tmp_path / "base")
    peft_adapter(base, tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": None}))
    assert deploy.adapter_gguf.main(["export", str(tmp_path / "adapter"), str(tmp_path / "a.gguf")]) == 2
    assert "names no base model; pass --base" in capsys.readouterr().err
    assert deploy.adapter_gguf.main(["export", str(tmp_path / "adapter"), str(tmp_path / "a.txt"), "--base", str(base)]) == 2
    assert "expected a file name ending in .gguf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
    # A base GGUF the adapter does not fit (llama.cpp would refuse it at load): refused, nothing written.
    from conftest import write_byte_level_tokenizer
    from deploy.gguf import export_gguf
    other = save_tiny_hf(tmp_path / "other", intermediate_size=128)
    write_byte_level_tokenizer(other)
    write_byte_level_tokenizer(base)
    export_gguf(other, tmp_path / "other.gguf", "f16")
    export = ["export", str(tmp_path / "adapter"), str(tmp_path / "out" / "a.gguf"), "--base", str(base)]
    capsys.readouterr()  # transformers' save progress
    assert deploy.adapter_gguf.main(export + ["--base-gguf", str(tmp_path / "other.gguf")]) == 2
    err = capsys.readouterr().err
    assert "other.gguf: not the base of" in err and "blk.0.ffn_gate.weight is (64, 128)" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists(), err
    # A base GGUF that does not exist yet: written, with the command that makes it.
    assert deploy.adapter_gguf.main(export) == 0
    assert f"python -m deploy.gguf export {base} {tmp_path / 'out' / 'base.gguf'}" in capsys.readouterr().out
    # The adapter GGUF is no base.
    assert deploy.adapter_gguf.main(export[:2] + [str(tmp_path / "b.gguf")] + export[3:] + ["--base-gguf", export[2]]) == 2
    assert "not a llama model GGUF (general.type 'adapter'" in capsys.readouterr().err


def test_merge_py_gguf_flags_are_checked(tmp_path, capsys):
    base = save_tiny_hf(tmp_path / "base")
    peft_adapter(base, tmp_path / "adapter")
    common = ("--base", base, "--adapter", tmp_path / "adapter")
    code, _, err = run_merge(capsys, *common, "--output", tmp_path / "out2", "--gguf", tmp_path / "m.txt")
    assert code == 2 and "--gguf" in err and not (tmp_path / "out2").exists()
    for more, why in [((), "--output is required (or --adapter-gguf"),
                      (("--gguf", tmp_path / "m.gguf"), "--gguf exports the merged model: it needs --output")]:
        with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
            run_merge(capsys, *common, *more)
        assert exit_.value.code == 2 and why in capsys.readouterr().err
    dora = tmp_path / "dora"
    peft_adapter(base, dora, use_dora=True)
    code, _, err = run_merge(capsys, "--base", base, "--adapter", dora, "--adapter-gguf", tmp_path / "d.gguf")
    assert code == 2 and "DoRA adapter has no llama.cpp form" in err and not (tmp_path / "d.gguf").exists()


def test_merge_smollm2_with_peak_ram(tmp_path, smollm2_dir):
    """The real demo model (135M, one 538 MB fp32 shard): merge, check and report peak RSS."""
    model = load_model(smollm2_dir)
    cfg = lora.LoRAConfig(r=8, alpha=16, targets=lora.LLAMA_LINEARS)
    lora.inject_lora(model, cfg)
    randomize_lora(model, std=0.01)
    lora.save_adapter(model, cfg, tmp_path / "adapter", str(smollm2_dir))
    del model
    result = subprocess.run([sys.executable, "merge.py", "--base", smollm2_dir, "--adapter",
                             tmp_path / "adapter", "--output", tmp_path / "out", "--dtype", "bf16",
                             "--max-shard-size", "200MB", "--no-check"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    peak_mb = float(re.search(r"peak memory \(max RSS\): (\d+) MiB", result.stdout).group(1))
    print(f"\nSmolLM2 merge (bf16, 200MB shards) peak RSS: {peak_mb:.0f} MB")
    assert peak_mb < 1000  # about torch's own ~250 MB + one 200 MB output shard + a few tensors
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
