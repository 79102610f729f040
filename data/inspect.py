"""See exactly which tokens train: `python -m data.inspect --model M --data F`.

    python -m data.inspect --model demo --data examples/train.json --n 2
    python -m data.inspect --model ./my-model --data chats.jsonl --mask last --json > tokens.jsonl

By default a rich view of the first N examples, trained tokens highlighted, with per-example
counts. With --json, one line per kept example in file order, unshuffled:
{"input_ids": [...], "labels": [...]} (labels -100 where masked).
"""

import argparse
import json
import sys

from model.errors import run_command

from .dataset import tokenize_file, trained_count
from .masking import IGNORE_INDEX, MASK_MODES
from .templates import BUILTIN_TEMPLATES
from .tokenizer import load_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory or hub id (for its tokenizer and template)")
    p.add_argument("--data", required=True, help="data file (.json, .jsonl, .csv)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="truncate examples to this many tokens")
    p.add_argument("--mask", choices=MASK_MODES, default="assistant", help="which tokens train")
    p.add_argument("--template", choices=list(BUILTIN_TEMPLATES), help="built-in template instead of the model's")
    p.add_argument("--n", type=int, default=None, help="examples to show (default: 3, or all with --json)")
    p.add_argument("--json", action="store_true", help="print input_ids and labels as JSON lines")
    return p.parse_args(argv)


def runs(ids: list[int], labels: list[int]):
    """(token ids, trained?) for each run of consecutive tokens with the same trained status, so
    that a character split over several byte tokens decodes whole."""
    out = []
    for i, y in zip(ids, labels):
        trained = y != IGNORE_INDEX
        if out and out[-1][1] == trained:
            out[-1][0].append(i)
        else:
            out.append(([i], trained))
    return out


def show(data, tok, n: int):
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    console = Console()
    for e in data.examples[:n]:
        text = Text()
        for ids, trained in runs(e["input_ids"], e["labels"]):
            text.append(tok.decode(ids), style="bold black on green" if trained else "dim")
        counts = (f"line {e['line']}: {len(e['input_ids'])} tokens, {trained_count(e['labels'])} "
                  f"trained{', TRUNCATED' if e['truncated'] else ''}")
        console.print(Panel(text, title=counts, title_align="left"))
    console.print(f"[green]green[/green]: trained tokens (mask={data.mask}); template: "
                  f"{tok.template_name}; stop tokens: "
                  f"{', '.join(tok.tokenizer.id_to_token(i) for i in sorted(tok.stop_ids))}")
    console.print(data.summary(), markup=False, highlight=False)


def inspect(args):
    from model import resolve_model_dir
    tok = load_tokenizer(resolve_model_dir(args.model), args.template)
    data = tokenize_file(args.data, tok, args.max_seq_len, args.mask, use_cache=False)
    if args.json:
        for e in data.examples[:args.n]:
            print(json.dumps({"input_ids": e["input_ids"], "labels": e["labels"]}))
        print(data.summary(), file=sys.stderr)
    else:
        show(data, tok, 3 if args.n is None else args.n)


def main(argv=None) -> int:
    return run_command("python -m data.inspect", inspect, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
