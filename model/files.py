"""A checkpoint's safetensors files, read strictly: which files, their keys and shapes against the
model's, one tensor (or some of its rows) at a time. Every failure is a LoadError naming the file.
And the one writer of safetensors files, so that each gets the mode of the files beside it.

Pickle checkpoints (.bin, .pt) are refused, never loaded: unpickling can run arbitrary code.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UserError, key_mismatches

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class LoadError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@contextmanager
def read_safetensors(path: Path):
    """`safe_open(path)`, with the library's errors about the file (cut short by a full disk or a
    killed download, not safetensors at all) raised as a LoadError naming it, whether they come
    on opening or from a `get_tensor` in the block."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from None


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None):
    """safetensors' save_file, then the mode any new file gets here (0666 less the umask, 0644 as a
    rule): the library creates its files 0600, unlike the JSON and tokenizer files written beside them."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask, read from /proc/self/status (Linux) without changing it; elsewhere set
    and put back at once (the only way POSIX offers)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards of the index, or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise LoadError(f"{index}: lists shards that are not there: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LoadError(f"{model_dir}: only pickle checkpoints ({', '.join(pickles)}); nanolora loads "
                        "safetensors only, since unpickling can run arbitrary code. Convert the "
                        "checkpoint to safetensors first.")
    raise LoadError(f"{model_dir}: no *.safetensors files")


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    """Checkpoint keys and shapes the model needs (a tied lm_head is not stored in checkpoints)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_keys(files: list[Path], expected: dict[str, tuple]) -> dict[str, Path]:
    """Compare the checkpoint's keys and shapes with the model's; return key -> file."""
    found, shapes = {}, {}
    for f in files:
        with read_safetensors(f) as sf:
            for key in sf.keys():
                found[key], shapes[key] = f, tuple(sf.get_slice(key).get_shape())
    problems = key_mismatches(expected, shapes, {k: f.name for k, f in found.items()})
    if problems:
        raise LoadError(f"{files[0].parent}: checkpoint does not fit the config: " + "; ".join(problems))
    return found


def checkpoint_tensors(model_dir: Path):
    """(key, file) for every tensor of the checkpoint, file by file."""
    for f in safetensors_files(model_dir):
        with read_safetensors(f) as sf:
            keys = list(sf.keys())
        yield from ((key, f) for key in keys)


def read_tensor(f: Path, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor of a safetensors file, or only its rows [start, end) (dim 0), read from disk.

    The file is reopened for each tensor: closing unmaps it, so the pages already read do not stay
    in this process's memory (a whole shard of them, on top of the model, otherwise)."""
    with read_safetensors(f) as sf:
        if rows is None:
            return sf.get_tensor(key)
        return sf.get_slice(key)[rows[0]:rows[1]]
