"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    OUTPUT_DIR/checkpoints/step-000050/
        adapter/                 the LoRA adapter in PEFT format (loads in peft as it is)
        training_state.pt        optimizer, grad scaler and RNG states (tensors and plain types only,
                                 read back with weights_only=True: never unpickled code)
        trainer_state.json       step, data position (epoch, next micro-batch), schedule

A checkpoint is written to `step-000050.tmp` and renamed when complete, so a crash mid-save leaves
the previous checkpoint untouched; only the newest `keep` checkpoints are kept.

Under torchrun every rank takes part in saving (FSDP2 shards are gathered whole) and rank 0 writes
the same files a single process does, plus each rank's RNG state; so a checkpoint resumes with any
number of ranks, DDP or FSDP (dropout reproduces exactly when the number of ranks is the same).
Every rank reads the checkpoint on --resume: across machines, --output-dir must be shared.
"""

import json
import random
import shutil
from pathlib import Path

import torch

import lora
import parallel

STATE_FILE = "training_state.pt"
TRAINER_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(output_dir, step: int, model, lora_config, base_model: str, optimizer, scaler,
                    trainer_state: dict, keep: int) -> Path:
    """Write the checkpoint of `step` atomically and delete all but the newest `keep`.

    Under torchrun every rank must call this; rank 0 writes."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    optimizer_state = parallel.full_optimizer_state(optimizer)  # the single-process layout
    rng = parallel.gather_objects(rng_states())  # [rank 0's, rank 1's, ...]
    if parallel.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.save_adapter(model, lora_config, tmp / "adapter", base_model)
    if parallel.is_main():
        torch.save({"optimizer": optimizer_state, "scaler": scaler.state_dict(), "rng": rng[0],
                    **({"rng_ranks": rng} if len(rng) > 1 else {})}, tmp / STATE_FILE)
        (tmp / TRAINER_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        if final.exists():  # re-saving a step (a resumed run that stops where it started)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    parallel.barrier()  # the checkpoint is complete before any rank moves on
    return final


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first (half-written `.tmp` directories are ignored)."""
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def load_checkpoint(path: Path, model, optimizer, scaler) -> dict:
    """Restore adapter, optimizer, scaler and RNG from `path`; return the trainer state.

    Under torchrun every rank must call this (FSDP2 cuts its shards from the whole tensors)."""
    with parallel.full_lora(model):
        lora.load_adapter(model, path / "adapter")
    state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    parallel.load_optimizer_state(optimizer, state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    per_rank = state.get("rng_ranks", [state["rng"]])
    set_rng_states(per_rank[parallel.rank()] if len(per_rank) == parallel.world_size() else state["rng"])
    return json.loads((path / TRAINER_FILE).read_text())
