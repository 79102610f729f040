"""Generation: greedy replies equal transformers' generate, the KV cache equals recomputation,
sampling keeps transformers' support, stops are honoured, and an unmerged adapter answers like the
merged model."""

import json
import subprocess
import sys

import pytest
import torch

import data
import deploy.chat
import lora
from conftest import ROOT
from model import load_model
from model.generate import generate, next_token
from test_train import config

PROMPTS = ["What is the capital of France?", "请用一句话介绍一下你自己。"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers_generate(smollm2_dir, prompt):
    import transformers
    tok = data.load_tokenizer(smollm2_dir)
    ids = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ours = list(generate(load_model(smollm2_dir), ids, 24, tok.stop_ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                      eos_token_id=sorted(tok.stop_ids), pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    ref = out[:next((i for i, t in enumerate(out) if t in tok.stop_ids), len(out))]
    assert ours == ref and len(ours) > 0, (tok.decode(ours), tok.decode(ref))


def test_kv_cache_decoding_equals_recompute(tiny_chat_dir):
    model = load_model(tiny_chat_dir)
    prompt = list(range(100, 112))
    cached = list(generate(model, prompt, 16))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]


def test_generation_stops_at_each_stop_token(tiny_chat_dir, smollm2_dir):
    model = load_model(tiny_chat_dir)
    prompt = list(range(200, 210))
    free = list(generate(model, prompt, 12))
    cut = next(i for i in range(2, 12) if free[i] not in free[:i])
    assert list(generate(model, prompt, 12, stop_ids={free[cut]})) == free[:cut]
    tok = data.load_tokenizer(smollm2_dir)
    assert "<|im_end|>" in {tok.decode([t]) for t in tok.stop_ids}  # SmolLM2's end of turn (= eos)


def test_top_k_top_p_and_penalty_match_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    for top_k, top_p in [(5, 1.0), (0, 0.7), (8, 0.5)]:
        ref = logits[None].clone()
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        support = set(torch.isfinite(ref[0]).nonzero().flatten().tolist())
        gen = torch.Generator().manual_seed(1)
        seen = {next_token(logits.clone(), set(), temperature=1.0, top_k=top_k, top_p=top_p, generator=gen)
                for _ in range(3000)}
        assert seen == support, (top_k, top_p)
    history = {3, 7, 11}
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([sorted(history)]), logits[None].clone())
    assert next_token(logits.clone(), history, repetition_penalty=1.3) == int(ref.argmax())
    penalised = logits.clone()
    penalised[[3, 7, 11]] = ref[0, [3, 7, 11]]
    assert torch.equal(ref[0], penalised)


def run_chat(*args):
    return subprocess.run([sys.executable, "chat.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_unmerged_adapter_answers_like_merged_model(tiny_chat_dir, tmp_path):
    """chat.py with an adapter answers as the merged model does, and so does --textbook (the
    textbook twins: model/fused.py); the base model answers otherwise."""
    model = load_model(tiny_chat_dir)
    cfg = lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets="all-linear")
    lora.inject_lora(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.weight.normal_(std=0.5)  # a non-zero adapter that changes the answer
    lora.save_adapter(model, cfg, tmp_path / "adapter", str(tiny_chat_dir))
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "merge.py", "--base", str(tiny_chat_dir), "--adapter",
                    str(tmp_path / "adapter"), "--output", str(merged)], cwd=ROOT, check=True,
                   capture_output=True)
    prompt = ["--prompt", "Hello there", "--max-new-tokens", "12"]
    unmerged = run_chat("--model", str(tiny_chat_dir), "--adapter", str(tmp_path / "adapter"), *prompt)
    fused = run_chat("--model", str(merged), *prompt)
    base = run_chat("--model", str(tiny_chat_dir), *prompt)
    textbook = run_chat("--model", str(tiny_chat_dir), "--adapter", str(tmp_path / "adapter"), "--textbook", *prompt)
    assert unmerged.returncode == fused.returncode == textbook.returncode == 0, unmerged.stderr[-2000:]
    assert unmerged.stdout == fused.stdout == textbook.stdout and unmerged.stdout.strip()
    assert base.stdout != fused.stdout  # the adapter did change the answer
    assert "decode" in unmerged.stderr and "decode" not in unmerged.stdout


def test_interactive_chat_keeps_history_and_commands(tiny_chat_dir):
    script = "hi\n/system Be brief.\nhello\n/reset\nagain\n/exit\n"
    result = subprocess.run([sys.executable, "chat.py", "--model", str(tiny_chat_dir), "--max-new-tokens", "4"],
                            cwd=ROOT, input=script, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("assistant> ") == 3
    assert "system prompt set" in result.stderr and "history cleared" in result.stderr


def test_bad_adapter_is_one_line_error(tiny_chat_dir, tmp_path):
    result = run_chat("--model", str(tiny_chat_dir), "--adapter", str(tmp_path / "missing"), "--prompt", "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "missing") in result.stderr


class ByteTokens:
    """A tokenizer of one token per UTF-8 byte, as byte-level BPE falls back to for rare text."""
    stop_ids = ()

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")

    def encode_chat(self, messages, add_generation_prompt=True):
        return [1]


@pytest.mark.parametrize("text, cut", [("café", 1), ("ok 🙂", 1), ("ok 🙂", 3)])
def test_a_reply_cut_inside_a_character_holds_it_back(monkeypatch, text, cut):
    """The token budget ends `cut` bytes short of the last character (1 of 2 bytes of é, 1 or 3 of
    an emoji's 4): the reply, streamed and returned, ends at the last whole character, no U+FFFD."""
    from types import SimpleNamespace

    ids = list(text.encode()[:-cut])
    monkeypatch.setattr(deploy.chat, "generate", lambda *a, **kw: iter(ids))
    args = SimpleNamespace(seed=0, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                           max_new_tokens=len(ids))
    pieces = []
    out, _ = deploy.chat.reply(None, ByteTokens(), [], args, on_text=pieces.append)
    assert out == text[:-1] and "".join(pieces) == out


# --- the template an adapter was trained with, through merge.py, chat.py and the GGUF export

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "How are you?"}]


@pytest.fixture(scope="module")
def deepseek_run(tiny_chat_dir, chat_data, tmp_path_factory):
    """The README's path on the tiny model: `train.py --template deepseek` (2 steps), then
    `merge.py --gguf` of its adapter: (adapter dir, merged dir, GGUF path)."""
    import merge
    from training.loop import train
    tmp = tmp_path_factory.mktemp("deepseek")
    train(config(tiny_chat_dir, chat_data, tmp / "run", template="deepseek", max_steps=2))
    code = merge.main(["--base", str(tiny_chat_dir), "--adapter", str(tmp / "run" / "adapter"), "--output",
                       str(tmp / "merged"), "--no-check", "--gguf", str(tmp / "merged.gguf"), "--gguf-type", "f32"])
    assert code == 0
    return tmp / "run" / "adapter", tmp / "merged", tmp / "merged.gguf"


def deepseek_prompt(tiny_chat_dir) -> list[int]:
    return data.load_tokenizer(tiny_chat_dir, "deepseek").encode_chat(CONVERSATION, add_generation_prompt=True)


def test_merged_model_carries_the_adapters_template(deepseek_run, tiny_chat_dir):
    """merge.py writes the adapter's template (DeepSeek), not the base's ChatML, into the merged
    model: chat_template.jinja and tokenizer_config.json render what training rendered."""
    from data.templates import DEEPSEEK
    _, merged, _ = deepseek_run
    assert (merged / "chat_template.jinja").read_text() == DEEPSEEK
    assert json.loads((merged / "tokenizer_config.json").read_text())["chat_template"] == DEEPSEEK
    trained = data.load_tokenizer(tiny_chat_dir, "deepseek").render(CONVERSATION, add_generation_prompt=True)
    assert data.load_tokenizer(merged).render(CONVERSATION, add_generation_prompt=True) == trained
    assert trained.endswith("User: How are you?\n\nAssistant:")


def test_chat_prompts_as_the_adapter_was_trained(deepseek_run, tiny_chat_dir):
    """chat.py builds DeepSeek's prompt ids with the adapter on the base, and with the merged model."""
    import chat
    adapter, merged, _ = deepseek_run
    wanted = deepseek_prompt(tiny_chat_dir)
    unmerged = chat.chat_tokenizer(tiny_chat_dir, chat.parse_args(["--adapter", str(adapter)]))
    alone = chat.chat_tokenizer(merged, chat.parse_args(["--model", str(merged)]))
    assert unmerged.encode_chat(CONVERSATION, add_generation_prompt=True) == wanted
    assert alone.encode_chat(CONVERSATION, add_generation_prompt=True) == wanted
    base = data.load_tokenizer(tiny_chat_dir).encode_chat(CONVERSATION, add_generation_prompt=True)
    assert base != wanted  # the base's ChatML prompt


def test_another_template_than_the_adapters_warns_once(deepseek_run, tiny_chat_dir, capsys):
    import chat
    adapter, _, _ = deepseek_run
    tok = chat.chat_tokenizer(tiny_chat_dir, chat.parse_args(["--adapter", str(adapter), "--template", "chatml"]))
    assert tok.encode_chat(CONVERSATION) == data.load_tokenizer(tiny_chat_dir, "chatml").encode_chat(CONVERSATION)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: --template chatml")
    assert str(adapter / "chat_template.jinja") in err
    chat.chat_tokenizer(tiny_chat_dir, chat.parse_args(["--adapter", str(adapter), "--template", "deepseek"]))
    assert capsys.readouterr().err == ""  # the adapter's own template: nothing to say


def test_gguf_modelfiles_prompt_as_the_adapter_was_trained(deepseek_run, tiny_chat_dir, tmp_path):
    """merge.py --gguf's Modelfile, and the adapter GGUF's (python -m deploy.adapter_gguf export), carry
    Ollama's DeepSeek TEMPLATE, and the merged GGUF holds the DeepSeek Jinja template."""
    import gguf

    from data.templates import DEEPSEEK
    from deploy.adapter_gguf import export_adapter_gguf
    from deploy.ollama import modelfile_path
    adapter, _, merged_gguf = deepseek_run
    text = modelfile_path(merged_gguf).read_text()
    assert "# TEMPLATE and SYSTEM give the prompt the model's chat template gives (DeepSeek" in text
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    assert '{{ if eq .Role "user" }}User: {{ .Content }}\n\n' in template, text
    field = gguf.GGUFReader(merged_gguf).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == DEEPSEEK
    chat = export_adapter_gguf(adapter, tiny_chat_dir, tmp_path / "adapter.gguf", tmp_path / "base.gguf")
    assert chat.family == "DeepSeek" and "User: {{ .Content }}" in chat.template
    assert "(DeepSeek" in modelfile_path(tmp_path / "adapter.gguf").read_text()
