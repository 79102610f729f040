"""See exactly which tokens train: `python -m data.inspect --model M --data F`.

    python -m data.inspect --model demo --data examples/train.json --n 2
    python -m data.inspect --model ./my-model --data chats.jsonl --mask last --json > tokens.jsonl

By default a rich view of the first N examples, trained tokens highlighted, with per-example
counts; when the output is not a terminal (piped, redirected, NO_COLOR), trained spans are marked
in the text itself, between ⟦ and ⟧, since there is no colour to see. With --json, one line per kept example in file order, unshuffled:
{"input_ids": [...], "labels": [...]} (labels -100 where masked).

A preference file (DPO's {"prompt", "chosen", "rejected"} records) shows both sides of each pair,
the chosen and the rejected reply highlighted (--json: chosen_ids, chosen_labels, rejected_ids,
rejected_labels); --mask does not apply to it (only the replies ever count).
"""

import argparse
import json
import sys

from model.errors import at_least, run_command

from .dataset import tokenize_file, trained_count
from .masking import IGNORE_INDEX, MASK_MODES
from .preference import is_preference_file, tokenize_pairs
from .templates import BUILTIN_TEMPLATES
from .tokenizer import load_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory or hub id (for its tokenizer and template)")
    p.add_argument("--data", required=True, help="data file (.json, .jsonl, .csv)")
    p.add_argument("--max-seq-len", type=at_least(1), default=1024, help="truncate examples to this many tokens")
    p.add_argument("--mask", choices=MASK_MODES, default="assistant", help="which tokens train")
    p.add_argument("--template", choices=list(BUILTIN_TEMPLATES), help="built-in template instead of the model's")
    p.add_argument("--n", type=at_least(0), default=None, help="examples to show (default: 3, or all with --json)")
    p.add_argument("--json", action="store_true", help="print input_ids and labels as JSON lines")
    return p.parse_args(argv)


OPEN, CLOSE = "⟦", "⟧"  # around trained spans when there is no colour


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


def panel(tok, ids, labels, title: str, style: str = "bold black on green", plain: bool = False):
    """The example's text, trained runs in `style` (plain: between ⟦ and ⟧), in a titled panel."""
    from rich.panel import Panel
    from rich.text import Text
    text = Text()
    for run, trained in runs(ids, labels):
        piece = tok.decode(run)
        text.append(f"{OPEN}{piece}{CLOSE}" if plain and trained else piece, style=style if trained else "dim")
    return Panel(text, title=f"{title}: {len(ids)} tokens, {trained_count(labels)} trained", title_align="left")


def show(data, tok, n: int, pairs: bool = False):
    from rich.console import Console

    console = Console()
    plain = not console.is_terminal or console.no_color  # no colour reaches the reader
    for e in data.examples[:n]:
        cut = ", TRUNCATED" if e["truncated"] else ""
        if pairs:
            console.print(panel(tok, e["chosen_ids"], e["chosen_labels"], f"line {e['line']} chosen{cut}",
                                plain=plain))
            console.print(panel(tok, e["rejected_ids"], e["rejected_labels"], f"line {e['line']} rejected{cut}",
                                "bold white on red", plain))
        else:
            console.print(panel(tok, e["input_ids"], e["labels"], f"line {e['line']}{cut}", plain=plain))
    if plain:
        what = (f"{OPEN} {CLOSE}: the reply DPO scores, in the chosen and the rejected panel" if pairs
                else f"{OPEN} {CLOSE}: trained tokens (mask={data.mask})")
    else:
        what = ("[green]green[/green]: chosen reply, [red]red[/red]: rejected reply (the tokens DPO scores)" if pairs
                else f"[green]green[/green]: trained tokens (mask={data.mask})")
    console.print(f"{what}; template: "
                  f"{tok.template_name}; stop tokens: "
                  f"{', '.join(tok.tokenizer.id_to_token(i) for i in sorted(tok.stop_ids))}")
    console.print(data.summary(), markup=False, highlight=False)


def inspect(args):
    from model import resolve_model_dir
    tok = load_tokenizer(resolve_model_dir(args.model), args.template)
    pairs = is_preference_file(args.data)
    if pairs:
        data = tokenize_pairs(args.data, tok, args.max_seq_len)
        keys = ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
    else:
        data = tokenize_file(args.data, tok, args.max_seq_len, args.mask, use_cache=False)
        keys = ("input_ids", "labels")
    if args.json:
        for e in data.examples[:args.n]:
            print(json.dumps({k: e[k] for k in keys}))
        print(data.summary(), file=sys.stderr)
    else:
        show(data, tok, 3 if args.n is None else args.n, pairs)


def main(argv=None) -> int:
    return run_command("python -m data.inspect", inspect, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
