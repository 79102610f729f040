"""A LoRA adapter alone as a GGUF, in llama.cpp's adapter layout (convert_lora_to_gguf's output).

llama.cpp applies it at load time (`--lora FILE`, llama-cpp-python's `lora_path`) and Ollama with
a Modelfile's `ADAPTER` line, so one base GGUF serves many fine-tunes:

    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = scaling * r
    blk.N.attn_q.weight.lora_a   A (r, in), as PEFT stores it      (GGUF shape [in, r])
    blk.N.attn_q.weight.lora_b   B (out, r)                         (GGUF shape [r, out])

llama.cpp scales each pair by alpha / r (r read from the tensors), so writing alpha = scaling * r
gives plain LoRA's alpha / r and rsLoRA's alpha / sqrt(r) alike. The "llama" architecture's q/k
rows are in llama.cpp's interleaved order (model/gguf.py's permute_qk): the rows of W = B @ A are
the rows of B, so only B is permuted. DoRA (a per-row magnitude after the update) has no llama.cpp
equivalent and is refused; merge it instead.

    python -m deploy.adapter_gguf export ADAPTER_DIR OUT.gguf [--base MODEL_DIR] [--base-gguf BASE.gguf]
                               [--type f32|f16] [--overwrite]

OUT.Modelfile goes beside it: FROM the base's GGUF (export the base once, `python -m deploy.gguf
export MODEL_DIR BASE.gguf`), ADAPTER OUT.gguf, and the TEMPLATE and SYSTEM of the chat template
the adapter was trained with (its chat_template.jinja; the base's if it has none; deploy/ollama.py).
"""

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

from data.chat_template import saved_template
from lora.adapter import (PEFT_PREFIX, WEIGHTS_FILE, check_adapter_tensors, check_base, read_adapter_config,
                          read_adapter_tensors, resolve_adapter_dir)
from lora.config import LoRAError
from lora.inject import inject_lora, lora_modules
from model import gguf as model_gguf
from model.config import LlamaConfig
from model.errors import run_command
from model.llama import Llama
from model.load import resolve_model_dir

from . import gguf as gguf_export, ollama

ADAPTER_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}


def adapter_pairs(adapter_dir, config: LlamaConfig, base_name) -> tuple:
    """(LoRAConfig, {module name: (A (r, in), B (out, r), DoRA magnitude (out,) or None)}, metadata)
    of an adapter, checked against a model of `config` (keys, shapes, finite values)."""
    cfg = read_adapter_config(adapter_dir)
    tensors, metadata = read_adapter_tensors(adapter_dir)
    with torch.device("meta"):  # shapes only, no memory
        model = Llama(config)
    try:
        inject_lora(model, cfg)
    except LoRAError as e:
        raise LoRAError(f"{adapter_dir}: does not fit the base {base_name}: {e}") from None
    source = Path(adapter_dir) / WEIGHTS_FILE
    check_adapter_tensors(model, tensors, source)
    for key, t in tensors.items():  # a NaN in A or B spreads through B @ A into every output of the layer
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LoRAError(f"{source}: tensor {key} holds NaN or inf ({(~torch.isfinite(t)).sum()} of "
                            f"{t.numel()} values; a diverged run?); refusing to use it")
    pairs = {name: (tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"],
                    tensors.get(f"{PEFT_PREFIX}{name}.lora_magnitude_vector"))
             for name in lora_modules(model)}
    return cfg, pairs, metadata


def export_adapter_gguf(adapter_dir, base_dir, out_path, base_gguf=None, out_type: str = "f32",
                        overwrite: bool = False, adapter: tuple | None = None) -> ollama.OllamaChat:
    """Write the adapter as a llama.cpp LoRA GGUF, and OUT.Modelfile (FROM base_gguf, ADAPTER out).

    base_dir: the base model directory the adapter was trained on (its config gives the tensor
    names and q/k order; its chat template the Modelfile's TEMPLATE, unless the adapter carries
    the one it was trained with, chat_template.jinja, as train.py's do). base_gguf: the base's GGUF
    for the Modelfile's FROM line (default: <base dir name>.gguf beside out_path). adapter: its
    (LoRAConfig, pairs) when the caller has read them already (adapter_pairs)."""
    out_path = Path(out_path)
    base_dir = resolve_model_dir(base_dir)
    base_gguf = Path(base_gguf) if base_gguf is not None else default_base_gguf(out_path, base_dir)
    modelfile = ollama.modelfile_path(out_path)
    if out_type not in ADAPTER_TYPES:
        raise LoRAError(f"type {out_type!r}: choose one of {', '.join(ADAPTER_TYPES)}")
    if out_path.suffix != ".gguf":
        raise LoRAError(f"{out_path}: expected a file name ending in .gguf")
    gguf_export.check_outputs([out_path, modelfile], overwrite)
    config = LlamaConfig.from_file(base_dir / "config.json")
    cfg, pairs = adapter or adapter_pairs(adapter_dir, config, base_dir)[:2]
    if cfg.dora:
        raise LoRAError(f"{adapter_dir}: a DoRA adapter has no llama.cpp form (its magnitude rescales the "
                        "merged rows); merge it with merge.py --gguf instead")
    names = model_gguf.tensor_names(config)
    tensors = []  # (GGUF name, numpy array), all built before anything is written
    for module, (A, B, _) in pairs.items():
        weight = f"{module}.weight"
        if weight == "lm_head.weight" and config.tie_word_embeddings:
            raise LoRAError(f"{adapter_dir}: adapts lm_head, which this base ties to its embeddings; "
                            "llama.cpp has no separate output matrix to adapt (merge it instead)")
        if weight not in names or names[weight] == "token_embd.weight":
            raise LoRAError(f"{adapter_dir}: module {module} has no llama.cpp LoRA form")
        B = B.float().numpy()
        if heads := model_gguf.permuted_heads(names[weight], config):
            B = model_gguf.permute_qk(B, heads)
        tensors += [(f"{names[weight]}.lora_a", A.float().numpy()), (f"{names[weight]}.lora_b", B)]
    if base_gguf.exists():
        needed = {names[f"{m}.weight"]: (A.shape[1], B.shape[0]) for m, (A, B, _) in pairs.items()}
        check_base_gguf(base_gguf, config, needed, adapter_dir)
    vocab = gguf_export.vocab_from_hf(base_dir, config)
    # The Modelfile's TEMPLATE: the one the adapter was trained with when it carries it, else the base's.
    vocab["chat_template"] = saved_template(adapter_dir) or vocab["chat_template"]
    chat = gguf_export.ollama_chat(vocab)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with model_gguf.atomic_path(modelfile) as modelfile_tmp, model_gguf.atomic_path(out_path) as tmp:
        text = ollama.modelfile(base_gguf, chat, adapter_path=out_path)
        modelfile_tmp.write_text(text, encoding="utf-8")
        _write(tmp, config, cfg.scaling * cfg.r, tensors, ADAPTER_TYPES[out_type], Path(adapter_dir).name)
    return chat


def check_base_gguf(base_gguf: Path, config: LlamaConfig, needed: dict, adapter_dir):
    """Refuse a base GGUF that llama.cpp would refuse the adapter on (another architecture, an
    adapter, a missing tensor, other shapes), before the Modelfile points Ollama at it.
    needed: {GGUF weight name: (in, out)}, the shapes the adapter's B @ A has."""
    reader = model_gguf.open_gguf(base_gguf)
    field = lambda key: reader.fields[key].contents() if key in reader.fields else None  # noqa: E731
    arch = model_gguf.GGUF_ARCH[config.architecture]
    if field("general.type") == "adapter" or field("general.architecture") != arch:
        raise LoRAError(f"--base-gguf {base_gguf}: not a {arch} model GGUF (general.type "
                        f"{field('general.type')!r}, architecture {field('general.architecture')!r})")
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # GGUF order: (in, out)
    for weight, shape in needed.items():
        if shapes.get(weight) != shape:
            raise LoRAError(f"--base-gguf {base_gguf}: not the base of {adapter_dir} ({weight} is "
                            f"{shapes.get(weight, 'missing')}, the adapter's update is {shape})")


def missing_base_note(base_gguf: Path, base_dir) -> str | None:
    """What to run when the Modelfile's FROM does not exist yet."""
    if Path(base_gguf).exists():
        return None
    return (f"note: the Modelfile's FROM, {base_gguf}, does not exist yet: write it once with "
            f"python -m deploy.gguf export {base_dir} {base_gguf}")


def default_base_gguf(out_path: Path, base_dir: Path) -> Path:
    """The base's GGUF when none is named: <base dir name>.gguf beside the adapter's."""
    return out_path.with_name(Path(base_dir).resolve().name + ".gguf")


def _write(path: Path, config: LlamaConfig, alpha: float, tensors, qtype, name: str):
    writer = gguf.GGUFWriter(path, model_gguf.GGUF_ARCH[config.architecture])
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tensor_name, w in tensors:
            data = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.adapter_gguf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = gguf_export.export_parser(sub, "adapter_dir", "adapter directory", ADAPTER_TYPES, "f32")
    exp.add_argument("--base", help="the base model directory (default: the adapter's base_model_name_or_path)")
    exp.add_argument("--base-gguf", help="the base's GGUF, for the Modelfile's FROM (default: BASE_NAME.gguf "
                     "beside OUT.gguf)")
    exp.add_argument("--allow-other-base", action="store_true", help="export for a base other than the one the "
                     "adapter was trained on (its nanolora_base.json), with a warning")
    return run_command("python -m deploy.adapter_gguf", export, parser.parse_args(argv))


def export(args):
    args.adapter_dir = str(resolve_adapter_dir(args.adapter_dir))  # a training run's directory: its final adapter
    base = args.base or read_adapter_config(args.adapter_dir).base_model_name_or_path
    if not base:
        raise LoRAError(f"{args.adapter_dir}: its adapter_config.json names no base model; pass --base")
    base_dir = resolve_model_dir(base)
    check_base(args.adapter_dir, base_dir, args.allow_other_base)  # the base it was trained on, by content
    base_gguf = args.base_gguf or default_base_gguf(Path(args.out_gguf), base_dir)
    chat = export_adapter_gguf(args.adapter_dir, base_dir, args.out_gguf, base_gguf, args.type, args.overwrite)
    print(args.out_gguf)
    print(gguf_export.describe_modelfile(Path(args.out_gguf), chat))
    if note := missing_base_note(base_gguf, base):
        print(note)


if __name__ == "__main__":
    sys.exit(main())
