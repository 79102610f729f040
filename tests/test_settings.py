"""What TrainConfig's fields carry in their metadata (help, range or choices, whether --resume may
change the setting, whether --sweep may vary it, whether its value is a comma list) is what the
checks read: the sets derived from it equal the hand-written lists they replaced, copied here from
the code before the change, so a field whose metadata is wrong fails here by name.
"""

from dataclasses import fields

import pytest

from training import run_dir, sweep
from training.settings import CHOICES, LIST_SETTINGS, RANGES, TrainConfig, TrainError, check_config

# The hand-written lists as they were (training/settings.py, run_dir.py, sweep.py).
OLD_RANGES = {
    "max_seq_len": "[2, inf)", "micro_batch_size": "[1, inf)", "grad_accum": "[1, inf)", "lora_r": "[1, inf)",
    "max_steps": "[0, inf)", "epochs": "(0, inf)", "lr": "(0, inf)", "warmup_steps": "[0, inf)",
    "warmup_ratio": "[0, 1]", "min_lr_ratio": "[0, 1]", "weight_decay": "[0, inf)", "adam_eps": "(0, 1)",
    "max_grad_norm": "[0, inf)", "max_skipped_steps": "[1, inf)", "lora_alpha": "(0, inf)",
    "lora_dropout": "[0, 1)", "val_fraction": "[0, 1)", "loraplus_lr_ratio": "(0, inf)", "neftune_alpha": "[0, inf)",
    "parallel_timeout": "(0, inf)", "log_every": "[0, inf)", "eval_every": "[0, inf)", "save_every": "[0, inf)",
    "keep_checkpoints": "[0, inf)", "sample_tokens": "[0, inf)", "sweep_samples": "[0, inf)",
    "estimate_world_size": "[1, inf)",
    "dpo_beta": "(0, inf)", "dpo_label_smoothing": "[0, 0.5)", "dpo_rpo_alpha": "[0, inf)",
}
# The seeds had no range (any integer was taken); now that every number has one, theirs says so.
UNBOUNDED = {"seed": "(-inf, inf)", "val_seed": "(-inf, inf)"}
OLD_CHOICES = {"lr_schedule": ("cosine", "linear", "constant"), "mask": ("assistant", "last", "all"),
               "precision": ("auto", "bf16", "fp16", "fp32"), "device": ("auto", "cpu", "cuda"),
               "quantize": (None, "nf4"), "parallel": ("ddp", "fsdp"), "objective": ("sft", "dpo"),
               "dpo_loss": ("sigmoid", "ipo")}
OLD_MAY_CHANGE = ("max_steps", "epochs", "log_every", "eval_every", "save_every", "keep_checkpoints",
                  "debug_grads", "sample_prompts", "sample_tokens", "device", "parallel", "parallel_timeout",
                  "micro_batch_size", "grad_checkpointing", "compile", "textbook", "max_skipped_steps", "resume",
                  "overwrite", "output_dir", "sweep", "sweep_samples", "model", "data", "val_data", "precision",
                  "eval_only", "adapter", "allow_other_base", "estimate_memory", "memory_budget", "json",
                  "estimate_world_size")
# Settings added since the lists were written out here, with what they say of themselves.
ADDED_RANGES = {"tile_mlp": "[1, inf)", "orpo_lambda": "(0, inf)", "simpo_beta": "(0, inf)", "simpo_gamma": "[0, inf)",
                "kto_beta": "(0, inf)", "kto_desirable_weight": "(0, inf)", "kto_undesirable_weight": "(0, inf)",
                "grpo_group_size": "[2, inf)", "grpo_beta": "[0, inf)", "grpo_epsilon": "(0, 1)",
                "grpo_iterations": "[1, inf)", "max_new_tokens": "[1, inf)", "temperature": "(0, inf)",
                "top_p": "(0, 1]"}
ADDED_CHOICES = {"objective": ("sft", "dpo", "orpo", "simpo", "kto", "grpo"), "grpo_norm": ("sequence", "token")}
# where memory is held, not what is computed; init_adapter: its content is compared, as model's and data's
ADDED_MAY_CHANGE = ("offload_activations", "offload_embeddings", "tile_mlp", "init_adapter")
OLD_NOT_SWEPT = ("sweep", "sweep_samples", "output_dir", "resume", "overwrite")
OLD_LIST_SETTINGS = ("lora_targets", "adam_betas")
ADDED_LIST_SETTINGS = ("reward", "reward_weights")  # GRPO's: module:function,... and their weights


def test_the_derived_sets_are_the_old_lists():
    assert RANGES == {**OLD_RANGES, **UNBOUNDED, **ADDED_RANGES}
    assert CHOICES == {**OLD_CHOICES, **ADDED_CHOICES}
    assert run_dir.may_change(TrainConfig()) == {*OLD_MAY_CHANGE, *ADDED_MAY_CHANGE}
    assert set(sweep.NOT_SWEPT) == set(OLD_NOT_SWEPT)
    assert set(LIST_SETTINGS) == {*OLD_LIST_SETTINGS, *ADDED_LIST_SETTINGS}


def test_every_field_has_help_and_every_number_a_range():
    for f in fields(TrainConfig):
        assert isinstance(f.metadata["help"], str) and f.metadata["help"].strip(), f.name
        if f.type in (int, float):
            assert f.metadata["within"], f"{f.name}: a number with no range"
        assert not (f.metadata["within"] and f.metadata["choices"]), f"{f.name}: a range and choices"


def test_the_defaults_are_in_their_own_ranges_and_choices():
    """The metadata read back by check_config: the defaults pass, and a value outside a field's range
    is refused with the message naming its flag and interval."""
    check_config(TrainConfig())
    with pytest.raises(TrainError, match=r"^--max-seq-len 1: must be in \[2, inf\)$"):
        check_config(TrainConfig(max_seq_len=1))
    with pytest.raises(TrainError, match=r"^--dpo-label-smoothing 0.5: must be in \[0, 0.5\)$"):
        check_config(TrainConfig(dpo_label_smoothing=0.5))
    with pytest.raises(TrainError, match=r"^--quantize int8: expected one of nf4$"):
        check_config(TrainConfig(quantize="int8"))
