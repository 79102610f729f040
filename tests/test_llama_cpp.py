"""GGUF exports in real llama.cpp (llama-cpp-python), against nanolora on the same weights.

Skipped unless `llama_cpp` imports: `make test-llama-cpp` builds it into .venv-llama (not part of
`make test` or CI). On SmolLM2-135M-Instruct:
- Tokens: llama.cpp tokenizes every probe text, and the Ollama prompt the Modelfile's TEMPLATE and
  SYSTEM give, exactly as chat.py tokenizes the chat template's prompt.
- f32 with an f32 KV cache: logits within 1e-3 of ours (float32 in both, different kernels and
  summation orders through 30 layers; measured ~1e-4).
- f16: the greedy replies to the demo prompts equal chat.py's (float32 from the imported model),
  except where chat.py's own greedy path passes a near tie (two tokens within TIE of each other,
  which f16's rounding of the weights may flip: SmolLM2's first reply token to the Chinese prompt
  is such a tie, 'I' and a Chinese byte at 28.208 both); those are reported, not compared.
- The adapter alone (deploy/adapter_gguf.py), applied with llama.cpp's --lora to the f32 base: logits within
  1e-3 of ours with the adapter on (unmerged), and greedy replies equal to the merged model's in
  llama.cpp and to chat.py's with the adapter.
- Every export type, for the table in the README: max logit difference and whether the greedy
  replies equal chat.py's (printed with -s; only f32/f16 are asserted: 4 and 8 bits change replies).
- Every rounded or quantized type is byte for byte what llama.cpp's own quantizer (llama-quantize's
  library call) writes from our f32 export, so a 4- or 5-bit file's distance from the f32 model is
  the format's, not an error of ours.
"""

import ctypes
from argparse import Namespace

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_gguf_tensors_equal

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test-llama-cpp)")

import chat  # noqa: E402
import data  # noqa: E402
import lora  # noqa: E402
import merge  # noqa: E402
from deploy.gguf import OUT_TYPES, OUTPUT_TYPE, export_gguf  # noqa: E402
from model.load import load_model  # noqa: E402
from deploy.ollama import ollama_prompt  # noqa: E402

N_PROMPTS = 5
MAX_NEW = 40
GREEDY = Namespace(max_new_tokens=MAX_NEW, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0)
LOGIT_TOLERANCE = 1e-3
TIE = 0.05  # logits: two candidates this close are a coin toss for any rounding of the weights
EXTRA_TEXTS = ["Hello World! IT'S 2024, isn't it?\n\n  \tx_1 = f(y)+12345;", "中文 Ünï 😀 --> ok"]


def prompts() -> list[str]:
    lines = [p for p in (ROOT / "examples" / "prompts.txt").read_text().splitlines() if p.strip()]
    return lines[:N_PROMPTS - 1] + ["用一句话介绍你自己。"]  # and one in Chinese


def open_llama(path, lora_path=None):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
                           lora_path=str(lora_path) if lora_path else None, seed=0, verbose=False)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])  # (T, vocab): logits_all


def llama_greedy(llm, ids: list[int], stop_ids) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(MAX_NEW):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop_ids:
            break
        out.append(token)
        llm.eval([token])
    return out


@pytest.fixture(scope="module")
def setup(smollm2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama_cpp")
    tok = data.load_tokenizer(smollm2_dir)
    chats = [[{"role": "user", "content": p}] for p in prompts()]
    return Namespace(tmp=tmp, tok=tok, chats=chats, prompt_ids=[tok.encode_chat(c, True) for c in chats])


def our_replies(model, tok, chats) -> list[str]:
    with torch.no_grad():
        return [chat.reply(model, tok, c, GREEDY)[0] for c in chats]


@pytest.fixture(scope="module")
def ours(smollm2_dir, setup):
    model = load_model(smollm2_dir, torch.float32)
    with torch.no_grad():
        logits = [model(torch.tensor([ids]))[0].numpy() for ids in setup.prompt_ids]
    replies = our_replies(model, setup.tok, setup.chats)
    return Namespace(model=model, logits=logits, replies=replies,
                     margins=[greedy_margin(model, setup.tok, ids, r) for ids, r in zip(setup.prompt_ids, replies)])


def greedy_margin(model, tok, prompt_ids, reply: str) -> float:
    """The smallest gap between the best and second-best logit along a greedy reply."""
    ids = prompt_ids + tok.encode(reply)[:MAX_NEW]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, len(prompt_ids) - 1:]
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).min().item()


def test_tokens_and_ollama_prompt_equal_chat_py(smollm2_dir, setup):
    path = setup.tmp / "smollm2-f16.gguf"
    chat_settings = export_gguf(smollm2_dir, path, "f16")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in EXTRA_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == setup.tok.encode(text)
    bos = setup.tok.special_tokens.get("bos_token")
    for messages, ids in zip(setup.chats, setup.prompt_ids):
        text = ollama_prompt(chat_settings.template, messages, chat_settings.system, bos, False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, messages  # add_bos is off
    assert chat_settings.system and "SmolLM" in chat_settings.system


def exported(smollm2_dir, setup, out_type: str):
    """Our export of SmolLM2 to `out_type`, written once per module."""
    path = setup.tmp / f"smollm2-{out_type}.gguf"
    if not path.exists():
        export_gguf(smollm2_dir, path, out_type)
    return path


def llama_quantize(source, dest, out_type: str):
    """llama.cpp's quantizer (what llama-quantize runs) on `source`, told to lay the file out as our
    export does: every 2-D tensor in `out_type` (pure: no per-tensor mixture), the tied output
    matrix (token_embd) in Q8_0 for the 4- and 5-bit types; 1-D tensors stay F32 in both."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{out_type.upper()}")
    params.pure = True
    qtype = OUT_TYPES[out_type][0]
    if qtype in OUTPUT_TYPE:
        params.token_embedding_type = int(OUTPUT_TYPE[qtype])  # gguf's enum values are ggml's
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params)) == 0


def test_exports_are_llama_cpp_quantizer_output_byte_for_byte(smollm2_dir, setup, capfd):
    f32 = exported(smollm2_dir, setup, "f32")
    for out_type in OUT_TYPES:
        if out_type == "f32":
            continue
        theirs = setup.tmp / f"llama-quantize-{out_type}.gguf"
        llama_quantize(f32, theirs, out_type)
        capfd.readouterr()  # llama.cpp logs every tensor it writes
        assert_gguf_tensors_equal(exported(smollm2_dir, setup, out_type), theirs, out_type)
        theirs.unlink()


def test_every_export_type(smollm2_dir, setup, ours):
    rows = []
    for out_type in OUT_TYPES:
        path = exported(smollm2_dir, setup, out_type)
        llm = open_llama(path)
        theirs = [llama_logits(llm, ids) for ids in setup.prompt_ids]
        diff = max(float(np.abs(got - want).max()) for got, want in zip(theirs, ours.logits))
        top1 = np.concatenate([got.argmax(-1) == want.argmax(-1) for got, want in zip(theirs, ours.logits)]).mean()
        replies = [setup.tok.decode(llama_greedy(llm, ids, setup.tok.stop_ids), skip_special_tokens=True)
                   for ids in setup.prompt_ids]
        clear = [i for i, m in enumerate(ours.margins) if m > TIE]  # replies without a near tie
        same = sum(replies[i] == ours.replies[i] for i in clear)
        rows.append((out_type, diff, same, len(clear), path.stat().st_size / 2**20, top1))
        del llm
    ties = len(setup.chats) - rows[0][3]
    print(f"\n| type | max abs logit diff vs nanolora fp32 | prompt positions with the same top next token | "
          f"greedy replies equal to chat.py's ({ties} of {len(setup.chats)} left out: a near tie) | file MiB |")
    print("|---|---|---|---|---|")
    for out_type, diff, same, n, size, top1 in rows:
        print(f"| {out_type} | {diff:.2e} | {top1:.0%} | {same}/{n} | {size:.0f} |")
    table = {r[0]: r for r in rows}
    assert table["f32"][1] < LOGIT_TOLERANCE and table["f32"][2] == table["f32"][3]
    assert table["f16"][2] == table["f16"][3] >= 3


def test_adapter_gguf_with_lora_equals_merged(smollm2_dir, setup, ours, capsys):
    # A random adapter big enough to change the replies: B ~ N(0, 0.02^2) on every projection.
    model = load_model(smollm2_dir, torch.float32)
    cfg = lora.LoRAConfig(r=8, alpha=16, dropout=0.0, targets=lora.LLAMA_LINEARS)
    torch.manual_seed(0)  # A is drawn at injection
    lora.inject_lora(model, cfg)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.02)
    lora.save_adapter(model, cfg, setup.tmp / "adapter", base_model_name_or_path=str(smollm2_dir))
    with torch.no_grad():
        adapted_logits = [model(torch.tensor([ids]))[0].numpy() for ids in setup.prompt_ids]
    adapted_replies = our_replies(model, setup.tok, setup.chats)
    assert adapted_replies != ours.replies  # the adapter matters
    base_gguf = exported(smollm2_dir, setup, "f32")
    code = merge.main([str(a) for a in ("--base", smollm2_dir, "--adapter", setup.tmp / "adapter",
                                        "--output", setup.tmp / "merged", "--dtype", "fp32",
                                        "--gguf", setup.tmp / "merged-f32.gguf", "--gguf-type", "f32",
                                        "--adapter-gguf", setup.tmp / "adapter.gguf", "--base-gguf", base_gguf)])
    assert code == 0, capsys.readouterr().err
    with_lora = open_llama(base_gguf, lora_path=setup.tmp / "adapter.gguf")
    diff = max(float(np.abs(llama_logits(with_lora, ids) - want).max())
               for ids, want in zip(setup.prompt_ids, adapted_logits))
    lora_replies = [setup.tok.decode(llama_greedy(with_lora, ids, setup.tok.stop_ids), skip_special_tokens=True)
                    for ids in setup.prompt_ids]
    del with_lora
    merged = open_llama(setup.tmp / "merged-f32.gguf")
    merged_replies = [setup.tok.decode(llama_greedy(merged, ids, setup.tok.stop_ids), skip_special_tokens=True)
                      for ids in setup.prompt_ids]
    print(f"\nadapter GGUF via --lora on the f32 base: max abs logit diff vs nanolora (adapter on) = {diff:.2e}; "
          f"greedy replies equal to the merged GGUF's: {sum(a == b for a, b in zip(lora_replies, merged_replies))}"
          f"/{len(lora_replies)}, to chat.py's: {sum(a == b for a, b in zip(lora_replies, adapted_replies))}")
    assert diff < LOGIT_TOLERANCE
    assert lora_replies == merged_replies == adapted_replies
