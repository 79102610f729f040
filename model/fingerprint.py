"""Content fingerprints of model directories: sha256 over every byte, each file hashed once.

A model's fingerprint says "these exact weights, config and tokenizer". `--resume` compares it
with the run's (training/run_dir.py), and merge.py and chat.py compare it with the base an adapter was
trained on (nanolora_base.json, lora/adapter.py). Every byte counts: a merged model whose changed
weights sit in the middle of a shard (an adapter on o_proj and down_proj) is another model.

Hashing 15 GB of weights takes about a minute, so each weight file's hash is cached, keyed by its
absolute path, size and mtime_ns (a file rewritten in place is hashed again), in

    $NANOLORA_HASH_CACHE, or $NANOLORA_CACHE/file_sha256.json, or ~/.cache/nanolora/file_sha256.json

The first version of the fingerprint read each safetensors file's size and first and last MiB only;
`legacy_model_fingerprint` keeps it, to compare with run_config.json files written back then.
"""

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 24  # 16 MiB read at a time
SIDE_SUFFIXES = (".json", ".jinja", ".model")  # config, tokenizer, chat template: hashed whole, uncached
WEIGHT_SUFFIX = ".safetensors"  # hashed whole, cached
SHOW_PROGRESS = 1 << 30  # a file over 1 GiB is hashed behind a progress bar
LEGACY_EDGE = 1 << 20  # the old fingerprint's edges: the first and last MiB of each weight file


def file_sha256(path: Path, edge: int | None = None, progress=None) -> str:
    """sha256 of a file; with `edge`, of its size and its first and last `edge` bytes only (the
    legacy fingerprint). `progress(n)` is told of each block read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if edge is None:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
                if progress:
                    progress(len(block))
        else:
            size = os.fstat(f.fileno()).st_size
            h.update(str(size).encode())
            h.update(f.read(edge))
            f.seek(max(size - edge, 0))
            h.update(f.read(edge))
    return h.hexdigest()


def cache_path() -> Path:
    if os.environ.get("NANOLORA_HASH_CACHE"):
        return Path(os.environ["NANOLORA_HASH_CACHE"]).expanduser()
    return Path(os.environ.get("NANOLORA_CACHE") or "~/.cache/nanolora").expanduser() / "file_sha256.json"


def read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: hash again


def write_cache(path: Path, key: str, entry: dict):
    """Add one entry, atomically (re-read first: another process may have added its own)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = {**read_cache(path), key: entry}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one
    except OSError:
        pass  # a read-only home: the hash is still right, only computed again next time


def cached_file_sha256(path: Path) -> str:
    """sha256 of every byte of `path`, read from the cache when its path, size and mtime match."""
    path = Path(path).resolve()
    st = path.stat()
    cache = cache_path()
    hit = read_cache(cache).get(str(path))
    if (isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns
            and isinstance(hit.get("sha256"), str)):
        return hit["sha256"]
    if st.st_size > SHOW_PROGRESS:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
        columns = (TextColumn("hashing {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(path.name, total=st.st_size)
            digest = file_sha256(path, progress=lambda n: bar.advance(task, n))
    else:
        digest = file_sha256(path)
    write_cache(cache, str(path), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return digest


def fingerprinted_files(model_dir: Path) -> list[Path]:
    return [p for p in sorted(Path(model_dir).iterdir())
            if p.is_file() and (p.suffix in SIDE_SUFFIXES or p.suffix == WEIGHT_SUFFIX)]


def model_fingerprint(model_dir: Path) -> str:
    """One sha256 of a model directory: each config, tokenizer and weight file's name and the sha256
    of all its bytes (weight files' from the cache after the first time)."""
    h = hashlib.sha256()
    for p in fingerprinted_files(model_dir):
        h.update(p.name.encode())
        h.update((cached_file_sha256(p) if p.suffix == WEIGHT_SUFFIX else file_sha256(p)).encode())
    return h.hexdigest()


def legacy_model_fingerprint(model_dir: Path) -> str:
    """The first fingerprint: weight files by size and first and last MiB only (blind to changes in
    between). Only to compare with what old run_config.json files hold."""
    h = hashlib.sha256()
    for p in fingerprinted_files(model_dir):
        h.update(p.name.encode())
        h.update(file_sha256(p, LEGACY_EDGE if p.suffix == WEIGHT_SUFFIX else None).encode())
    return h.hexdigest()
