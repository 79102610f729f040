"""A run's output directory: one run per directory, never replaced or mixed with another unless asked.

    OUTPUT_DIR/.lock             pid and host of the process training here (one at a time)
    OUTPUT_DIR/run_config.json   every resolved setting of the run, and fingerprints of its inputs
    OUTPUT_DIR/run_history.jsonl one line per --resume: what changed (only settings that may change)
    OUTPUT_DIR/metrics.jsonl     one line per step (and per evaluation): metrics.RunLog, with TensorBoard
    OUTPUT_DIR/summary.json      how the run ended, finished or diverged (metrics.write_summary)

A fresh run refuses a directory that holds another run's files unless --overwrite is passed (then
it deletes them: those files only); the leftovers of a run stopped before it finished a step (no
checkpoint, no adapter, no step in metrics.jsonl) are no run: they are replaced, and `--resume` there
starts from step 0. `--resume` continues the run only if every setting that defines
it is the same: the content of the data and the base model (their paths may move), the tokenizer
and template, the LoRA shape, the batch geometry, seed, schedule, mask, length, precision and
quantization. The rest (how long, how often to log, evaluate and save, the device, the number of
ranks as long as the global batch stays: the settings whose fields say may_change) may change, and the change is written to the history,
never over run_config.json. metrics.jsonl is cut back to the checkpoint's step, so no step is
logged twice (TensorBoard hides the later steps' events), and elapsed_s goes on from the checkpoint's.

The base model is compared by a sha256 of every byte (model/fingerprint.py). A run_config.json
written when the fingerprint read only each weight file's first and last MiB holds model_sha256
instead of model_content_sha256: that run is compared by the old fingerprint, recomputed, so it
still resumes (with the old fingerprint's blindness to changes mid-file).
"""

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import lora
from model.errors import UserError
from model.fingerprint import file_sha256, legacy_model_fingerprint, model_fingerprint

LOCK_FILE = ".lock"
CONFIG_FILE = "run_config.json"
HISTORY_FILE = "run_history.jsonl"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# What a run writes; a fresh run refuses a directory holding any of them (and --overwrite deletes them).
RUN_FILES = (CONFIG_FILE, HISTORY_FILE, METRICS_FILE, SUMMARY_FILE, "checkpoints", "adapter", "tensorboard")
MODEL_KEY = "model_content_sha256"  # the base model's fingerprint in run_config.json's "defining"
LEGACY_MODEL_KEY = "model_sha256"  # ...as written before every byte was hashed (edges only)


class RunDirError(UserError):
    """An output directory that holds something else, or a resume that would mix two runs."""


# -----------------------------------------------------------------------------
# one run at a time

@contextmanager
def locked(out: Path, owner: bool = True):
    """Hold OUTPUT_DIR/.lock while the run lasts. A lock whose process is gone (killed, crashed
    machine of the same name) is stale and taken over; a live one refuses. Only `owner` (rank 0
    under torchrun: the ranks of one job share the directory) takes it."""
    if not owner:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path, me = out / LOCK_FILE, {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # atomic: one process wins
        except FileExistsError:
            holder = read_lock(path)
            if holder is not None and lock_is_live(holder):
                raise RunDirError(f"--output-dir {out}: in use by process {holder['pid']} on {holder['host']} "
                                  f"({path}); wait for it to end, or choose another --output-dir") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:
        raise RunDirError(f"--output-dir {out}: could not take {path}")
    try:
        yield
    finally:
        if read_lock(path) == me:
            path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):  # failed before writing anything: leave no trace
            out.rmdir()


def read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None  # half-written or unreadable: its writer died between open and write


def lock_is_live(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process (a shared file system): cannot tell, so assume live
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# -----------------------------------------------------------------------------
# a fresh run: an empty directory, or --overwrite

def existing_run_files(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def never_stepped(out: Path) -> bool:
    """Whether `out` holds only what a run stopped before its first step leaves (run_config.json,
    metrics.jsonl with at most the evaluation before training, tensorboard/): no checkpoint, no
    adapter, no summary, no finished step. Those leftovers are no run to keep."""
    found = set(existing_run_files(out))
    if not found or found & {"adapter", SUMMARY_FILE} or any((out / "checkpoints").glob("step-*")):
        return False
    return not any(row.get("step", 0) > 0 for row in read_rows(out / METRICS_FILE))


def claim_fresh(out: Path, overwrite: bool):
    """Refuse a directory that holds a run (naming what is there), or with --overwrite clear it; the
    leftovers of a run that never finished a step are cleared without asking."""
    found = existing_run_files(out)
    if not found:
        return
    if not overwrite and not never_stepped(out):
        ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))  # none if no such directory
        shown = [f"{n}/ ({', '.join(ckpts[-2:])})" if n == "checkpoints" and ckpts else n for n in found]
        raise RunDirError(f"--output-dir {out}: already holds a run ({', '.join(shown)}); pass --resume to "
                          "continue it, --overwrite to replace it, or choose another --output-dir")
    for name in found:
        target = out / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()


# -----------------------------------------------------------------------------
# what defines a run, and --resume's check that it is the same one

def may_change(cfg) -> set[str]:
    """The settings that may differ on --resume (how long, how often, on what hardware): their
    fields say may_change (training/settings.py, where the conditions on some of them are)."""
    return {f.name for f in fields(cfg) if f.metadata["may_change"]}


def defining_settings(cfg, model_dir: Path, val_data, dtype, world_size: int) -> dict:
    """The settings a resumed run must share with its checkpoint's, inputs as content hashes."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in may_change(cfg)}
    settings.update(data_sha256=file_sha256(Path(cfg.data)),
                    val_data_sha256=file_sha256(Path(val_data)) if val_data else None,
                    dtype=str(dtype), global_micro_batch=cfg.micro_batch_size * world_size)
    if cfg.init_adapter:  # the adapter the run starts from, by content (its weights and config)
        adapter = lora.adapter.resolve_adapter_dir(cfg.init_adapter)
        settings["init_adapter_sha256"] = [file_sha256(adapter / name) for name in
                                           (lora.adapter.WEIGHTS_FILE, lora.adapter.CONFIG_FILE)]
    settings[MODEL_KEY] = model_fingerprint(model_dir)  # every byte, cached: a model is hashed once
    return settings


def record_fresh(out: Path, settings: dict, defining: dict):
    """run_config.json of a fresh run: every resolved setting, plus what --resume compares."""
    (out / CONFIG_FILE).write_text(json.dumps({**settings, "defining": defining}, indent=2) + "\n")


def check_resume(out: Path, defining: dict, settings: dict, model_dir: Path) -> dict:
    """Refuse a resume whose defining settings differ from the run's, listing each difference (the
    base model named by its directory); return the settings that did change ({name: [before, now]}),
    the ones allowed to."""
    path = out / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"--resume: {path} is missing, so nothing says which run the checkpoints "
                          "belong to; start over with --overwrite") from None
    except ValueError as e:
        raise RunDirError(f"--resume: {path}: not valid JSON ({e})") from None
    # A run_config.json written before fingerprints existed: compare the plain settings it has.
    before = saved.get("defining") or {k: saved[k] for k in defining if k in saved}
    if LEGACY_MODEL_KEY in before and MODEL_KEY not in before:  # the old fingerprint: compare like with like
        defining = {**{k: v for k, v in defining.items() if k != MODEL_KEY},
                    LEGACY_MODEL_KEY: legacy_model_fingerprint(model_dir)}
    differ = [f"{k} {show(before[k])} -> {show(v)}" + (f" (the model in {model_dir} is not the run's base)"
                                                       if k in (MODEL_KEY, LEGACY_MODEL_KEY) else "")
              for k, v in defining.items() if k in before and before[k] != v]
    if differ:
        verb = "settings differ" if len(differ) > 1 else "setting differs"
        raise RunDirError(f"--resume: {len(differ)} {verb} from the run in {out}: {'; '.join(differ)}. "
                          "A resumed run must be the same run: pass its settings (see run_config.json), "
                          "or start a new one in another --output-dir")
    previous = {**saved, **{k: v for entry in read_history(out) for k, (_, v) in entry["changed"].items()}}
    return {k: [previous.get(k), v] for k, v in settings.items() if k != "resume" and previous.get(k) != v}


def record_resume(out: Path, step: int, changed: dict):
    """Append the resume to run_history.jsonl: at which step, and what changed."""
    with open(out / HISTORY_FILE, "a") as f:
        f.write(json.dumps({"resumed_at_step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "changed": changed}) + "\n")


def show(value) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else json.dumps(value)  # a hash: its start


def read_history(out: Path) -> list[dict]:
    path = out / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def read_rows(path: Path) -> list[dict]:
    """The rows of metrics.jsonl (none if it is missing), skipping a line torn by a kill mid-write."""
    rows = []
    for line in path.read_text().split("\n") if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # empty, or torn by a kill mid-write
        if isinstance(row, dict):
            rows.append(row)
    return rows


def elapsed_at(out: Path, step: int) -> float:
    """elapsed_s of `step`'s row in metrics.jsonl (0 if there is none): where a resumed run's clock
    continues, so elapsed_s runs on across resumes."""
    return max([row.get("elapsed_s", 0.0) for row in read_rows(out / METRICS_FILE) if row.get("step") == step],
               default=0.0)
