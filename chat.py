"""Chat with a model, a merged model, or a base model plus a LoRA adapter.

    python chat.py --model runs/demo/merged                      # interactive, multi-turn
    python chat.py --model demo --adapter runs/demo/adapter --prompt "How do I boil an egg?"
    python chat.py --model demo --adapter runs/demo/adapter --compare   # base and adapted side by side

The prompt is built with the same chat template code as training (with --adapter, the template
the adapter was trained with, its chat_template.jinja, when it has one), generation stops at every
end-of-turn token of the model (not only eos), and a KV cache runs the prompt once (prefill), then
one token per step (decode). With --prompt only the reply goes to stdout; all else goes to stderr.
Interactive chat reads stdin: end it with EOF (Ctrl-D) or /exit; Ctrl-C quits too (exit 130).
"""

import argparse
import sys
from contextlib import nullcontext

import torch

import data
import lora
from deploy.chat import reply
from model import DEMO_MODEL, load_model, resolve_model_dir
from model.errors import Renamed, UserError, at_least, between, positive_float, run_command
from model.fused import textbook_path
from model.runtime import choose_device, choose_dtype

STDIN_CLOSED = "stdin is closed; pass --prompt TEXT for a one-shot reply"


class ChatError(UserError):
    """Bad input to chat.py that is not in a file: no stdin to chat on."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="chat.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEMO_MODEL, help="model directory or hub id ('demo': SmolLM2)")
    p.add_argument("--adapter", help="a PEFT-format LoRA adapter directory, applied unmerged (a training "
                   "run's directory: its final adapter)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--prompt", help="answer this one prompt, print the reply on stdout and exit")
    p.add_argument("--compare", action="store_true", help="answer with the base and the adapted model")
    p.add_argument("--template", help="built-in chat template instead of the model's own (or the "
                   "one the adapter was trained with)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256)
    p.add_argument("--temperature", type=between(0), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=at_least(0), default=0, help="0: no top-k cut")
    p.add_argument("--top-p", type=between(0, 1, low_open=True), default=1.0, help="in (0, 1]; 1: no cut")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="1: none")
    p.add_argument("--seed", type=at_least(0, 2**64 - 1), default=0)  # torch.manual_seed's range
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--textbook", action="store_true",
                   help="run the textbook twins of the fast pieces (model/fused.py): same replies, slower")
    p.add_argument("--reference", action=Renamed, nargs=0, dest="textbook", help=argparse.SUPPRESS)
    p.add_argument("--allow-other-base", action="store_true", help="apply --adapter to a base other than the "
                   "one it was trained on (its nanolora_base.json), with a warning")
    args = p.parse_args(argv)
    if args.compare and not args.adapter:
        p.error("--compare needs --adapter")
    return args


def load(args):
    """The model (with the adapter applied, unmerged) and its chat tokenizer."""
    device = choose_device(args.device)
    dtype = choose_dtype(args.precision, device)
    model_dir = resolve_model_dir(args.model)
    if args.adapter:  # before the model loads: the base it was trained on, by content
        lora.adapter.check_base(args.adapter, model_dir, args.allow_other_base)
    model = load_model(model_dir, dtype=dtype, device=device)
    if args.adapter:
        lora.load_adapter(model, args.adapter)
        for p in model.parameters():  # adapter weights join the base in its dtype for inference
            p.data = p.data.to(dtype)
    return model, chat_tokenizer(model_dir, args)


def chat_tokenizer(model_dir, args) -> data.ChatTokenizer:
    """The model's tokenizer, with the template the adapter was trained with (its chat_template.jinja)
    unless --template names one; a --template other than the adapter's gets a warning."""
    tok = data.load_tokenizer(model_dir, args.template, args.adapter)
    if warning := data.tokenizer.template_warning(tok, args.template, args.adapter):
        print(warning, file=sys.stderr)
    return tok


def speed_line(stats) -> str:
    return (f"[{stats['prompt_tokens']} prompt tokens, prefill {stats['prefill_tok_s']:.0f} tok/s; "
            f"{stats['new_tokens']} new tokens, decode {stats['decode_tok_s']:.1f} tok/s]")


def one_shot(model, tok, args):
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    if args.compare:
        with lora.adapter_disabled(model):
            base_text, _ = reply(model, tok, messages, args)
        print(f"--- base ---\n{base_text}\n--- adapted ---", file=sys.stderr)
    text, stats = reply(model, tok, messages, args)
    print(text)
    print(speed_line(stats), file=sys.stderr)


def read_line() -> str | None:
    """The next line of stdin (prompting on a terminal), or None at EOF. Ctrl-C is left to
    run_command (exit 130); a stdin that is closed or gone is a ChatError, not a traceback."""
    try:
        return input("you> " if sys.stdin.isatty() else "")
    except EOFError:
        return None
    # sys.stdin None (started with `<&-`): AttributeError here, RuntimeError "lost sys.stdin" in
    # input(); a closed file object: ValueError; a terminal gone away: OSError.
    except (AttributeError, RuntimeError, ValueError, OSError):
        raise ChatError(STDIN_CLOSED) from None


def interactive(model, tok, args):
    from rich.console import Console
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    system = args.system
    history = []
    err.print("[dim]/reset clears the history, /system TEXT sets the system prompt, /exit quits[/dim]")
    while True:
        line = read_line()
        if line is None:  # EOF (Ctrl-D, or the end of piped input): a normal end
            return
        if not line.strip():
            continue
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = []
            err.print("[dim](history cleared)[/dim]")
            continue
        if line.startswith("/system"):
            system, history = line[len("/system"):].strip() or None, []
            err.print(f"[dim](system prompt set; history cleared)[/dim]")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        targets = [("base", lora.adapter_disabled(model)), ("adapted", nullcontext())] if args.compare \
            else [("assistant", nullcontext())]
        for label, context in targets:
            out.print(f"{label}> ", end="", style="bold cyan" if out.is_terminal else None)
            with context:
                text, stats = reply(model, tok, messages, args,
                                    on_text=lambda piece: out.print(piece, end="", markup=False))
            out.print()
        history.append({"role": "assistant", "content": text})  # the adapted model's reply
        err.print(f"[dim]{speed_line(stats)}[/dim]")


def chat(args):
    if args.prompt is None and sys.stdin is None:  # before the minutes a large model takes to load
        raise ChatError(STDIN_CLOSED)
    if args.adapter:  # a training run's directory: its final adapter
        args.adapter = str(lora.adapter.resolve_adapter_dir(args.adapter))
    model, tok = load(args)
    with torch.no_grad(), textbook_path(args.textbook):
        if args.prompt is not None:
            one_shot(model, tok, args)
        else:
            interactive(model, tok, args)


def main(argv=None) -> int:
    return run_command("chat.py", chat, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
