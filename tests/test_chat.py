"""Generation: greedy replies equal transformers' generate, the KV cache equals recomputation,
sampling keeps transformers' support, stops are honoured, and an unmerged adapter answers like the
merged model."""

import subprocess
import sys

import pytest
import torch

import data
import lora
from conftest import ROOT
from model import load_model
from model.generate import generate, next_token
from test_train import tiny_chat_dir  # noqa: F401  (fixture)

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
    """chat.py with an adapter answers as the merged model does, and so does --reference (the
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
    textbook = run_chat("--model", str(tiny_chat_dir), "--adapter", str(tmp_path / "adapter"), "--reference", *prompt)
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

    import chat
    ids = list(text.encode()[:-cut])
    monkeypatch.setattr(chat, "generate", lambda *a, **kw: iter(ids))
    args = SimpleNamespace(seed=0, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                           max_new_tokens=len(ids))
    pieces = []
    out, _ = chat.reply(None, ByteTokens(), [], args, on_text=pieces.append)
    assert out == text[:-1] and "".join(pieces) == out
