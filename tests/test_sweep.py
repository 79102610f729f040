"""sweep.py: a grid trains one run per setting, its table shows each run's own figures, a diverging
setting is reported and does not stop the others, and --resume redoes no run that ended.

The runs are real `python train.py` processes on the tiny random chat model of test_train.py,
two steps each, in fp32 on the CPU.
"""

import json
import re
import shutil
from dataclasses import replace

import pytest

from training import sweep
import train as train_module
from training.flags import parse_config
from conftest import ROOT
from test_train import config, metrics

PROMPTS = str(ROOT / "examples" / "prompts.txt")


def read_table(path) -> dict[str, dict]:
    """sweep.md's rows, by run name, as {column: cell}."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = [dict(zip(header, (c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]))) for line in lines[1:]]
    return {r["run"]: r for r in rows}


def own_figures(run_dir) -> dict:
    """What a run's own metrics.jsonl and summary.json say, formatted as the table formats them."""
    rows = metrics(run_dir)
    steps = [r for r in rows if "loss" in r]
    best = min((r for r in rows if "val_loss" in r), key=lambda r: r["val_loss"])
    summary = json.loads((run_dir / "summary.json").read_text())
    tokens_per_s = sum(r["tokens"] for r in steps) / sum(r["tokens"] / r["tokens_per_s"] for r in steps)
    return {"steps": str(steps[-1]["step"]), "final loss": f"{steps[-1]['loss']:.4f}",
            "best val loss": f"{best['val_loss']:.4f}", "at step": str(best["step"]),
            "max grad_norm": f"{max(r['grad_norm'] for r in steps):.4g}", "tokens/s": f"{tokens_per_s:.0f}",
            "peak mem GiB": f"{summary['peak_memory_gib']:.2f}", "wall s": f"{summary['wall_s']:.1f}",
            "reply": " ".join(next(iter(summary["replies"].values()), "-").split()) if "replies" in summary
            else "-"}


def test_grid_divergence_and_resume(tiny_chat_dir, chat_data, tmp_path):
    out = tmp_path / "sweep"
    # lr 1e20 overflows the activations to inf at step 2, whatever the rank
    cfg = config(tiny_chat_dir, chat_data, out, sweep="lora_r=2,4 lr=1e-2,1e20", max_steps=2, save_every=1,
                 val_fraction=0.25, eval_every=1, sample_prompts=PROMPTS, sample_tokens=4)
    sweep.run_sweep(cfg)
    names = ["lora_r=2_lr=0.01", "lora_r=2_lr=1e20", "lora_r=4_lr=0.01", "lora_r=4_lr=1e20"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    table = read_table(out / "sweep.md")
    assert list(table) == names
    for name in names:
        figures = own_figures(out / name)
        assert {k: table[name][k] for k in figures} == figures, name
    assert [table[n]["status"] for n in names] == ["finished", "diverged at step 2"] * 2
    assert table["lora_r=2_lr=0.01"]["steps"] == "2" and table["lora_r=2_lr=1e20"]["steps"] == "1"
    assert json.loads((out / "lora_r=4_lr=0.01" / "settings.json").read_text())["lora_r"] == 4
    assert list((out / "lora_r=4_lr=0.01" / "tensorboard").glob("events.out.tfevents.*"))

    # Interrupt the sweep during its third run, after that run's step-1 checkpoint; the fourth never ran.
    third, fourth = out / names[2], out / names[3]
    before = {n: (out / n / "summary.json").stat().st_mtime_ns for n in names[:2]}
    for gone in ("summary.json", "adapter", "checkpoints/step-000002"):
        shutil.rmtree(third / gone) if (third / gone).is_dir() else (third / gone).unlink()
    (third / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(third) if m["step"] <= 1))
    shutil.rmtree(fourth)
    sweep.run_sweep(replace(cfg, resume=True))

    assert {n: (out / n / "summary.json").stat().st_mtime_ns for n in names[:2]} == before  # not redone
    assert "resumed from" in (third / "train.log").read_text()
    resumed = read_table(out / "sweep.md")
    for key in ("steps", "final loss", "best val loss", "at step", "max grad_norm", "status"):
        assert resumed[names[2]][key] == table[names[2]][key]  # resume is exact, so the figures match
    assert resumed[names[3]]["status"] == "diverged at step 2"
    assert own_figures(third)["final loss"] == resumed[names[2]]["final loss"]


def test_failed_runs_make_the_sweep_fail(tiny_chat_dir, chat_data, tmp_path):
    """A run that crashes (here: a LoRA target the model lacks) leaves the others running and its row
    in the table, and the sweep as a whole ends in an error naming it (train.py exits 2)."""
    out = tmp_path / "sweep"
    cfg = config(tiny_chat_dir, chat_data, out, sweep="lora_targets=q_proj,nope_proj", max_steps=1,
                 val_fraction=0.25, sample_tokens=0)
    with pytest.raises(sweep.SweepError, match=r"1 of 2 runs failed \(lora_targets=nope_proj\)"):
        sweep.run_sweep(cfg)
    table = read_table(out / "sweep.md")
    assert table["lora_targets=q_proj"]["status"] == "finished"
    assert table["lora_targets=nope_proj"]["status"].startswith("failed: exit 2")


def test_sweep_settings_from_flags_and_toml(tmp_path):
    cfg = parse_config(["--sweep", "lr=2e-4,1e-3", "lora-r=8,64",
                                     "lora_targets=q_proj+k_proj,all-linear", "--max-steps", "5"])
    combos = sweep.settings(cfg)
    assert len(combos) == 8 and cfg.max_steps == 5
    assert combos[0] == {"lr": 2e-4, "lora_r": 8, "lora_targets": "q_proj,k_proj"}
    assert sweep.run_name(combos[0]) == "lr=2e-4_lora_r=8_lora_targets=q_proj+k_proj"
    cfg.sweep_samples = 3
    assert sweep.settings(cfg) == sweep.settings(cfg) and len(sweep.settings(cfg)) == 3  # seeded

    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = 3\n\n[sweep]\nlr = [2e-4, 1e-3]\nlora_r = [8, 64]\nrslora = [true, false]\n')
    cfg = parse_config(["--config", str(toml)])
    assert cfg.sweep == "lr=2e-4,1e-3 lora_r=8,64 rslora=true,false" and cfg.max_steps == 3
    assert sweep.settings(cfg)[-1] == {"lr": 1e-3, "lora_r": 64, "rslora": False}


@pytest.mark.parametrize("items, message", [
    (["rank=8,16"], "--sweep rank=8,16: rank is not a setting a sweep can vary"),
    (["lr=fast"], "--sweep lr=fast: expected float values"),
    (["lr_schedule=cosine,wavy"], "--lr-schedule wavy: expected one of"),
])
def test_bad_sweep_is_one_line_error(items, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_module.main(["--sweep", *items, "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("train.py: error: ")]
    assert exit_.value.code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()
