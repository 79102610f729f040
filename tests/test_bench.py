"""bench/train_speed.py keeps working: both implementations run the bench's steps on a tiny random
model built the way the GPU cases build theirs (on the device, in the case's dtype, from the same
random weights, no checkpoint written), with and without LoRA dropout and gradient checkpointing,
and report finite figures; the two models built so are the same network. bench/gpu_check.py's dry
run writes its three files, and its rows end as they should: SKIP where nothing could be tested,
SKIPPED past the budget, TIMEOUT for a hung row while the next ones still run."""

import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_memory_rows  # noqa: E402
import gpu_rows  # noqa: E402
import memory as memory_bench  # noqa: E402
import train_speed as bench  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
GPU_CHECK = Path(bench.__file__).with_name("gpu_check.py")


@pytest.fixture
def tiny_case(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny-test", TINY)
    def case(**kw):
        spec = {**dict(model="tiny-test", batch=2, seq=16, dtype="fp32", quantize=None, ckpt=False, device="cpu"), **kw}
        monkeypatch.setitem(bench.CASES, "tiny-test", spec)
        return spec
    return case


@pytest.mark.parametrize("impl", ["nanolora", "peft"])
@pytest.mark.parametrize("dropout, ckpt", [(0.0, False), (0.05, True)])
def test_bench_measures_both_implementations(impl, dropout, ckpt, tiny_case):
    case = tiny_case(ckpt=ckpt, dropout=dropout)
    figures = bench.measure(impl, "tiny-test", steps=2, warmup=1)
    assert set(figures) == {"tokens_per_s", "peak_gib", "reserved_gib", "flops", "matmul_peak"}
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    per_token = bench.step_flops(bench.case_config(case), case) / (case["batch"] * case["seq"])
    assert figures["flops"] / figures["tokens_per_s"] == pytest.approx(per_token)  # same seconds


def test_both_implementations_build_the_same_network(tiny_case):
    """random_weights gives nanolora and transformers the same model: equal logits in fp32 (up to
    fp32 rounding of differently ordered sums: 1e-5 of logits of size ~1)."""
    from model import Llama
    from model.load import fill_model
    case = tiny_case()
    config = bench.case_config(case)
    with torch.device("meta"):
        ours = Llama(config)
    ours = fill_model(ours, bench.random_weights(config, torch.float32, "cpu"), "cpu")
    theirs = bench.hf_random_model(case, torch.float32, "cpu").eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), theirs(input_ids=ids).logits
    assert a.abs().max() > 0.1  # random weights, not zeros
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_step_flops_counts_the_parameters(tiny_case):
    """step_flops works from the config; count the base linears and the LoRA parameters from the
    random weights instead: 4 P n for the frozen linears (forward and input gradient, lm_head
    tied to the embedding), 6 P_lora n for LoRA r=16, plus the attention scores."""
    case = tiny_case()
    weights = dict(bench.random_weights(bench.case_config(case), torch.float32, "cpu"))
    linears = {k: v for k, v in weights.items() if k.endswith("proj.weight")}
    assert len(linears) == 7 * TINY["num_hidden_layers"]
    base = sum(v.numel() for v in linears.values()) + weights["model.embed_tokens.weight"].numel()
    lora_params = sum(16 * sum(v.shape) for v in linears.values())
    n, L, T = 2 * 16, TINY["num_hidden_layers"], 16
    attention = 4 * L * 2 * T * T * TINY["num_attention_heads"] * TINY["head_dim"]
    assert bench.step_flops(bench.case_config(case), case) == 4 * base * n + 6 * lora_params * n + 3 * attention


def test_summary_pairs_each_run_with_the_peft_run_of_its_round():
    """Ratios are taken within a round, then the median: a machine that is slow through round 2
    slows both runs of that round, and must not show up as a speed difference."""
    def run(tokens_per_s, peak_gib):
        return {"tokens_per_s": tokens_per_s, "peak_gib": peak_gib, "reserved_gib": peak_gib, "flops": 1e9 * tokens_per_s,
                "matmul_peak": 0.0}
    runs = {"nanolora": [run(130, 2.0), run(65, 2.0), run(140, 2.2)],
            "peft": [run(100, 4.0), run(50, 4.0), run(80, 4.0)]}
    rows = bench.summarize(runs, peak=1e12)
    assert rows["nanolora"]["speed_ratio"] == pytest.approx(1.3)  # ratios 1.3, 1.3, 1.75
    assert rows["nanolora"]["tokens_per_s"] == 130 and rows["peft"]["tokens_per_s"] == 80
    assert rows["nanolora"]["memory_ratio"] == pytest.approx(0.5)
    assert rows["peft"]["speed_ratio"] == rows["peft"]["memory_ratio"] == 1.0
    assert rows["nanolora"]["mfu"] == pytest.approx(0.130)  # median FLOP/s over the given peak


def gpu_check(out: Path, *args, env=None, wait_for_partial=False):
    """Run bench/gpu_check.py --dry-run --shape tiny; return its rows by name (from gpu_check.json)
    and, with wait_for_partial, the table as it stood while a row was still running."""
    cmd = [sys.executable, str(GPU_CHECK), "--dry-run", "--shape", "tiny", "--out", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    partial = None
    while wait_for_partial and partial is None and proc.poll() is None:
        time.sleep(0.5)
        report = out / "gpu_check.json"
        if report.exists() and not json.loads(report.read_text())["complete"]:
            partial = json.loads(report.read_text())
    output = proc.communicate(timeout=600)[0]
    report = json.loads((out / "gpu_check.json").read_text())
    return {r["name"]: r for r in report["rows"]}, report, partial, proc.returncode, output


def test_gpu_check_dry_run(tmp_path):
    """Every correctness and memory row runs on the CPU: the precision rows measured a real
    difference within the bound the format and shape give, the packed paths agree, the rows with
    nothing to compare here (varlen, NF4 CPU vs CPU, CUDA memory) say SKIP and why; $OUT gets
    exactly the three files. (The torchrun rows are test_parallel's ground; the speed rows'
    code is test_bench's above; the 8B memory estimates count what the 1B row's code counts, at
    other shapes and flags, which test_memory_estimate covers.)"""
    rows, report, _, rc, output = gpu_check(tmp_path, "--skip", "torchrun", "speed", "memory estimate llama-3.1-8b")
    assert rc == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md", "logs.tar.gz"]
    assert report["complete"] and report["environment"]["device"] == "CPU (dry run)"
    assert not any(name.startswith(("torchrun", "speed")) for name in rows)
    status = {name: r["status"] for name, r in rows.items()}
    assert status == {**{name: "PASS" for name in status},
                      "packed varlen vs mask bf16": "SKIP", "nf4 device vs cpu": "SKIP",
                      "memory load bf16": "SKIP", "memory load nf4": "SKIP",
                      "memory estimate llama-3.2-1b": "SKIP"}, status
    assert "CUDA" in rows["packed varlen vs mask bf16"]["what"]
    assert all("counted" in rows[name]["what"] for name in status if name.startswith("memory estimate"))
    bf16, fp16 = rows["precision bf16"], rows["precision fp16"]
    assert 0 < bf16["figure"] <= bf16["bound"] and 0 < fp16["figure"] <= fp16["bound"]
    assert fp16["figure"] < bf16["figure"]  # fp16 keeps 3 more bits
    assert fp16["bound"] == pytest.approx(bf16["bound"] / 8)
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        assert "logs/precision-bf16.log" in tar.getnames()
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | {r['status']} |" in table for name, r in rows.items())


def test_memory_estimate_row_result():
    """The memory estimate row's verdict on CUDA figures: the counted peak against max_memory_allocated
    within 3%, the assumed total against reserved + context reported beside it, in GiB."""
    from training import memory_estimate
    GIB = 2**30
    est = memory_estimate.Estimate("cuda", 10 * GIB, "backward", {}, {}, extras={"context": GIB})
    real = {"allocated": int(10.2 * GIB), "reserved": 11 * GIB, "context": GIB // 2}
    close = gpu_memory_rows.memory_result("case", est, real)
    assert close.figure == pytest.approx(abs(10 / 10.2 - 1)) and close.figure <= close.bound == 0.03
    assert close.figures["allocated_gib"] == 10.2
    assert close.figures["total_ratio"] == pytest.approx(11 / 11.5, abs=1e-4)
    assert "10.00 GiB vs 10.20 allocated" in close.what
    far = gpu_memory_rows.memory_result("case", est, {"allocated": 11 * GIB, "reserved": 12 * GIB, "context": GIB // 2})
    assert far.figure > far.bound


def test_gpu_check_hang_budget_and_partial_table(tmp_path):
    """A row made to hang ends as TIMEOUT under --row-timeout while the rows after it run; rows
    that no longer fit the budget are SKIPPED with the reason; the table is rewritten after every
    row, so while the hung row runs it already holds the rows before it."""
    rows, report, partial, rc, output = gpu_check(
        # a 12 s row timeout: precision bf16 (about 3 s on a quiet 2-core CPU) must still pass under load;
        # a 30 s budget: after the hang, one row still fits, the rest no longer do
        tmp_path, "--budget", "30", "--row-timeout", "12", "--skip", "torchrun", "speed", "memory",
        env={"GPU_CHECK_HANG": "precision fp16"}, wait_for_partial=True)
    assert rc == 1, output  # a TIMEOUT is a failure of the run
    assert rows["precision fp16"]["status"] == "TIMEOUT" and rows["precision fp16"]["s"] < 20
    assert rows["precision bf16"]["status"] == "PASS"
    after = list(rows)[list(rows).index("precision fp16") + 1:]
    assert after and any(rows[n]["status"] in ("PASS", "SKIP") for n in after), rows  # the next rows ran
    skipped = [n for n in after if rows[n]["status"] == "SKIPPED"]
    assert skipped and all("budget" in rows[n]["what"] for n in skipped), rows
    assert partial is not None and [r["name"] for r in partial["rows"]][:1] == ["precision bf16"]
    assert "still running" in (tmp_path / "gpu_check.md").read_text() or report["complete"]
    assert report["complete"]


@pytest.mark.parametrize("script, argv, message", [
    ("train_speed", ["--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    ("train_speed", ["--rounds", "-1"], "argument --rounds: expected an integer >= 1, got -1"),
    ("train_speed", ["--warmup", "2.5"], "argument --warmup: expected an integer, got '2.5'"),
    ("gpu_check", ["--budget", "0"], "argument --budget: expected a number in (0, inf), got 0"),
    ("gpu_check", ["--row-timeout", "nan"], "argument --row-timeout: expected a number in (0, inf), got nan"),
])
def test_bench_flags_are_checked_before_any_work(script, argv, message, capsys):
    main = __import__(script).main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.splitlines()[-1].endswith(f"error: {message}"), err


def test_precision_bound_grows_with_depth_and_width():
    """The bound is u (the format's unit roundoff) times sqrt(depth) times (1 + the attention
    logits' scale, which grows with width): deeper or wider models may differ more from fp32."""
    base = gpu_rows.SHAPES["cuda"]
    b = lambda **kw: gpu_rows.precision_bound(torch.bfloat16, {**base, **kw})
    assert b(num_hidden_layers=16) == pytest.approx(2 * b(num_hidden_layers=4))
    assert b(hidden_size=1024) > b(hidden_size=512) > b(hidden_size=64)
    assert gpu_rows.unit_roundoff(torch.bfloat16) == 2**-8 and gpu_rows.unit_roundoff(torch.float16) == 2**-11


def test_memory_bench_prints_ours_beside_the_peer(monkeypatch, capsys):
    """bench/memory.py on a tiny model (the big shapes take a minute): --json gives one object per
    case, its figures counted (total = counted + the CUDA lines); the table puts ours and the
    peer's figure on one row, a second peer on a row of its own, and the sources' addresses below;
    a case name it does not know is refused before any counting."""
    monkeypatch.setitem(memory_bench.MODELS, "tiny-test", TINY)
    peers = [memory_bench.Peer("1.0 GiB", "torchtune README", "packed"),
             memory_bench.Peer("2 GB", "unsloth requirements")]
    monkeypatch.setitem(memory_bench.CASES, "tiny-test", memory_bench.Case("tiny-test", 2, 32, memory_bench.ALL_SEVEN,
                                                                             quantize="nf4", peers=peers))
    rows = memory_bench.main(["--cases", "tiny-test", "tiny-test", "--json", "--precision", "fp16"])
    lines = capsys.readouterr().out.splitlines()
    assert len(rows) == len(lines) == 1 and json.loads(lines[0]) == rows[0]
    row = rows[0]
    assert set(row) == {"case", "model", "settings", "counted_bytes", "total_bytes", "counted_gib", "total_gib",
                        "peak_phase", "note", "peers", "seconds", "seq", "host_gib"}
    assert row["seq"] == 32 and row["host_gib"] == 0
    assert row["settings"] == "2 x 32, r 8 on all seven, fp16, NF4 base, ckpt"
    assert 0 < row["counted_bytes"] < row["total_bytes"] and row["total_bytes"] - row["counted_bytes"] > 2**29
    assert [p["figure"] for p in row["peers"]] == ["1.0 GiB", "2 GB"] and row["peers"][1]["url"].startswith("https://")
    memory_bench.main(["--cases", "tiny-test", "--precision", "fp16"])
    table = capsys.readouterr().out.splitlines()
    assert table[2] == (f"| tiny-test | {row['settings']} | {row['counted_gib']:.2f} | {row['total_gib']:.2f} | "
                        "1.0 GiB | torchtune README | packed |")
    assert table[3] == "|  |  |  |  | 2 GB | unsloth requirements |  |"
    assert f"- unsloth requirements: {memory_bench.SOURCES['unsloth requirements']}" in table
    with pytest.raises(SystemExit) as exit_:
        memory_bench.main(["--cases", "no-such-case"])
    assert exit_.value.code == 2 and "--cases: invalid choice" in capsys.readouterr().err
