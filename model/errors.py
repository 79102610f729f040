"""Errors at the boundary: every nanolora command answers bad input with one line and an exit code.

Bad input (a missing or corrupt file, a wrong flag, a full disk) is the user's to fix, so it must
read as a sentence naming the file, line or flag, never as a traceback. The pieces that read or
write files raise `UserError` (each module subclasses it: ConfigError, LoadError, DataError,
LoRAError, ...), turning the libraries' own errors (safetensors, tokenizers, jinja2) into one
naming the file where they open it, because only there is the file known. Each entry point then
runs its work through `run_command`, the one place its errors become messages:

    UserError, OSError     -> "PROG: error: MESSAGE", exit 2
    KeyboardInterrupt      -> "PROG: interrupted", exit 130 (128 + SIGINT, as a shell reports it)

Anything else is a bug in nanolora and keeps its traceback.
"""

import argparse
import errno
import math
import sys


class UserError(Exception):
    """A problem with the user's files, flags or settings; the message names the culprit."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def one_line(e: Exception) -> str:
    """An error as one line. An OSError: its file first, then what went wrong (and, for a full
    disk, what to do); anything else: its message."""
    if not isinstance(e, OSError):
        return str(e)
    what = e.strerror or str(e)
    if e.errno in DISK_FULL:
        what += " (free some space, or write elsewhere)"
    files = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return f"{' -> '.join(files)}: {what}" if files else what


def run_command(prog: str, work, *args, codes: dict | None = None) -> int:
    """Run work(*args) and return its exit code (0 when it returns None); errors become one line.

    codes maps further exception types to the exit code they end with (their message is printed)."""
    codes = codes or {}
    try:
        return work(*args) or 0
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except tuple(codes) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return next(code for kind, code in codes.items() if isinstance(e, kind))
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2


# --- argparse types: a flag out of range is refused before any work, argparse naming the flag in
# its one-line error ("argument --top-p: expected a number in (0, 1], got 2.0") with exit code 2.

class Renamed(argparse.Action):
    """A flag that was renamed (--reference, now --textbook): still accepted, with a notice."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"note: {option_string} was renamed {new}; it means the same", file=sys.stderr)
        setattr(namespace, self.dest, True)


def at_least(low: int, high: int | None = None):
    """An argparse type: an integer >= low (and <= high, if given)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or high is not None and value > high:
            wanted = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {wanted}, got {value}")
        return value
    return parse


def between(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """An argparse type: a number in [low, high], either end open on request (nan is never in)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text}")
        return value
    return parse


positive_float = between(0, low_open=True)


def key_mismatches(expected: dict[str, tuple], found: dict[str, tuple], where: dict[str, str] | None = None
                   ) -> list[str]:
    """How the keys and shapes a file holds differ from those a model needs, as short phrases for a
    one-line error (a few names each). `where` names the file each key came from."""
    wrong = [f"{k}: shape {shape}" + (f" in {where[k]}" if where else "") + f", the model needs {expected[k]}"
             for k, shape in found.items() if k in expected and shape != expected[k]]
    problems = [_few(wrong, 2, sep="; ")] if wrong else []
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    return problems


def _few(items: list[str], n: int = 3, sep: str = ", ") -> str:
    return sep.join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def parse_size(text: str) -> int:
    """An argparse type: '2GB', '500MB', '1.5GiB' or a number of bytes -> bytes (at least one)."""
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    unit = next((u for u in units if t.endswith(u)), "B")
    try:
        size = float(t.removesuffix(unit)) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GB)") from None
    if not 1 <= size < 2**63:  # nan and inf fail too
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (at least one byte; try 2GB)")
    return int(size)
