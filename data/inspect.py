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

An unpaired file (KTO's {"prompt", "completion", "label"} records) shows each record's completion,
a desirable one in green and an undesirable one in red (plain: ⟦ ⟧ and the panel's title say
which); the KL rows (each prompt with the previous record's completion) are counted in the summary,
not shown. --json: completion_ids, completion_labels, label (true: desirable). --mask does not apply
to it either (only the completions ever count).
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
from .unpaired import is_unpaired_file, tokenize_unpaired


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
GOOD, BAD = "bold black on green", "bold white on red"  # trained: chosen or desirable; rejected or undesirable


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


def panel(tok, ids, labels, title: str, style: str = GOOD, plain: bool = False):
    """The example's text, trained runs in `style` (plain: between ⟦ and ⟧), in a titled panel."""
    from rich.panel import Panel
    from rich.text import Text
    text = Text()
    for run, trained in runs(ids, labels):
        piece = tok.decode(run)
        text.append(f"{OPEN}{piece}{CLOSE}" if plain and trained else piece, style=style if trained else "dim")
    return Panel(text, title=f"{title}: {len(ids)} tokens, {trained_count(labels)} trained", title_align="left")


LEGENDS = {  # kind -> (legend with colour, legend in plain text); SFT's names its mask
    "pairs": ("[green]green[/green]: chosen reply, [red]red[/red]: rejected reply (the tokens DPO scores)",
              f"{OPEN} {CLOSE}: the reply DPO scores, in the chosen and the rejected panel"),
    "kto": ("[green]green[/green]: desirable completion, [red]red[/red]: undesirable completion (the tokens KTO "
            "scores)", f"{OPEN} {CLOSE}: the completion KTO scores, desirable or undesirable as the panel says"),
}


def panels(tok, e: dict, kind: str, plain: bool) -> list:
    """The panels of one example: its conversation, both sides of a pair, or its completion."""
    cut = ", TRUNCATED" if e["truncated"] else ""
    if kind == "pairs":
        return [panel(tok, e["chosen_ids"], e["chosen_labels"], f"line {e['line']} chosen{cut}", GOOD, plain),
                panel(tok, e["rejected_ids"], e["rejected_labels"], f"line {e['line']} rejected{cut}", BAD, plain)]
    if kind == "kto":
        label, style = ("desirable", GOOD) if e["desirable"] else ("undesirable", BAD)
        return [panel(tok, e["completion_ids"], e["completion_labels"], f"line {e['line']} {label}{cut}", style,
                      plain)]
    return [panel(tok, e["input_ids"], e["labels"], f"line {e['line']}{cut}", plain=plain)]


def show(data, tok, n: int, kind: str = "sft"):
    """kind: "sft" (conversations), "pairs" (DPO) or "kto" (unpaired completions)."""
    from rich.console import Console

    console = Console()
    plain = not console.is_terminal or console.no_color  # no colour reaches the reader
    for e in data.examples[:n]:
        for p in panels(tok, e, kind, plain):
            console.print(p)
    if kind == "sft":
        what = (f"{OPEN} {CLOSE}" if plain else "[green]green[/green]") + f": trained tokens (mask={data.mask})"
    else:
        what = LEGENDS[kind][plain]
    console.print(f"{what}; template: "
                  f"{tok.template_name}; stop tokens: "
                  f"{', '.join(tok.tokenizer.id_to_token(i) for i in sorted(tok.stop_ids))}")
    console.print(data.summary(), markup=False, highlight=False)


def inspect(args):
    from model import resolve_model_dir
    tok = load_tokenizer(resolve_model_dir(args.model), args.template)
    if is_preference_file(args.data):
        kind, data = "pairs", tokenize_pairs(args.data, tok, args.max_seq_len)
        keys = {k: k for k in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")}
    elif is_unpaired_file(args.data):
        kind, data = "kto", tokenize_unpaired(args.data, tok, args.max_seq_len)
        keys = {"completion_ids": "completion_ids", "completion_labels": "completion_labels", "label": "desirable"}
    else:
        kind, data = "sft", tokenize_file(args.data, tok, args.max_seq_len, args.mask, use_cache=False)
        keys = {"input_ids": "input_ids", "labels": "labels"}
    if args.json:
        for e in data.examples[:args.n]:
            print(json.dumps({out: e[k] for out, k in keys.items()}))
        print(data.summary(), file=sys.stderr)
    else:
        show(data, tok, 3 if args.n is None else args.n, kind)


def main(argv=None) -> int:
    return run_command("python -m data.inspect", inspect, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
