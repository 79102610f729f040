"""Hyperparameter sweeps: train once per setting of a grid, then compare the runs in one table.

    python train.py --sweep lr=2e-4,1e-3 lora_r=8,64 --max-steps 200 --output-dir runs/sweep
    python train.py --sweep lr=1e-4,1e-3,1e-2 lora_r=8,16,64 --sweep-samples 4   # 4 of the 9, at random
    python train.py --config run.toml      # with a [sweep] table, last in the file: lr = [2e-4, 1e-3]
    python train.py --sweep ... --resume   # continue an interrupted sweep; finished runs are kept

The keys are train.py's settings (lr, lora_r, lora_alpha, lora_dropout, lora_targets, epochs,
micro_batch_size, grad_accum, ...). A value that is itself a comma list joins its parts with +:
lora_targets=q_proj+k_proj,all-linear sweeps "q/k only" against all linear layers.

Each setting runs as its own `python train.py --config OUTPUT_DIR/<run>/settings.json` process, one
after another, so a crash or a divergence ends that run only, and the peak memory a run reports
(CUDA allocations, or on the CPU the resident set of the process) is its own and not the largest
of all runs before it. All runs read the same tokenization cache. The figures come from each run's
metrics.jsonl and summary.json; the table goes to OUTPUT_DIR/sweep.md and the terminal, and
`tensorboard --logdir OUTPUT_DIR` shows every run's curves as series of one plot.
"""

import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import typing
from dataclasses import asdict, fields, replace
from pathlib import Path

from . import run_dir as run_files
from .checkpoint import list_checkpoints
from .flags import value_text
from .settings import TrainConfig, check_config
from model.errors import UserError

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"
# the settings of the sweep itself (their fields say swept=False): no grid varies them
NOT_SWEPT = tuple(f.name for f in fields(TrainConfig) if not f.metadata["swept"])
COLUMNS = ("run", "steps", "final loss", "best val loss", "at step", "max grad_norm", "tokens/s",
           "peak mem GiB", "wall s", "status", "reply")


class SweepError(UserError):
    """A malformed --sweep or [sweep] table: printed as one line, exit code 2."""


# -----------------------------------------------------------------------------
# the grid: --sweep text -> typed values -> settings -> run names

def parse_sweep(spec: str, cfg) -> dict[str, list]:
    """'lr=2e-4,1e-3 lora-r=8,64' -> {'lr': [0.0002, 0.001], 'lora_r': [8, 64]}, typed like cfg."""
    known = {f.name: f for f in fields(cfg)}
    grid = {}
    for item in spec.split():
        key, _, values = item.partition("=")
        key = key.replace("-", "_")
        if key not in known or key in NOT_SWEPT:
            raise SweepError(f"--sweep {item}: {key} is not a setting a sweep can vary")
        if not values:
            raise SweepError(f"--sweep {item}: expected {key}=value1,value2")
        grid[key] = [parse_value(known[key], raw) for raw in values.split(",")]
    if not grid:
        raise SweepError("--sweep: expected items like lr=2e-4,1e-3 lora_r=8,64")
    return grid


def parse_value(f, raw: str):
    """One value in the type of setting `f`: int for lora_r, float for lr, None ('none') where allowed."""
    kinds = [t for t in typing.get_args(f.type) if t is not type(None)] or [f.type]
    if raw.lower() == "none" and type(None) in typing.get_args(f.type):
        return None
    if kinds[0] is bool:
        if raw.lower() not in ("true", "false"):
            raise SweepError(f"--sweep {f.name}={raw}: expected true or false")
        return raw.lower() == "true"
    if kinds[0] in (int, float):
        try:
            return kinds[0](raw)
        except ValueError:
            raise SweepError(f"--sweep {f.name}={raw}: expected {kinds[0].__name__} values") from None
    return raw.replace("+", ",") if f.metadata["comma_list"] else raw


def settings(cfg) -> list[dict]:
    """Every combination of the sweep's values, in order; --sweep-samples N keeps N at random (--seed).
    Each is checked as train.py checks its settings (check_config), so a bad one is refused before
    the first run starts."""
    grid = parse_sweep(cfg.sweep, cfg)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if 0 < cfg.sweep_samples < len(combos):
        keep = sorted(random.Random(cfg.seed).sample(range(len(combos)), cfg.sweep_samples))
        combos = [combos[i] for i in keep]
    names = [run_name(s) for s in combos]
    if len(set(names)) < len(names):
        raise SweepError(f"--sweep {cfg.sweep}: two settings would share the run directory "
                         f"{next(n for n in names if names.count(n) > 1)}")
    for setting in combos:
        check_config(replace(cfg, **setting))
    return combos


def run_name(setting: dict) -> str:
    """A short, filesystem-safe name: lr=2e-4_lora_r=8."""
    name = "_".join(f"{k}={value_text(k, v)}" for k, v in setting.items())
    return re.sub(r"[^\w.=+-]", "-", name).strip("-.")


# -----------------------------------------------------------------------------
# running the sweep: one training process per setting

def run_sweep(cfg) -> list[dict]:
    """Train every setting in turn (with --resume, finished runs are kept); write and print the table."""
    from rich.console import Console
    combos = settings(cfg)  # every setting checked, before anything else
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SweepError("--sweep starts one train.py process per setting itself: run it with python, "
                         "not torchrun")
    console = Console(stderr=True)
    out = Path(cfg.output_dir)
    if not cfg.resume and not cfg.overwrite:
        refuse_existing_sweep(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [{"run": run_name(s), "status": "not run"} for s in combos]
    for i, setting in enumerate(combos):
        name = run_name(setting)
        run_dir = out / name
        if cfg.resume and (run_dir / "summary.json").exists():
            console.print(f"[bold]sweep {i + 1}/{len(combos)}: {name}[/] ended before; kept")
            results[i] = run_result(run_dir)
            continue
        resume = cfg.resume and run_dir.is_dir() and bool(list_checkpoints(run_dir))
        console.print(f"[bold]sweep {i + 1}/{len(combos)}: {name}[/]" + (" (resumed)" if resume else ""))
        rc, last_line = train_process(cfg, setting, run_dir, resume)
        stopped = rc in (128 + signal.SIGINT, 128 + signal.SIGTERM)  # by the user: the sweep stops too
        results[i] = run_result(run_dir, "stopped" if stopped else f"failed: exit {rc}: {last_line}"[:120])
        write_markdown(out / "sweep.md", cfg, results)
        if stopped:
            console.print(f"sweep stopped during {name}; continue it with the same command and --resume")
            sys.exit(rc)
    write_markdown(out / "sweep.md", cfg, results)
    print_table(results, cfg)
    console.print(f"table in {out / 'sweep.md'}; all runs' curves: tensorboard --logdir {out}")
    # A diverged run is a result of its setting; a failed one is a missing result: say so in the exit code.
    failed = [r["run"] for r in results if r["status"].startswith("failed")]
    if failed:
        raise SweepError(f"{len(failed)} of {len(results)} runs failed ({', '.join(failed)}); "
                         f"each one's train.log in {out} says why")
    return results


def refuse_existing_sweep(out: Path):
    """A new sweep into a directory holding a sweep's table or runs: say what is there and what to pass."""
    runs = sorted(d.name for d in out.iterdir() if d.is_dir() and run_files.existing_run_files(d)) \
        if out.is_dir() else []
    found = (["sweep.md"] if (out / "sweep.md").exists() else []) + runs
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise SweepError(f"--output-dir {out}: already holds a sweep ({shown}); pass --resume to continue it, "
                         "--overwrite to replace its runs, or choose another --output-dir")


def train_process(cfg, setting: dict, run_dir: Path, resume: bool) -> tuple[int, str]:
    """Run train.py on one setting, its output shown and kept in train.log; -> (exit code, last line).

    A run started afresh replaces what its directory holds: it was asked (--overwrite), or it is this
    sweep's own run that --resume found without a checkpoint to continue from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)  # written again only if this run ends by itself
    run_cfg = {**asdict(cfg), **setting, "output_dir": str(run_dir), "sweep": None, "sweep_samples": 0,
               "resume": False, "overwrite": not resume}
    (run_dir / "settings.json").write_text(json.dumps(run_cfg, indent=2))
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--config", str(run_dir / "settings.json")]
    # Its own session, so a Ctrl-C in the terminal reaches it once, forwarded from here: it then
    # finishes its step and saves a checkpoint, as a run of train.py alone does.
    proc = subprocess.Popen(cmd + ["--resume"] * resume, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    forward = lambda signum, frame: proc.send_signal(signum)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    last_line = ""
    try:
        with open(run_dir / "train.log", "a" if resume else "w") as log:
            for line in proc.stdout:
                sys.stderr.write(line)
                log.write(line)
                last_line = line.strip() or last_line
    finally:
        rc = proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return rc, last_line


# -----------------------------------------------------------------------------
# the figures of one run, and the table of all

def run_result(run_dir: Path, no_summary: str = "not run") -> dict:
    """A run's figures, from its metrics.jsonl (losses, grad norms, speed) and summary.json (the rest)."""
    rows = {}
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)  # a resumed run may log a step twice: the last counts
    rows = [rows[s] for s in sorted(rows)]
    steps = [r for r in rows if "loss" in r]
    vals = [r for r in rows if "val_loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    best = min(vals, key=lambda r: r["val_loss"]) if vals else {}
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in steps)
    if summary:
        status = f"diverged at step {summary['steps'] + 1}" if summary["diverged"] else "finished"
    else:  # the process ended without saying how: the caller knows (failed, stopped, not run)
        status = no_summary
    return {"run": run_dir.name, "steps": steps[-1]["step"] if steps else 0,
            "final_loss": steps[-1]["loss"] if steps else None,
            "best_val_loss": best.get("val_loss"), "best_val_step": best.get("step"),
            "grad_norm_max": max((r["grad_norm"] for r in steps), default=None),
            "tokens_per_s": sum(r["tokens"] for r in steps) / seconds if seconds else None,
            "peak_memory_gib": summary.get("peak_memory_gib"), "wall_s": summary.get("wall_s"),
            "status": status, "reply": next(iter(summary.get("replies", {}).values()), None),
            "prompt": next(iter(summary.get("replies", {})), None)}


def table_cells(r: dict) -> list[str]:
    """One run's row of the table, as text; '-' where a figure does not exist."""
    fmt = lambda key, spec: "-" if r.get(key) is None else format(r[key], spec)
    reply = "-" if r.get("reply") is None else " ".join(r["reply"].split())
    return [r["run"], str(r.get("steps", 0)), fmt("final_loss", ".4f"), fmt("best_val_loss", ".4f"),
            fmt("best_val_step", "d"), fmt("grad_norm_max", ".4g"), fmt("tokens_per_s", ".0f"),
            fmt("peak_memory_gib", ".2f"), fmt("wall_s", ".1f"), r["status"], reply]


def reply_prompt(cfg, results: list[dict]) -> str | None:
    if cfg.sample_prompts is None:  # the runs answered their validation data's first prompt
        return next((r["prompt"] for r in results if r.get("prompt")), None)
    path = Path(cfg.sample_prompts)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return lines[0] if lines else None


def write_markdown(path: Path, cfg, results: list[dict]):
    """sweep.md: what was swept, what stayed fixed, what the columns mean, and the table."""
    defaults, swept = asdict(type(cfg)()), parse_sweep(cfg.sweep, cfg)
    fixed = [f"{k}={value_text(k, v)}" for k, v in asdict(cfg).items()
             if v != defaults[k] and k not in swept and k not in NOT_SWEPT]
    prompt = reply_prompt(cfg, results)
    lines = [f"# Sweep: {cfg.sweep}", "",
             f"- other settings: {' '.join(fixed) or 'none'} (the rest at train.py's defaults)",
             f"- {len(results)} runs of train.py, each in its directory under {cfg.output_dir}/ with its "
             f"settings.json, metrics.jsonl, summary.json, train.log and TensorBoard logs; "
             f"`tensorboard --logdir {cfg.output_dir}` shows all runs as series of the same plots",
             "- final loss: the train loss of the last step; tokens/s: over all training steps; peak mem: "
             "CUDA allocations, or on the CPU the resident set of the run's process",
             "- reply: " + ("none (no sample prompts)" if prompt is None
                            else f"the greedy reply to \"{prompt}\" after training"), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in table_cells(r)) + " |")
    path.write_text("\n".join(lines) + "\n")


def print_table(results: list[dict], cfg):
    from rich.console import Console
    from rich.table import Table
    prompt = reply_prompt(cfg, results)
    table = Table(title=f"sweep: {cfg.sweep}", caption=prompt and f"reply: to \"{prompt}\"")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("run", "status", "reply") else "right",
                         overflow="fold")
    for r in results:
        table.add_row(*table_cells(r))
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # a log file gets it unsqueezed
