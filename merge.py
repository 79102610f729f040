"""Merge a LoRA adapter into its base model: W' = W + scaling * B @ A (DoRA: then each row rescaled to
its magnitude, m * W' / ||W'||_row), one shard at a time.

    python merge.py --base MODEL --adapter ADAPTER_DIR --output OUT_DIR [--dtype bf16|fp16|fp32]
                    [--gguf OUT.gguf [--gguf-type f32|f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0]]
    python merge.py --base MODEL --adapter ADAPTER_DIR --adapter-gguf OUT.gguf [--base-gguf BASE.gguf]

--gguf also writes OUT.Modelfile for Ollama (`ollama create NAME -f OUT.Modelfile`), whose TEMPLATE
and SYSTEM prompt the model exactly as its chat template does (deploy/ollama.py). --adapter-gguf
merges nothing: it writes the adapter alone as llama.cpp's LoRA GGUF (deploy/adapter_gguf.py; llama.cpp
`--lora`, Ollama `ADAPTER`) with a Modelfile over --base-gguf (the base exported once, with
`python -m deploy.gguf export`), so one base file serves many fine-tunes.

OUT_DIR is a plain Hugging Face model directory (sharded safetensors, config, tokenizer, chat
template) that loads in transformers, in `model.load.load_model`, and in anything else. Its
tokenizer files and chat template are the adapter's when it carries them (train.py saves the
template the run trained with, --template included, beside every adapter), else the base's.

Memory: the base is never built as a model. Each checkpoint tensor is read alone from its shard
(safetensors `safe_open`), merged in float32 if an adapter module targets it, cast, and buffered
until the output shard is full (--max-shard-size), which is then written. The peak is about one
output shard plus the adapter, whatever the model's size. A QLoRA adapter (trained on an NF4
base) is merged onto the full-precision checkpoint, as it must be: NF4 was only storage.

Everything is validated before anything is written (destinations, base, adapter, that the adapter
holds only finite numbers, and that the base is the one it was trained on, by content: its
nanolora_base.json; --allow-other-base overrides), and OUT_DIR appears only when complete: the work
happens in a hidden sibling directory that is renamed at the end, and removed on any failure (a
full disk, a merged tensor that overflows the output dtype, Ctrl-C).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import SafetensorError

import lora
from data.tokenizer import TOKENIZER_FILES
from lora.adapter import QUANT_KEY, check_base, resolve_adapter_dir
from model.config import LlamaConfig
from model.errors import UserError, one_line, parse_size, run_command
from model.llama import Llama
from model.runtime import DTYPES, peak_memory_gib
from model.files import (PICKLE_SUFFIXES, check_keys, expected_shapes, read_safetensors, safetensors_files,
                         save_safetensors)
from deploy.adapter_gguf import ADAPTER_TYPES, adapter_pairs, default_base_gguf, export_adapter_gguf, missing_base_note
from deploy.gguf import OUT_TYPES, describe_modelfile, export_gguf
from model.gguf import GGUFError
from model.load import load_model, resolve_model_dir
from data.chat_template import TEMPLATE_FILE, saved_template
from deploy.ollama import modelfile_path

INDEX_FILE = "model.safetensors.index.json"
NOT_COPIED = (".safetensors", ".gguf") + PICKLE_SUFFIXES  # weights are written, never copied
CHECK_MAX_PARAMS = 2e9  # the probe check loads the model (in fp32): automatic only below this
PROBE_TOKENS = 24


class MergeError(UserError, RuntimeError):
    """Bad input to merge.py; the message names the flag or file."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="merge.py", description="Merge a LoRA adapter (PEFT format) into its base model.")
    p.add_argument("--base", required=True, help="base model directory (or hub id), safetensors")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + "
                   "adapter_model.safetensors), ours or peft's; a training run's directory: its final adapter")
    p.add_argument("--output", help="new directory for the merged model (required unless --adapter-gguf)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the merged weights "
                   "(default: each tensor keeps the base checkpoint's dtype)")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB",
                   help="largest output shard (default 2GB); also bounds merge.py's memory")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="compare merged and base+adapter logits on a probe input (default: on "
                   f"for models under {CHECK_MAX_PARAMS / 1e9:g}B parameters; it loads the model in fp32)")
    p.add_argument("--gguf", type=Path, help="also export the merged model to this GGUF file")
    p.add_argument("--gguf-type", choices=list(OUT_TYPES), default="f16",
                   help="GGUF tensor type (default f16; f32 is exact; q4_0..q5_1 are llama.cpp's block "
                   "quantizations; for k-quants, run llama-quantize on an f16 file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --gguf or --adapter-gguf "
                   "file and its Modelfile (never --output)")
    p.add_argument("--adapter-gguf", type=Path, help="write the adapter alone as a llama.cpp LoRA GGUF "
                   "(and its Modelfile), instead of merging")
    p.add_argument("--adapter-gguf-type", choices=list(ADAPTER_TYPES), default="f32",
                   help="tensor type of --adapter-gguf (default f32)")
    p.add_argument("--base-gguf", type=Path, help="the base model's GGUF, for the adapter's Modelfile "
                   "FROM line (default: BASE.gguf beside --adapter-gguf)")
    p.add_argument("--allow-other-base", action="store_true", help="apply the adapter to a base other than "
                   "the one it was trained on (its nanolora_base.json), with a warning")
    args = p.parse_args(argv)
    if args.output is None and args.gguf is not None:
        p.error("--gguf exports the merged model: it needs --output")
    if args.output is None and args.adapter_gguf is None:
        p.error("--output is required (or --adapter-gguf, to export the adapter alone)")
    return args


# ----------------------------------------------------------------------------- validate

def plan_merge(args) -> dict:
    """Everything the merge needs, checked before a byte is written: base files and keys, the
    adapter's (A, B) per base weight key, its scaling. Raises with a one-line message."""
    base_dir = resolve_model_dir(args.base)
    config = LlamaConfig.from_file(base_dir / "config.json")
    files = safetensors_files(base_dir)
    with torch.device("meta"):  # shapes only, no memory
        model = Llama(config)
    key_file = check_keys(files, expected_shapes(model))  # the base must be loadable as it is
    lora_cfg, modules, metadata = adapter_pairs(args.adapter, config, base_dir)  # checked: keys, shapes, finite
    check_base(args.adapter, base_dir, args.allow_other_base)  # the base it was trained on, by content
    pairs = {f"{name}.weight": pair for name, pair in modules.items()}  # A (r, in), B (out, r), DoRA (out,)
    n_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    return dict(base_dir=base_dir, key_file=key_file, config=config, lora_cfg=lora_cfg, pairs=pairs,
                modules=modules, quantized=metadata.get(QUANT_KEY), n_params=n_params)


def check_destinations(args):
    if args.output is not None:
        out = Path(args.output)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise MergeError(f"--output {out}: already exists and is not an empty directory")
    for flag in ("gguf", "adapter_gguf"):
        path = getattr(args, flag)
        name = "--" + flag.replace("_", "-")
        if path is None:
            continue
        if path.is_dir() or path.suffix != ".gguf":
            raise MergeError(f"{name} {path}: expected a file name ending in .gguf")
        for p in (path, modelfile_path(path)):  # the Modelfile is written beside the GGUF
            if p.exists() and not args.overwrite:
                raise MergeError(f"{name} {path}: {p} already exists (pass --overwrite to replace it)")
    if args.gguf is not None and args.gguf == args.adapter_gguf:
        raise MergeError(f"--gguf and --adapter-gguf are the same file {args.gguf}")


# ----------------------------------------------------------------------------- merge

def merged_tensors(plan: dict, dtype: torch.dtype | None, progress: Progress):
    """Yield (key, tensor) for every checkpoint tensor, merged where the adapter targets it."""
    task = progress.add_task("merging", total=len(plan["key_file"]))
    for key, f in plan["key_file"].items():  # shard by shard, in each shard's order
        progress.update(task, description=f"merging {f.name}")
        # Reopened for each tensor: closing unmaps the shard, so the pages already read do not
        # pile up in this process's memory (a 5 GB shard would otherwise end as 5 GB of RSS).
        with read_safetensors(f) as sf:
            t = sf.get_tensor(key)
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if key in plan["pairs"]:
            A, B, magnitude = plan["pairs"][key]
            t = lora.merge_weight(t, A, B, plan["lora_cfg"].scaling, magnitude)  # float32
        t = t.to(out_dtype)
        if t.is_floating_point() and not torch.isfinite(t).all():  # fp16 tops out at 65504
            raise MergeError(f"tensor {key} of {f}: NaN or inf once merged and cast to "
                             f"{str(out_dtype).removeprefix('torch.')} ({(~torch.isfinite(t)).sum()} of "
                             f"{t.numel()} values); try --dtype bf16 or fp32")
        yield key, t
        progress.advance(task)


def write_shards(items, out_dir: Path, max_bytes: int) -> int:
    """Write (key, tensor) items as safetensors shards of at most max_bytes each (a larger tensor
    gets a shard of its own), named as transformers does, with an index if there are several.
    Returns the number of shards."""
    parts, buffer, size = [], {}, 0  # parts: (keys, bytes) of each shard written
    for key, t in items:
        if buffer and size + t.nbytes > max_bytes:
            parts.append(_save_part(buffer, out_dir, len(parts)))
            buffer, size = {}, 0
        buffer[key], size = t, size + t.nbytes
    if buffer:
        parts.append(_save_part(buffer, out_dir, len(parts)))
    n = len(parts)
    names = ([f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1
             else ["model.safetensors"])
    for i, name in enumerate(names):  # the total is known only now
        (out_dir / f"part-{i}.safetensors").rename(out_dir / name)
    if n > 1:
        total = sum(size for _, size in parts)
        weight_map = {key: name for (keys, _), name in zip(parts, names) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return n


def _save_part(buffer: dict, out_dir: Path, i: int) -> tuple[list[str], int]:
    save_safetensors(buffer, out_dir / f"part-{i}.safetensors", metadata={"format": "pt"})
    return list(buffer), sum(t.nbytes for t in buffer.values())


def copy_side_files(base_dir: Path, out_dir: Path, dtype_name: str | None) -> list[str]:
    """Copy config, generation config, tokenizer and chat template files; set config's dtype."""
    copied = []
    for src in sorted(base_dir.iterdir()):
        if (not src.is_file() or src.name.startswith(".") or src.name == INDEX_FILE
                or src.name.endswith(NOT_COPIED)):
            continue
        shutil.copyfile(src, out_dir / src.name)  # follows the hub cache's symlinks
        copied.append(src.name)
    if dtype_name is not None:
        hf = json.loads((out_dir / "config.json").read_text())
        for key in [k for k in ("dtype", "torch_dtype") if k in hf] or ["torch_dtype"]:
            hf[key] = str(DTYPES[dtype_name]).removeprefix("torch.")
        (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return copied


def copy_trained_tokenizer(adapter_dir, out_dir: Path) -> list[str]:
    """Replace the base's tokenizer files with the adapter's when it carries the chat template it
    was trained with (train.py saves it, and the tokenizer files, beside every adapter): the merged
    model then prompts as its fine-tune was trained, in chat.py, transformers and the GGUF export.
    An adapter without one (a PEFT adapter from elsewhere) leaves the base's as they are."""
    if saved_template(adapter_dir) is None:
        return []
    names = [name for name in (*TOKENIZER_FILES, TEMPLATE_FILE) if (Path(adapter_dir) / name).is_file()]
    for name in names:
        shutil.copyfile(Path(adapter_dir) / name, out_dir / name)
    return names


@torch.no_grad()
def probe_check(plan: dict, adapter_dir, merged_dir: Path, dtype: torch.dtype | None) -> tuple[float, float]:
    """Max |logit| change the adapter makes, and max |logit| difference merged vs base+adapter.

    The base is read at the merged model's dtype, so both sides hold equally rounded weights; both
    run in float32, one model after the other (never two at once)."""
    vocab = plan["config"].vocab_size
    ids = ((torch.arange(PROBE_TOKENS) * 7919 + 11) % vocab)[None]  # (1, T): a fixed spread of ids
    model = load_model(plan["base_dir"], dtype or torch.float32).float()
    base = model(ids)
    lora.load_adapter(model, adapter_dir)
    adapted = model(ids)
    del model
    merged = load_model(merged_dir, torch.float32)(ids)
    return (adapted - base).abs().max().item(), (merged - adapted).abs().max().item()


def merge(args):
    check_destinations(args)
    args.adapter = str(resolve_adapter_dir(args.adapter))  # a training run's directory: its final adapter
    plan = plan_merge(args)
    if args.adapter_gguf is not None:
        write_adapter_gguf(plan, args)
    if args.output is None:
        return
    cfg, out = plan["lora_cfg"], Path(args.output)
    print(f"adapter: {len(plan['pairs'])} modules, r={cfg.r}, alpha={cfg.alpha:g}, "
          f"scaling={cfg.scaling:g}{' (rsLoRA)' if cfg.rslora else ''}{' (DoRA)' if cfg.dora else ''}")
    if plan["quantized"]:
        print(f"adapter was trained on an {plan['quantized'].upper()}-quantized base (QLoRA); merging "
              f"onto the full-precision weights of {plan['base_dir']}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True)) as progress:
            n = write_shards(merged_tensors(plan, dtype, progress), tmp, args.max_shard_size)
        copied = copy_side_files(plan["base_dir"], tmp, args.dtype)
        trained = copy_trained_tokenizer(args.adapter, tmp)
        print(f"wrote {n} shard{'s' * (n > 1)} ({args.dtype or 'dtype of the base'}); "
              f"copied {', '.join(copied)}" + (f"; from the adapter: {', '.join(trained)}" if trained else ""))
        run_check = args.check if args.check is not None else plan["n_params"] < CHECK_MAX_PARAMS
        if run_check:
            effect, diff = probe_check(plan, args.adapter, tmp, dtype)
            print(f"check: max |logit diff| merged vs base+adapter = {diff:.3g} on {PROBE_TOKENS} probe "
                  f"tokens, weights in {args.dtype or 'the base dtype'} (the adapter itself moves "
                  f"logits by up to {effect:.3g})")
        else:
            print(f"check: skipped ({plan['n_params'] / 1e9:.1f}B parameters; --check runs it, "
                  "loading the model in fp32)")
        if out.exists():
            out.rmdir()  # empty (checked above): may be replaced
        tmp.rename(out)
    except (OSError, SafetensorError) as e:  # a full disk: name the output, not our temp dir
        why = one_line(e)
        raise MergeError(f"--output {out}: not written ({why})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged model: {out}")
    if args.gguf is not None:
        write_gguf(out, args.gguf, args.gguf_type, args.overwrite)
    print(f"peak memory (max RSS): {peak_memory_gib() * 1024:.0f} MiB")


def write_gguf(out: Path, gguf_path: Path, gguf_type: str, overwrite: bool):
    """The merged model as a llama.cpp / Ollama GGUF (deploy/gguf.py), with its Modelfile beside it."""
    try:
        chat = export_gguf(out, gguf_path, gguf_type, overwrite=overwrite)
    except GGUFError as e:
        raise MergeError(f"--gguf {gguf_path}: {e} (the merged model is complete in {out})") from None
    print(f"gguf: {gguf_path} ({gguf_type})")
    print(describe_modelfile(gguf_path, chat))


def write_adapter_gguf(plan: dict, args):
    """The adapter alone as llama.cpp's LoRA GGUF, with a Modelfile (FROM the base's GGUF, ADAPTER)."""
    base_gguf = args.base_gguf or default_base_gguf(args.adapter_gguf, plan["base_dir"])
    try:
        chat = export_adapter_gguf(args.adapter, plan["base_dir"], args.adapter_gguf, base_gguf,
                                   args.adapter_gguf_type, overwrite=args.overwrite,
                                   adapter=(plan["lora_cfg"], plan["modules"]))
    except GGUFError as e:
        raise MergeError(f"--adapter-gguf {args.adapter_gguf}: {e}") from None
    print(f"adapter gguf: {args.adapter_gguf} ({args.adapter_gguf_type}), for the base {base_gguf}")
    print(describe_modelfile(args.adapter_gguf, chat))
    if note := missing_base_note(base_gguf, plan["base_dir"]):
        print(note)


def main(argv=None) -> int:
    return run_command("merge.py", merge, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
