"""How train.py's settings are read: dataclass defaults < a --config TOML/JSON file (or a run's own
run_config.json) < command-line flags; with --resume the run's own settings fill in every one not
given. Then training/settings.check_config checks them all before any work.
"""

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path

import lora
from model.errors import Renamed

from . import run_dir
from .settings import (DEMO_DATA, DEMO_OUTPUT, DEMO_PREFERENCES, DEMO_PROMPTS, DEMO_PROMPTS_DATA, DEMO_REWARDS, GRPO_DEMO,
                       DEMO_UNPAIRED, LIST_SETTINGS, RENAMED, TrainConfig, TrainError, check_config)


def parse_config(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description="LoRA / QLoRA fine-tuning of a Llama-family model. Settings "
                                     "come from the defaults shown, then a --config file, then these flags "
                                     "(flags win); each is checked for type and range before any work.",
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="TOML or JSON file of settings (flags win)")
    parser.add_argument("--reference", action=Renamed, nargs=0, dest="textbook", help=argparse.SUPPRESS)
    parser.add_argument("--dpo-precompute-ref", action=Renamed, nargs=0, dest="precompute_ref", help=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]  # with the default, unless it says it (SUPPRESS hides argparse's own)
        text += "" if "default" in text else f" (default: {f.default})".replace("%", "%%")
        if f.type is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=text)
        elif f.name == "sweep":  # --sweep lr=2e-4,1e-3 lora_r=8,64: several items, kept as one string
            parser.add_argument(name, nargs="+", help=text)
        else:
            kind = {int: int, float: float}.get(f.type, str)
            parser.add_argument(name, type=kind, help=text)
    flags = vars(parser.parse_args(argv))
    if "sweep" in flags:
        flags["sweep"] = " ".join(flags["sweep"])
    from_file = read_config_file(flags.pop("config")) if "config" in flags else {}
    given = {**from_file, **flags}
    if given.get("resume"):  # the run's own settings fill in every one not given (those given are checked)
        path = Path(given.get("output_dir") or DEMO_OUTPUT.get(given.get("objective", "sft"), DEMO_OUTPUT["sft"])) / run_dir.CONFIG_FILE
        given = {**(read_run_settings(path, f"--resume: {path}") if path.is_file() else {}), **given}
    cfg = demo_defaults(TrainConfig(**given), given)
    check_config(cfg)
    return cfg


def demo_defaults(cfg: TrainConfig, given: dict) -> TrainConfig:
    """A preference objective with no --data or --output-dir given: its demo's (examples/preferences.jsonl,
    examples/kto.jsonl or examples/pirate.jsonl, runs/demo-dpo and so on), not the SFT demo's; GRPO's
    demo with the sampling and batch settings of GRPO_DEMO not given; GRPO on an example prompt file
    with no --reward: that file's (DEMO_REWARDS). The demo data with no
    --sample-prompts: the demo's own prompts (examples/prompts.txt), which its held-out conversations
    do not repeat; any other data samples its own validation prompts."""
    if cfg.objective != "sft" and cfg.objective in DEMO_OUTPUT:  # (an unknown one: check_config says so)
        if "data" not in given:
            demo = {"kto": DEMO_UNPAIRED, "grpo": DEMO_PROMPTS_DATA}.get(cfg.objective, DEMO_PREFERENCES)
            cfg = replace(cfg, data=str(demo))
            if cfg.objective == "grpo":
                cfg = replace(cfg, **{k: v for k, v in GRPO_DEMO.items() if k not in given})
        if "output_dir" not in given:
            cfg = replace(cfg, output_dir=DEMO_OUTPUT[cfg.objective])
    if cfg.objective == "grpo" and "reward" not in given and Path(cfg.data).resolve() in DEMO_REWARDS:
        cfg = replace(cfg, reward=DEMO_REWARDS[Path(cfg.data).resolve()])  # an example file's own
    if "sample_prompts" not in given and Path(cfg.data).resolve() in (DEMO_DATA, DEMO_PREFERENCES, DEMO_UNPAIRED):
        cfg = replace(cfg, sample_prompts=str(DEMO_PROMPTS))
    if cfg.eval_only and cfg.adapter:  # a run directory names its adapter; no --model: the adapter's base
        adapter = lora.adapter.resolve_adapter_dir(cfg.adapter)
        base = lora.adapter.adapter_base(adapter) if "model" not in given else None
        cfg = replace(cfg, adapter=str(adapter), model=base or cfg.model)
    return cfg


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"--config {path}: no such file")
    try:
        text = p.read_text()
        if p.suffix == ".toml":
            import tomllib
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:  # tomllib's and json's errors give line and column
        raise TrainError(f"--config {path}: {e}") from None
    if not isinstance(values, dict):
        raise TrainError(f"--config {path}: expected a table of settings, got {type(values).__name__}")
    if isinstance(values.get("defining"), dict):  # a run's own run_config.json: the settings it ran with
        return read_run_settings(p, f"--config {path}")
    values = {RENAMED.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in values.items()}
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise TrainError(f"--config {path}: unknown settings {', '.join(unknown)}")
    if isinstance(values.get("sweep"), dict):  # a [sweep] table: lr = [2e-4, 1e-3]
        values["sweep"] = spec_from_table(values["sweep"])
    return typed(values, f"--config {path}")


def spec_from_table(table: dict) -> str:
    """A [sweep] table of a TOML config (lr = [2e-4, 1e-3]) as --sweep text (lr=2e-4,1e-3)."""
    items = []
    for key, values in table.items():
        values = values if isinstance(values, list) else [values]
        items.append(f"{key}=" + ",".join(value_text(key.replace("-", "_"), v) for v in values))
    return " ".join(items)


def value_text(key: str, value) -> str:
    """A value as written in --sweep and in run names: 2e-4 not 0.0002, q_proj+k_proj for lists."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        plain = f"{value:g}"
        mantissa, exponent = f"{value:e}".split("e")
        scientific = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return scientific if len(scientific) < len(plain) else plain
    return str(value).replace(",", "+") if key in LIST_SETTINGS else str(value)


def typed(values: dict, where: str) -> dict:
    """Settings read from a file, each checked against its field's type (a float's integer made float)."""
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    for name, value in values.items():
        expected = type_error(value, kinds[name])
        if expected:
            raise TrainError(f"{where}: {name} = {json.dumps(value)}: expected {expected}")
    return {k: float(v) if kinds[k] is float else v for k, v in values.items()}


def read_run_settings(path: Path, where: str) -> dict:
    """The settings of the run whose run_config.json is `path`, as its resumes left them (the
    changes in run_history.jsonl beside it): `--resume` fills in with them every setting not given,
    and `--config` takes a run's run_config.json as a config file. `where` names the file in errors."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{where}: not valid JSON ({e})") from None
    history = path.parent / run_dir.HISTORY_FILE
    try:
        values = run_settings(saved, run_dir.read_history(path.parent) if path.name == run_dir.CONFIG_FILE else [])
    except (ValueError, AttributeError, KeyError, TypeError) as e:  # not a table, or a torn history
        raise TrainError(f"{where}: its settings (or {history}) do not read ({type(e).__name__}: {e})") from None
    return typed(values, where)


def run_settings(saved: dict, history: list[dict]) -> dict:
    """The settings a run_config.json records, as flags: those that define the run as given (its
    "defining" table: warmup_steps there is the flag, at the top level the resolved count), the rest
    as the last resume changed them; not what was recorded about them (fingerprints, counts, the
    resolved dtype), nor --resume and --overwrite, which say what to do with the run, nor --eval-only's
    (a run's settings given to --eval-only score it as it trained), nor the device it resolved: a
    run made on a GPU machine continues on the one it is resumed on ("auto" picks; a different
    dtype there is refused by name, as any defining difference)."""
    names = {f.name for f in fields(TrainConfig)} - {"resume", "overwrite", "eval_only", "adapter", "allow_other_base",
                                                      "estimate_memory", "memory_budget", "json",
                                                      "estimate_world_size", "device"}
    changed = {k: now for entry in history for k, (_, now) in entry["changed"].items()}
    values = {**saved, **changed, **saved.get("defining", {})}
    values = {RENAMED.get(k, k): v for k, v in values.items()}
    return {k: v for k, v in values.items() if k in names}


def type_error(value, kind) -> str | None:
    """What a config file's value should have been, or None if it is of the setting's type.

    Strict: "false" is not a boolean (any non-empty string would be true), true is not a number."""
    optional = kind == (str | None)
    if value is None and optional:
        return None
    checks = {bool: (lambda v: isinstance(v, bool), "true or false"),
              int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
              float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
              str: (lambda v: isinstance(v, str), "a string")}
    ok, text = checks[str if optional else kind]
    return None if ok(value) else text + (" (or leave it out)" if optional else "")
