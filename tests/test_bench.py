"""bench/train_speed.py keeps working: both implementations run the bench's steps on a tiny random
model in "real shapes" (the path the GPU cases take: a transformers checkpoint written on the fly),
with and without LoRA dropout and gradient checkpointing, and report finite figures."""

import math
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

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
    assert set(figures) == {"tokens_per_s", "peak_gib", "flops", "matmul_peak"}
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    per_token = bench.step_flops(tmp_path / "tiny", case) / (case["batch"] * case["seq"])
    assert figures["flops"] / figures["tokens_per_s"] == pytest.approx(per_token)  # same seconds


def test_step_flops_counts_the_checkpoints_parameters(tmp_path, monkeypatch):
    """step_flops works from config.json; count the base linears and the LoRA parameters from the
    written weights instead: 4 P n for the frozen linears (forward and input gradient, lm_head
    tied to the embedding), 6 P_lora n for LoRA r=16, plus the attention scores."""
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)
    case = dict(model="tiny", batch=2, seq=16, dtype="fp32", quantize=None, ckpt=False, device="cpu")
    path = bench.model_dir(case, tmp_path)
    weights = load_file(next(path.glob("*.safetensors")))
    linears = {k: v for k, v in weights.items() if k.endswith("proj.weight")}
    assert len(linears) == 7 * TINY["num_hidden_layers"]
    base = sum(v.numel() for v in linears.values()) + weights["model.embed_tokens.weight"].numel()
    lora_params = sum(16 * sum(v.shape) for v in linears.values())
    n, L, T = 2 * 16, TINY["num_hidden_layers"], 16
    attention = 4 * L * 2 * T * T * TINY["num_attention_heads"] * TINY["head_dim"]
    assert bench.step_flops(path, case) == 4 * base * n + 6 * lora_params * n + 3 * attention


def test_summary_pairs_each_run_with_the_peft_run_of_its_round():
    """Ratios are taken within a round, then the median: a machine that is slow through round 2
    slows both runs of that round, and must not show up as a speed difference."""
    def run(tokens_per_s, peak_gib):
        return {"tokens_per_s": tokens_per_s, "peak_gib": peak_gib, "flops": 1e9 * tokens_per_s, "matmul_peak": 0.0}
    runs = {"nanolora": [run(130, 2.0), run(65, 2.0), run(140, 2.2)],
            "peft": [run(100, 4.0), run(50, 4.0), run(80, 4.0)]}
    rows = bench.summarize(runs, peak=1e12)
    assert rows["nanolora"]["speed_ratio"] == pytest.approx(1.3)  # ratios 1.3, 1.3, 1.75
    assert rows["nanolora"]["tokens_per_s"] == 130 and rows["peft"]["tokens_per_s"] == 80
    assert rows["nanolora"]["memory_ratio"] == pytest.approx(0.5)
    assert rows["peft"]["speed_ratio"] == rows["peft"]["memory_ratio"] == 1.0
    assert rows["nanolora"]["mfu"] == pytest.approx(0.130)  # median FLOP/s over the given peak


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.py --dry-run runs every check but the CUDA kernels on the CPU and writes
    its table; each check passes, and the precision rows measured a real difference (not 0). The
    torchrun rows are left out here (--skip): they run train.py under torchrun with DDP, FSDP and a
    resume, which test_parallel.py does on the same gloo backend, and they take half the time."""
    import subprocess
    out = subprocess.run([sys.executable, str(Path(bench.__file__).with_name("gpu_check.py")), "--dry-run",
                          "--skip", "torchrun", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:4]
            for line in (tmp_path / "gpu_check.md").read_text().splitlines() if line.startswith("| ")}
    checks = [name for name in rows if name not in ("check", "---")]
    assert len(checks) == 6 and all(rows[name][0] == "PASS" for name in checks), rows
    assert not any(name.startswith("torchrun") for name in checks)
    assert 0 < float(rows["precision bf16"][1]) <= float(rows["precision bf16"][2])
    assert 0 < float(rows["precision fp16"][1]) < float(rows["precision bf16"][1])  # fp16 keeps more bits
