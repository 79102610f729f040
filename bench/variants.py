"""The demo run (`python train.py`: SmolLM2-135M-Instruct on examples/, 36 steps) once per LoRA
variant, side by side: validation loss before and after, how many of the sample prompts' replies
show the sample data's style, training speed and peak memory.

    python bench/variants.py                       # all five, into runs/bench-variants/
    python bench/variants.py --only plain dora     # some of them

Each variant runs as its own `python train.py` process (its own peak memory), one after the other,
with the demo's defaults and nothing else changed. Speed is the median tokens/s of the steps after
the first; peak memory is summary.json's (the process's peak resident set while training, on the
CPU; CUDA's peak allocation on a GPU).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import shows_style  # noqa: E402

VARIANTS = {
    "plain": [],
    "dora": ["--dora"],
    "pissa": ["--lora-init", "pissa"],
    "lora+ (16)": ["--loraplus-lr-ratio", "16"],
    "neftune (5)": ["--neftune-alpha", "5"],
}


def run(name: str, flags: list[str], out: Path) -> dict:
    # --overwrite: a previous bench's run there is replaced (train.py deletes only a run's own files)
    subprocess.run([sys.executable, "train.py", "--output-dir", str(out), "--overwrite", *flags], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    replies = summary.get("replies", {})
    return {"variant": name, "val before": rows[0]["val_loss"], "val after": summary["val_loss"],
            "in style": f"{sum(shows_style(r) for r in replies.values())}/{len(replies)}",
            "tok/s": statistics.median(speeds), "peak GiB": summary["peak_memory_gib"],
            "reply": next(iter(replies.values()), "")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=VARIANTS, help="run these variants only")
    p.add_argument("--output-root", type=Path, default=ROOT / "runs" / "bench-variants")
    args = p.parse_args()
    results = []
    for name in args.only or VARIANTS:
        slug = name.split()[0].replace("+", "plus")
        results.append(run(name, VARIANTS[name], args.output_root / slug))
        print(json.dumps(results[-1]), file=sys.stderr)
    print("| variant | val loss before | after | replies in style | tokens/s | peak GiB | first sample reply |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['val before']:.3f} | {r['val after']:.3f} | {r['in style']} | "
              f"{r['tok/s']:.0f} | {r['peak GiB']:.2f} | {r['reply'][:80]} |")


if __name__ == "__main__":
    main()
