"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    OUTPUT_DIR/checkpoints/step-000050/
        adapter/                 the LoRA adapter in PEFT format (loads in peft as it is)
        training_state.pt        optimizer, grad scaler and RNG states (tensors and plain types only,
                                 read back with weights_only=True: never unpickled code)
        trainer_state.json       step, data position (epoch, next micro-batch), schedule
        grpo_generation.safetensors   GRPO, mid-generation: every rank's completions of the
                                 generation (training/grpo_loop.py)

A checkpoint is written to `step-000050.tmp`, read back, and renamed when complete, so a crash or a
full disk mid-save leaves the previous checkpoint untouched (the next run removes any `.tmp` left by
a kill); only the newest `keep` checkpoints are kept. A checkpoint that fails to load is reported by
path, with the previous one offered.

Under torchrun every rank takes part in saving (FSDP2 shards are gathered whole) and rank 0 writes
the same files a single process does, plus each rank's RNG states (CPU, Python, and its own GPU's
alone); so a checkpoint resumes with any number of ranks or visible GPUs, DDP or FSDP (dropout
reproduces exactly when the number of ranks is the same).
Every rank reads the checkpoint on --resume: across machines, --output-dir must be shared.
"""

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import lora
from . import parallel
from model.errors import UserError, one_line

STATE_FILE = "training_state.pt"
TRAINER_FILE = "trainer_state.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read back; the message names it."""


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def rng_states() -> dict:
    """The random states this process draws from: torch's CPU generator, Python's and, once CUDA is
    in use, the generator of this process's own GPU (under torchrun, its LOCAL_RANK's). Only that
    one: a state for every visible GPU would not restore where fewer are visible."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_initialized():  # a CPU run on a GPU machine saves none (and creates no CUDA context)
        states["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return states


def set_rng_states(states: dict):
    """Restore rng_states(): the "cuda" state goes to this process's GPU. Checkpoints written before
    hold a list there, a state per GPU visible then: this GPU's entry is restored, if it has one."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = states.get("cuda")
    if cuda is None or not torch.cuda.is_initialized():  # saved on the CPU, or resumed there
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):
        if device >= len(cuda):
            return  # this GPU's index was not visible when the list was saved: nothing to restore
        cuda = cuda[device]
    if not isinstance(cuda, torch.Tensor):
        raise TypeError(f"the CUDA state is a {type(cuda).__name__}, not a tensor")
    torch.cuda.set_rng_state(cuda, device)


def restore_rng(state: dict):
    """This rank's RNG states from training_state.pt (rank 0's, when the number of ranks changed:
    dropout then draws differently from the interrupted run)."""
    try:
        per_rank = state.get("rng_ranks", [state["rng"]])
        set_rng_states(per_rank[parallel.rank()] if len(per_rank) == parallel.world_size() else state["rng"])
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{STATE_FILE}: RNG state: {type(e).__name__}: {e}") from None


def save_checkpoint(output_dir, step: int, model, lora_config, base_model: str, optimizer, scaler,
                    trainer_state: dict, keep: int, files: dict[str, str] | None = None,
                    extra: dict[str, dict] | None = None) -> Path:
    """Write the checkpoint of `step` atomically and delete all but the newest `keep`; `files` go
    beside its adapter (lora.save_adapter: the run's tokenizer files and chat template), `extra`
    ({file name: tensors}, GRPO's generation: training/grpo_loop.py) beside its other files.

    Under torchrun every rank must call this; rank 0 writes."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    optimizer_state = parallel.full_optimizer_state(optimizer)  # the single-process layout
    rng = parallel.gather_objects(rng_states())  # [rank 0's, rank 1's, ...]
    try:
        if parallel.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        parallel.save_adapter(model, lora_config, tmp / "adapter", base_model, files)
        if parallel.is_main():
            # through a Python file: a full disk then raises OSError (ENOSPC); a path gave a bare RuntimeError
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save({"optimizer": optimizer_state, "scaler": scaler.state_dict(), "rng": rng[0],
                            **({"rng_ranks": rng} if len(rng) > 1 else {})}, f)
            (tmp / TRAINER_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
            for name, tensors in (extra or {}).items():
                save_file(tensors, str(tmp / name))
            lora.read_adapter_tensors(tmp / "adapter")  # reads back whole, or names what is wrong
    except (OSError, UserError) as e:
        if parallel.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        previous = f"the previous checkpoint {kept[-1]} is kept" if kept else "there is no earlier checkpoint"
        raise CheckpointError(f"{final}: could not be written ({one_line(e)}); {previous}") from None
    if parallel.is_main():
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


def remove_partial_checkpoints(output_dir):
    """Delete `.tmp` checkpoint directories a killed process left half-written."""
    for tmp in (Path(output_dir) / "checkpoints").glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint (step, data position), read before the model is built."""
    try:
        state = json.loads((path / TRAINER_FILE).read_text())
        if not isinstance(state.get("step"), int):
            raise ValueError("no step")
        return state
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(unreadable(path, f"{TRAINER_FILE}: {e}")) from None


def unreadable(path: Path, reason: str) -> str:
    older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
    offer = (f"the previous checkpoint is {older[-1]}: move {path.name} away to resume from it" if older
             else "there is no earlier checkpoint: start over with --overwrite")
    return f"checkpoint {path} does not load ({reason}); {offer}"


def load_checkpoint(path: Path, model, optimizer, scaler) -> dict:
    """Restore adapter, optimizer, scaler and RNG from `path`; return the trainer state.

    Under torchrun every rank must call this (FSDP2 cuts its shards from the whole tensors)."""
    trainer_state = read_trainer_state(path)
    try:
        with parallel.full_lora(model):
            lora.load_adapter(model, path / "adapter")
        state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
        parallel.load_optimizer_state(optimizer, state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        restore_rng(state)
    except (OSError, UserError, RuntimeError, KeyError, ValueError) as e:  # truncated, foreign or torn files
        raise CheckpointError(unreadable(path, str(e).split("\n")[0].split(". ")[0])) from None
    return trainer_state
