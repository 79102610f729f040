"""bench/train_speed.py keeps working: both implementations run the bench's steps on a tiny random
model in "real shapes" (the path the GPU cases take: a transformers checkpoint written on the fly),
with and without LoRA dropout and gradient checkpointing, and report finite figures."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_speed as bench  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


@pytest.mark.parametrize("impl", ["nanolora", "peft"])
@pytest.mark.parametrize("dropout, ckpt", [(0.0, False), (0.05, True)])
def test_bench_measures_both_implementations(impl, dropout, ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)
    case = dict(model="tiny", batch=2, seq=16, dtype="fp32", quantize=None, ckpt=ckpt, device="cpu",
                dropout=dropout)
    monkeypatch.setitem(bench.CASES, "tiny", case)
    figures = bench.measure(impl, "tiny", steps=2, warmup=1, scratch=tmp_path)
    assert (tmp_path / "tiny" / "config.json").exists()  # the random checkpoint the GPU cases use
    assert set(figures) == {"tokens_per_s", "peak_gib", "flops"}
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
