"""What a run writes as it goes, and how it reports it: metrics.jsonl (one line per step, and per
evaluation), TensorBoard, the log lines and --debug-grads' table (RunLog), and summary.json, how the
run ended (write_summary). The output directory they live in, one run per directory, and
--resume's check that a run is the same one are training/run_dir.py's.

    OUTPUT_DIR/metrics.jsonl     one line per step (and per evaluation); resumed: cut back to the
                                 checkpoint's step first, so no step is logged twice
    OUTPUT_DIR/tensorboard/      the same figures, and the eval sample replies
    OUTPUT_DIR/summary.json      how the run ended, finished or diverged (a sweep reads it)
"""

import json
import os
from pathlib import Path

from . import parallel, run_dir
from model.runtime import peak_memory_gib, peak_reserved_gib

# the preference objectives' per-step metrics (their loss module's `metrics`), drawn in TensorBoard
PREFERENCE_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
                      "logps_rejected", "log_odds_ratio", "log_odds_chosen", "nll_loss", "kl")
# GRPO's (training/grpo_loop.py), and each reward function's mean, reward_<function>
GRPO_METRICS = ("reward", "reward_std", "completion_length", "completion_length_max", "stopped_share",
                "clip_fraction", "clip_low", "clip_high")
COMPLETIONS_FILE = "completions.jsonl"  # GRPO: a few sampled completions of each generation, as text


class RunLog:
    """What rank 0 writes as a run goes: run_config.json (resumed: run_history.jsonl, with
    metrics.jsonl cut back to the checkpoint's step), metrics.jsonl, TensorBoard, log lines; on
    the other ranks, nothing. `resumed` is the checkpoint's step, or None for a fresh run."""

    def __init__(self, out: Path, console, total_steps: int, log_every: int, resumed: int | None,
                 settings: dict, defining: dict, changed: dict):
        self.console, self.total_steps, self.log_every, self.out = console, total_steps, log_every, out
        self.replies = {}  # prompt -> the newest sample reply; the final ones go into summary.json
        self.metrics = self.writer = parallel.Silent()
        if parallel.is_main():
            from torch.utils.tensorboard import SummaryWriter
            if resumed is not None:
                run_dir.record_resume(out, resumed, changed)
                cut_metrics(out / run_dir.METRICS_FILE, resumed)  # no step logged twice
                cut_metrics(out / COMPLETIONS_FILE, resumed)
            else:
                run_dir.record_fresh(out, settings, defining)
            self.metrics = (out / run_dir.METRICS_FILE).open("a" if resumed is not None else "w")
            # resumed: TensorBoard hides the events of steps after the checkpoint's (logged by the
            # interrupted run, to be run again); the checkpoint's own step stays
            self.writer = SummaryWriter(str(out / "tensorboard"),
                                        purge_step=resumed + 1 if resumed is not None else None)

    def eval(self, step: int, row: dict, replies: dict) -> dict:
        for k, v in row.items():
            self.writer.add_scalar(f"eval/{k}", v, step)
        for prompt, reply in replies.items():
            self.writer.add_text(f"samples/{prompt[:40]}", reply, step)
        self.replies = replies
        return row

    def first_eval(self, step: int, row: dict, replies: dict) -> dict:
        """The evaluation before training: its own line of metrics.jsonl."""
        self.eval(step, row, replies)
        if row:
            self.write({"step": step, **row})
            self.console.print(f"step {step}: {val_info(row)}")
        return row

    def step(self, row: dict):
        self.write(row)
        shown = ("loss", "lr", "grad_norm", "tokens_per_s", "max_memory_gib", "max_reserved_gib", "loss_scale",
                 *PREFERENCE_METRICS, *GRPO_METRICS)
        for k in row:
            if k in shown or k.startswith("reward_"):
                self.writer.add_scalar(f"train/{k}", row[k], row["step"])
        if self.log_every and row["step"] % self.log_every == 0 and not self.console.is_terminal:
            self.console.print(f"step {row['step']}/{self.total_steps}  {step_info(row)}" +
                               (f"  {val_info(row)}" if "val_loss" in row or "val_reward" in row else ""))

    def completions(self, rows: list[dict]):
        """GRPO: sampled completions ({step, prompt, completion, reward}) into completions.jsonl and TensorBoard."""
        if not parallel.is_main() or not rows:
            return
        with (self.out / COMPLETIONS_FILE).open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)  # as cut_metrics writes it back
        for row in rows:
            self.writer.add_text("completions", f"**{row['prompt']}**\n\n{row['completion']}\n\nreward "
                                 f"{row['reward']:.3f}", row["step"])

    def grads(self, step: int, rows: list[tuple[str, dict]]):
        print_grad_table(self.console, step, rows)
        for name, figures in rows:
            self.writer.add_scalars(f"grads/{name}", figures, step)

    def write(self, row: dict):
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def close(self):
        self.writer.close()
        self.metrics.close()


def step_info(row: dict) -> str:
    shown = (("reward", "reward", ".3f"), ("acc", "reward_accuracy", ".2f"), ("margin", "reward_margin", ".3f"),
             ("kl", "kl", ".3f"))
    dpo = "".join(f"{name} {row[k]:{form}}  " for name, k, form in shown if k in row)
    return (f"loss {row['loss']:.4f}  {dpo}lr {row['lr']:.2e}  grad {row['grad_norm']:.3f}  "
            f"{row['tokens_per_s']:.0f} tok/s")


def val_info(row: dict) -> str:
    if "val_loss" not in row:  # GRPO: the validation prompts' rewards
        return "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("val_reward"))
    dpo = f"  val_reward_accuracy {row['val_reward_accuracy']:.2f}" if "val_reward_accuracy" in row else ""
    return f"val_loss {row['val_loss']:.4f}{dpo}"


def print_grad_table(console, step, rows: list[tuple[str, dict]]):
    """--debug-grads' table: per LoRA module, the gradient norms of A, B (DoRA: m) and the update
    each step made relative to the tensor."""
    from rich.table import Table
    table = Table(title=f"LoRA gradients, step {step}", show_lines=False)
    keys = list(dict.fromkeys(k for _, figures in rows for k in figures))  # grad_A ... update_m
    heading = lambda k: f"|grad {k[5:]}|" if k.startswith("grad_") else f"|d{k[7:]}|/|{k[7:]}|"
    table.add_column("module", justify="left", overflow="fold")
    for k in keys:
        table.add_column(heading(k), justify="right")
    for name, figures in rows:
        table.add_row(name, *(f"{figures[k]:.3e}" if k in figures else "" for k in keys))
    console.print(table)


def write_summary(out: Path, **figures):
    """summary.json: how a run ended, finished or diverged (an interrupted run has none; a sweep reads it)."""
    if parallel.is_main():
        figures.update(peak_memory_gib=peak_memory_gib(), peak_reserved_gib=peak_reserved_gib())
        (out / run_dir.SUMMARY_FILE).write_text(json.dumps(figures, indent=2))


def cut_metrics(path: Path, step: int):
    """Keep the rows of steps up to `step` (the checkpoint's); drop later ones and a torn last line."""
    if not path.exists():
        return
    kept = [json.dumps(row) + "\n" for row in run_dir.read_rows(path) if row.get("step", step + 1) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)  # atomic: a crash here leaves the old file whole
