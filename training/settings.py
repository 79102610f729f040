"""train.py's settings: the TrainConfig dataclass (one field per flag; beside it, in the field's
metadata, its help, its range or choices, which objectives it is for, and whether a --resume may
change it, a --sweep may vary it and its value is a comma list: run_dir.py and sweep.py read those
there), and their validation, for type and range, before any work starts: a bad value is one line
naming the flag (or the file and setting) and exit 2. training/flags.py reads them (defaults < a
--config file < flags); a --sweep's every setting is checked the same way by sweep.py, before its
first run.
"""

import argparse
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

import lora
from . import parallel
from .rewards import check_rewards, load_rewards
from data import DataError, is_preference_file, is_prompt_file, is_unpaired_file, load_prompts
from data.formats import SUFFIXES
from model import DEMO_MODEL
from model.errors import UserError, parse_size

ROOT = Path(__file__).resolve().parents[1]  # the repository: examples/ is there
DEMO_DATA = ROOT / "examples" / "train.json"
DEMO_VAL_DATA = ROOT / "examples" / "val.json"
DEMO_PROMPTS = ROOT / "examples" / "prompts.txt"
DEMO_PREFERENCES = ROOT / "examples" / "preferences.jsonl"  # the paired objectives' demo data
DEMO_UNPAIRED = ROOT / "examples" / "kto.jsonl"  # --objective kto's
DEMO_PROMPTS_DATA = ROOT / "examples" / "pirate.jsonl"  # --objective grpo's: the sample data's questions
ARITHMETIC = ROOT / "examples" / "arithmetic.jsonl"  # GRPO's other example prompts, with answers
# The reward of each of those, when --reward is not given: the sample data's style; the right answer
DEMO_REWARDS = {DEMO_PROMPTS_DATA: "examples.pirate_rewards:greeting,examples.pirate_rewards:sign_off",
                ARITHMETIC: "training.rewards:exact_match"}
# --objective grpo with no --data: the demo, sized to show its reward rise on a CPU in minutes (each
# setting where it is not given)
GRPO_DEMO = {"temperature": 0.7, "max_new_tokens": 48, "micro_batch_size": 2, "grad_accum": 1, "max_steps": 24,
             "eval_every": 8}
DEMO_VALIDATION = {DEMO_DATA: DEMO_VAL_DATA, DEMO_PREFERENCES: ROOT / "examples" / "preferences_val.jsonl",
                   DEMO_UNPAIRED: ROOT / "examples" / "kto_val.jsonl",
                   DEMO_PROMPTS_DATA: ROOT / "examples" / "pirate_val.jsonl",
                   ARITHMETIC: ROOT / "examples" / "arithmetic_val.jsonl"}
PAIRED = ("dpo", "orpo", "simpo")  # objectives on {prompt, chosen, rejected} pairs
WITH_REFERENCE = ("dpo", "kto")  # objectives that score the policy against a reference policy
OBJECTIVES = ("sft", *PAIRED, "kto", "grpo")
DEMO_OUTPUT = {"sft": "runs/demo", **{o: f"runs/demo-{o}" for o in OBJECTIVES[1:]}}
# old setting name -> new, read from old config files and runs
RENAMED = {"reference": "textbook", "dpo_precompute_ref": "precompute_ref"}


def flag(default, help, *, within=None, choices=None, may_change=False, swept=True, comma_list=False,
         objectives=None):
    """A setting: its default and its help, and what the rest of training/ reads about it (field metadata).

    within      its range, as an interval: "[" includes its end, "(" excludes it; floats must also be
                finite (argparse and JSON accept nan and inf). Every int and float setting has one.
    choices     the values it may take, where it is one of a few
    may_change  --resume may continue the run with another value (how long, how often, on what
                hardware): recorded in run_history.jsonl; every other setting defines the run. Of those,
                micro_batch_size may change only with the number of ranks (the global batch is
                compared), model, data and init_adapter only in where they live (their content is
                compared) and
                precision only in name ("auto" on the same device: the resolved dtype is compared).
    swept       a --sweep may vary it (False: the settings of the sweep itself)
    comma_list  its value is a comma list (in --sweep, its parts are joined by +)
    objectives  the --objective values it is for: set to anything but its default with another, refused
    """
    return field(default=default, metadata={"help": help, "within": within, "choices": choices,
                                            "may_change": may_change, "swept": swept, "comma_list": comma_list,
                                            "objectives": objectives})


@dataclass
class TrainConfig:
    # what to train on, and how
    objective: str = flag("sft", "sft (supervised fine-tuning) | dpo (Rafailov et al. 2023) | orpo (Hong et al. "
                                 "2024) | simpo (Meng et al. 2024), on {prompt, chosen, rejected} records | kto "
                                 "(Ethayarajh et al. 2024) on {prompt, completion, label} records | grpo (Shao et "
                                 "al. 2024) on {prompt, ...} records, rewarded by --reward. dpo, kto and grpo "
                                 "score against a reference policy: the model with the adapter switched off; "
                                 "orpo and simpo need none", choices=OBJECTIVES)
    init_adapter: str | None = flag(None, "start from this adapter (an SFT run's, or its directory): frozen, it is "
                                          "part of the policy and of the reference policy, and the adapter saved is "
                                          "one adapter of the original base, both stacked (no merge needed)",
                                    may_change=True)
    model: str = flag(DEMO_MODEL, "model directory or hub id ('demo': the offline SmolLM2-135M-Instruct)",
                      may_change=True)
    data: str = flag(str(DEMO_DATA), "training data (.json, .jsonl, .csv; dpo, orpo, simpo: preference pairs, "
                                     "default examples/preferences.jsonl; kto: examples/kto.jsonl; grpo: prompts, "
                                     "examples/pirate.jsonl)", may_change=True)
    val_data: str | None = flag(None, "validation data (default: --val-fraction of --data; the demo data has its own)",
                                may_change=True)
    val_fraction: float = flag(0.1, "share of --data held out for validation when there is no --val-data",
                               within="[0, 1)")
    val_seed: int = flag(0, "which examples --val-fraction holds out; not --seed, so that runs of different "
                            "seeds are compared on the same held-out set", within="(-inf, inf)")
    output_dir: str = flag(DEMO_OUTPUT["sft"], "where metrics, TensorBoard logs, checkpoints and the adapter go "
                                              "(--objective dpo: default runs/demo-dpo, and so on)", may_change=True, swept=False)
    max_seq_len: int = flag(512, "longer examples are truncated", within="[2, inf)")
    mask: str = flag("assistant", "which tokens train: assistant | last | all", choices=("assistant", "last", "all"))
    template: str | None = flag(None, "built-in chat template instead of the model's own")
    pack: bool = flag(False, "pack several examples per row (block-diagonal attention)")
    group_by_length: bool = flag(False, "batch examples of similar length together")
    # how long and how big
    max_steps: int = flag(0, "optimizer steps (0: from --epochs)", within="[0, inf)", may_change=True)
    epochs: float = flag(3.0, "passes over the training data when --max-steps is 0", within="(0, inf)",
                         may_change=True)
    micro_batch_size: int = flag(4, "examples per forward/backward (grpo: prompts, each --grpo-group-size completion "
                                    "rows)", within="[1, inf)", may_change=True)
    grad_accum: int = flag(2, "micro-batches per optimizer step", within="[1, inf)")
    # optimizer and schedule
    lr: float = flag(1e-3, "peak learning rate", within="(0, inf)")
    lr_schedule: str = flag("cosine", "cosine | linear | constant, after warmup",
                            choices=("cosine", "linear", "constant"))
    warmup_steps: int = flag(0, "linear warmup steps (overrides --warmup-ratio)", within="[0, inf)")
    warmup_ratio: float = flag(0.1, "warmup as a share of all steps", within="[0, 1]")
    min_lr_ratio: float = flag(0.0, "the schedule decays to lr * min_lr_ratio", within="[0, 1]")
    weight_decay: float = flag(0.0, "AdamW weight decay (never on biases and norms)", within="[0, inf)")
    adam_betas: str = flag("0.9,0.999", "AdamW betas", comma_list=True)
    adam_eps: float = flag(1e-8, "AdamW epsilon", within="(0, 1)")
    amsgrad: bool = flag(False, "AMSGrad variant of AdamW")
    max_grad_norm: float = flag(1.0, "clip the global gradient norm (0: no clipping)", within="[0, inf)")
    max_skipped_steps: int = flag(10, "fp16: stop when the loss scaler skips this many steps in a row",
                                  within="[1, inf)", may_change=True)
    # LoRA
    lora_r: int = flag(16, "rank of A and B", within="[1, inf)")
    lora_alpha: float = flag(32.0, "scaling = alpha / r (alpha / sqrt(r) with --rslora)", within="(0, inf)")
    lora_dropout: float = flag(0.05, "dropout on the LoRA path", within="[0, 1)")
    lora_targets: str = flag("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                             "comma-separated module names, or all-linear", comma_list=True)
    rslora: bool = flag(False, "rank-stabilised scaling alpha / sqrt(r)")
    lora_init: str = flag("default", "A and B at the start: default (A kaiming-uniform, B zero) | pissa (PiSSA, "
                                     "Meng et al. 2024: W0's top-r singular vectors, the base keeping the rest; "
                                     "saved as a rank-2r LoRA of the original base) | pissa_niter_N (randomized SVD)")
    dora: bool = flag(False, "DoRA (Liu et al. 2024): a trained magnitude per output row; runs op by op "
                             "(no fused path yet), not under --parallel fsdp")
    loraplus_lr_ratio: float = flag(1.0, "LoRA+ (Hayou et al. 2024): B, and any 1-D trainable, learns at this "
                                         "times --lr; 16 is typical, 1 is plain LoRA", within="(0, inf)")
    neftune_alpha: float = flag(0.0, "NEFTune (Jain et al. 2023): uniform noise of scale alpha / sqrt(L d) on the "
                                     "input embeddings, in training only; 5 is typical, 0 is off", within="[0, inf)")
    quantize: str | None = flag(None, "nf4: QLoRA, the frozen base in 4-bit NF4", choices=(None, "nf4"))
    # DPO (--objective dpo)
    dpo_beta: float = flag(0.1, "DPO's beta: how far the policy may move from the reference (IPO: its tau)",
                           within="(0, inf)", objectives=("dpo",))
    dpo_loss: str = flag("sigmoid", "sigmoid (DPO, eq. 7) | ipo (Azar et al. 2023, on per-token mean log-probs)",
                         choices=("sigmoid", "ipo"), objectives=("dpo",))
    dpo_label_smoothing: float = flag(0.0, "cDPO: the share of preference labels assumed flipped, in [0, 0.5)",
                                      within="[0, 0.5)", objectives=("dpo",))
    dpo_rpo_alpha: float = flag(0.0, "RPO (Pang et al. 2024, TRL's rpo_alpha): add alpha x the chosen reply's per-token "
                                     "NLL, which keeps DPO from lowering the chosen reply with the rejected one",
                                within="[0, inf)", objectives=("dpo",))
    precompute_ref: bool = flag(False, "compute the reference log-probs once per example before training "
                                       "(kept in --output-dir): a step is then one forward, not two",
                                objectives=WITH_REFERENCE)
    # ORPO, SimPO, KTO (--objective orpo, simpo, kto)
    orpo_lambda: float = flag(0.1, "ORPO's lambda (eq. 6; TRL's beta): the weight of the odds-ratio term beside the "
                                   "chosen reply's NLL", within="(0, inf)", objectives=("orpo",))
    simpo_beta: float = flag(2.0, "SimPO's beta (eq. 6): the scale of its reward, beta x the mean log-prob per "
                                  "token (the paper uses 2 to 10)", within="(0, inf)", objectives=("simpo",))
    simpo_gamma: float = flag(1.0, "SimPO's gamma (eq. 6): the target reward margin (the paper: gamma / beta "
                                   "0.3 to 0.8)", within="[0, inf)", objectives=("simpo",))
    kto_beta: float = flag(0.1, "KTO's beta: how far the policy may move from the reference", within="(0, inf)",
                           objectives=("kto",))
    kto_desirable_weight: float = flag(1.0, "KTO's lambda_D: the weight of a desirable completion's loss",
                                       within="(0, inf)", objectives=("kto",))
    kto_undesirable_weight: float = flag(1.0, "KTO's lambda_U: the weight of an undesirable completion's loss (the "
                                              "paper: lambda_D n_D / (lambda_U n_U) in [1, 4/3])",
                                         within="(0, inf)", objectives=("kto",))
    # GRPO (--objective grpo)
    reward: str | None = flag(None, "GRPO's reward functions, module:function[,module:function] (training/rewards.py; "
                                    "the demo data: training.rewards:exact_match)", comma_list=True,
                              objectives=("grpo",))
    reward_weights: str | None = flag(None, "GRPO: one weight per --reward function, e.g. 1,0.5 (default: 1 each)",
                                      comma_list=True, objectives=("grpo",))
    grpo_group_size: int = flag(8, "GRPO's G: completions sampled per prompt, rewarded relative to each other",
                                within="[2, inf)", objectives=("grpo",))
    grpo_beta: float = flag(0.04, "GRPO's beta: the weight of the KL penalty to the reference (0: no reference "
                                  "forward at all)", within="[0, inf)", objectives=("grpo",))
    grpo_epsilon: float = flag(0.2, "GRPO's epsilon: the clip of the ratio pi / pi_old", within="(0, 1)",
                               objectives=("grpo",))
    grpo_iterations: int = flag(1, "GRPO: optimizer steps per generation (the same completions; each after the "
                                   "first clipped against pi_old)", within="[1, inf)", objectives=("grpo",))
    grpo_norm: str = flag("sequence", "GRPO: sequence (each completion's mean token loss, then their mean; the "
                                      "paper's eq. 3) | token (the mean over all tokens: Dr. GRPO, DAPO)",
                          choices=("sequence", "token"), objectives=("grpo",))
    max_new_tokens: int = flag(128, "GRPO: the longest completion sampled, in tokens (prompts longer than "
                                    "--max-seq-len minus this are dropped)", within="[1, inf)", objectives=("grpo",))
    temperature: float = flag(1.0, "GRPO: the sampling temperature (the loss's log-probs are of logits / it too)",
                              within="(0, inf)", objectives=("grpo",))
    top_p: float = flag(1.0, "GRPO: nucleus sampling's p (1: the whole distribution)", within="(0, 1]",
                        objectives=("grpo",))
    # hardware
    precision: str = flag("auto", "bf16 | fp16 | fp32 (auto: bf16 on CUDA when supported, else fp32)",
                          choices=("auto", "bf16", "fp16", "fp32"), may_change=True)
    device: str = flag("auto", "cpu | cuda (auto: cuda when available)", choices=("auto", "cpu", "cuda"),
                       may_change=True)
    grad_checkpointing: bool = flag(False, "recompute each decoder block in backward to save memory", may_change=True)
    offload_activations: bool = flag(False, "keep the activations saved for backward in host memory until backward "
                                            "needs them, each block's brought back one block ahead (with "
                                            "--grad-checkpointing: the blocks' inputs; without: every saved tensor "
                                            "of 1 MiB or more)", may_change=True)
    offload_embeddings: bool = flag(False, "keep the input embedding table (frozen, only looked up) in host memory: "
                                           "each batch's rows are gathered there as the batch is made, and copied "
                                           "with it (SFT, one process, untied embeddings)", may_change=True)
    tile_mlp: int = flag(1, "run each MLP over N tiles of the sequence, each recomputed in its own backward, so "
                            "the (tokens x intermediate) activations exist for one tile at a time (1: untiled)",
                         within="[1, inf)", may_change=True)
    compile: bool = flag(False, "torch.compile each decoder block", may_change=True)
    textbook: bool = flag(False, "run the textbook twins of the fast pieces (model/fused.py): the same "
                                 "results, slower, every intermediate tensor hookable", may_change=True)
    tf32: bool = flag(True, "on CUDA, fp32 matmuls on tensor cores in TF32 (--no-tf32: full fp32)")
    parallel: str = flag("ddp", "under torchrun: ddp (a model replica per GPU) | fsdp (FSDP2: model sharded)",
                         choices=("ddp", "fsdp"), may_change=True)
    parallel_timeout: float = flag(600.0, "seconds a rank waits for the others before the job fails",
                                   within="(0, inf)", may_change=True)
    seed: int = flag(42, "seeds data order, LoRA init, dropout and GRPO's sampling", within="(-inf, inf)")
    # bookkeeping
    log_every: int = flag(1, "print a log line every N steps", within="[0, inf)", may_change=True)
    eval_every: int = flag(0, "evaluate every N steps (0: before and after training only)", within="[0, inf)",
                           may_change=True)
    save_every: int = flag(0, "checkpoint every N steps (0: only at the end)", within="[0, inf)", may_change=True)
    keep_checkpoints: int = flag(2, "how many newest checkpoints to keep (0: keep every one)", within="[0, inf)",
                                 may_change=True)
    resume: bool = flag(False, "continue from the newest checkpoint in --output-dir (the same run only)",
                        may_change=True, swept=False)
    overwrite: bool = flag(False, "replace the run already in --output-dir (its metrics, checkpoints, adapter)",
                           may_change=True, swept=False)
    debug_grads: bool = flag(False, "per-module LoRA gradient norms and update/weight ratios, every step",
                             may_change=True)
    sample_prompts: str | None = flag(None, "file of prompts (one per line), three answered at each eval (default: "
                                            "the first user turns of the first 3 validation conversations; the "
                                            "demo data: examples/prompts.txt; '' for none)", may_change=True)
    sample_tokens: int = flag(48, "max new tokens of each eval sample reply", within="[0, inf)", may_change=True)
    # scoring only
    eval_only: bool = flag(False, "train nothing: score --model (with --adapter applied) on --val-data, else on the "
                                  "share of --data training holds out (--val-fraction 1: all of it), as a run's end "
                                  "does: loss and perplexity (DPO: rewards and their accuracy) and sample replies; "
                                  "one JSON object on stdout, nothing written", may_change=True)
    adapter: str | None = flag(None, "--eval-only: the LoRA adapter to score (a run directory: its final adapter); "
                                     "--model then defaults to the base it records", may_change=True)
    allow_other_base: bool = flag(False, "--eval-only, --init-adapter: apply the adapter to a base other than the "
                                         "one it was trained on (its nanolora_base.json), with a warning",
                                  may_change=True)
    # memory, before the run (memory_estimate.py)
    estimate_memory: bool = flag(False, "train nothing: count the memory this run's training step holds (the real "
                                        "step on fake tensors: no weight or data is read, config.json is enough), "
                                        "print it by category and exit; --device cuda models a CUDA run on any machine",
                                 may_change=True)
    memory_budget: str | None = flag(None, "--estimate-memory: the memory a device has (e.g. 24GiB, 80GB): whether "
                                           "the run fits, and the largest --micro-batch-size and --max-seq-len that do",
                                     may_change=True)
    json: bool = flag(False, "--estimate-memory: print one JSON object on stdout", may_change=True)
    estimate_world_size: int = flag(1, "--estimate-memory: estimate one rank of this many GPUs under torchrun, with "
                                       "--parallel ddp (a whole replica each) or fsdp (each rank its shards)",
                                    within="[1, inf)", may_change=True)
    # sweeps (sweep.py)
    sweep: str | None = flag(None, "train once per setting of a grid, e.g. --sweep lr=2e-4,1e-3 lora_r=8,64",
                             may_change=True, swept=False)
    sweep_samples: int = flag(0, "train only N settings of the --sweep grid, drawn with --seed (0: all)",
                              within="[0, inf)", may_change=True, swept=False)


# What the fields' metadata says, as the checks read it (in field order)
RANGES = {f.name: f.metadata["within"] for f in fields(TrainConfig) if f.metadata["within"]}
CHOICES = {f.name: f.metadata["choices"] for f in fields(TrainConfig) if f.metadata["choices"]}
LIST_SETTINGS = tuple(f.name for f in fields(TrainConfig) if f.metadata["comma_list"])
FOR_OBJECTIVES = {f.name: f.metadata["objectives"] for f in fields(TrainConfig) if f.metadata["objectives"]}


class TrainError(UserError):
    """A problem with the run's settings or files: printed as one line, exit code 2."""



def in_range(value, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def check_config(cfg: TrainConfig):
    """Every setting, for type and range, before any work: the message names the flag."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise TrainError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected one of "
                             f"{', '.join(str(a) for a in allowed if a)}")
    ranges = {**RANGES, **({"val_fraction": "[0, 1]"} if cfg.eval_only else {})}  # scoring: 1 is all of --data
    for name, interval in ranges.items():
        if not in_range(getattr(cfg, name), interval):
            raise TrainError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be in {interval}")
    if len(betas(cfg)) != 2 or not all(in_range(b, "[0, 1)") for b in betas(cfg)):
        raise TrainError(f"--adam-betas {cfg.adam_betas}: expected two numbers in [0, 1) like 0.9,0.999")
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --output-dir and --overwrite replaces it: pass one")
    for name in ("data", "val_data"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_file():
            raise TrainError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: {not_a_file(getattr(cfg, name))}")
    if cfg.sample_prompts and not Path(cfg.sample_prompts).is_file():
        raise TrainError(f"--sample-prompts {cfg.sample_prompts}: {not_a_file(cfg.sample_prompts)} "
                         "(pass '' for no samples)")
    check_eval_only(cfg)
    check_estimate(cfg)
    for name, objectives in FOR_OBJECTIVES.items():
        default = TrainConfig.__dataclass_fields__[name].default
        if cfg.objective not in objectives and getattr(cfg, name) != default:
            raise TrainError(f"--{name.replace('_', '-')} is for --objective {' or '.join(objectives)}, "
                             f"not {cfg.objective}")
    if cfg.objective == "grpo":
        check_grpo(cfg)
    elif cfg.objective != "sft":
        check_preference(cfg)
    check_init_adapter(cfg)
    if cfg.parallel == "fsdp" and cfg.quantize:
        raise TrainError("--parallel fsdp cannot shard NF4 weights; train QLoRA with --parallel ddp")
    if not re.fullmatch(r"default|pissa|pissa_niter_[0-9]+", cfg.lora_init):
        raise TrainError(f"--lora-init {cfg.lora_init}: expected default, pissa or pissa_niter_N (N iterations)")
    if cfg.lora_init != "default" and (cfg.quantize or cfg.dora or cfg.parallel == "fsdp"):
        raise TrainError(f"--lora-init {cfg.lora_init} does not combine with --quantize, --dora or --parallel fsdp yet")
    if cfg.parallel == "fsdp" and cfg.dora:
        raise TrainError("--parallel fsdp does not support --dora yet; use --parallel ddp")
    if cfg.parallel == "fsdp" and cfg.offload_activations:  # its blocks save the weights it gathers
        raise TrainError("--offload-activations does not combine with --parallel fsdp yet; use --parallel ddp")
    if cfg.offload_embeddings and cfg.objective != "sft":
        raise TrainError("--offload-embeddings is for --objective sft yet")
    if cfg.parallel == "fsdp" and cfg.precision == "fp16":
        # GradScaler's inf check would see only this rank's shard of the gradients
        raise TrainError("--parallel fsdp does not support --precision fp16; use bf16")
    if cfg.parallel == "fsdp" and not parallel.fsdp2_available():
        raise TrainError(f"--parallel fsdp: this torch ({torch.__version__}) lacks the FSDP2 features it "
                         "needs; upgrade torch or use --parallel ddp")


def not_a_file(path: str) -> str:
    """Why a path that should name a file does not."""
    if Path(path).is_dir():
        return f"a directory, not a data file ({', '.join(SUFFIXES)}); name a file in it"
    return "no such file"


def check_eval_only(cfg: TrainConfig):
    """--eval-only and its flags, and what they do not combine with."""
    if not cfg.eval_only:
        if cfg.adapter:
            raise TrainError("--adapter is for --eval-only (training starts a new adapter; to start from one, "
                             "--init-adapter)")
        if cfg.allow_other_base and not cfg.init_adapter:
            raise TrainError("--allow-other-base is for --eval-only and --init-adapter")
        return
    for name in ("resume", "overwrite", "sweep"):
        if getattr(cfg, name):
            raise TrainError(f"--eval-only trains nothing and writes nothing: drop --{name}")
    if cfg.allow_other_base and not cfg.adapter:
        raise TrainError("--allow-other-base goes with --adapter")
    if cfg.adapter:  # an adapter, readable, before any weight is: LoRAError names the file
        lora.read_adapter_config(cfg.adapter)
    if cfg.objective in WITH_REFERENCE and not cfg.adapter:
        raise TrainError(f"--objective {cfg.objective} --eval-only scores an adapter against its base (the reference): "
                         "pass --adapter")
    if not cfg.val_data and cfg.val_fraction == 0 and Path(cfg.data).resolve() not in DEMO_VALIDATION:
        raise TrainError(f"--eval-only: --val-fraction 0 holds nothing of --data {cfg.data} out to score; "
                         "pass --val-data FILE, or --val-fraction 1 to score all of --data")


def check_estimate(cfg: TrainConfig):
    """--estimate-memory and its flags."""
    if not cfg.estimate_memory:
        given = {"memory_budget": cfg.memory_budget is not None, "json": cfg.json,
                 "estimate_world_size": cfg.estimate_world_size != 1}
        for name in given:
            if given[name]:
                raise TrainError(f"--{name.replace('_', '-')} is for --estimate-memory")
        return
    for name in ("resume", "overwrite", "sweep", "eval_only"):
        if getattr(cfg, name):
            raise TrainError(f"--estimate-memory runs no training and writes nothing: drop --{name.replace('_', '-')}")
    if cfg.memory_budget is not None:
        memory_budget(cfg)


def memory_budget(cfg: TrainConfig) -> int:
    """--memory-budget in bytes (24GiB, 80GB, 1.5e10)."""
    try:
        return parse_size(cfg.memory_budget)
    except argparse.ArgumentTypeError as e:
        raise TrainError(f"--memory-budget {cfg.memory_budget}: {e}") from None


def check_preference(cfg: TrainConfig):
    """What the preference objectives do not combine with, and their data's kind, refused before
    any work."""
    what = "a pair's two replies" if cfg.objective in PAIRED else "a completion and its KL row"
    if cfg.pack:
        raise TrainError(f"--objective {cfg.objective} does not pack rows ({what} share a micro-batch); drop --pack")
    if cfg.mask != "assistant":
        raise TrainError(f"--mask {cfg.mask}: with --objective {cfg.objective} only the replies count, always; "
                         "drop --mask")
    if cfg.dpo_loss == "ipo" and cfg.dpo_label_smoothing:
        raise TrainError("--dpo-label-smoothing is cDPO's, for --dpo-loss sigmoid; IPO has none")
    paired = cfg.objective in PAIRED
    for name in ("data", "val_data"):
        path = getattr(cfg, name)
        try:
            if path and Path(path).is_file() and not (is_preference_file(path) if paired else is_unpaired_file(path)):
                wanted = ('preference records {"prompt", "chosen", "rejected"}' if paired
                          else 'unpaired records {"prompt", "completion", "label"}')
                raise TrainError(f"--{name.replace('_', '-')} {path}: --objective {cfg.objective} needs {wanted}; "
                                 "its first record has other fields")
        except DataError as e:
            raise TrainError(str(e)) from None


def check_grpo(cfg: TrainConfig):
    """GRPO's settings, its data (a prompt file) and its reward functions, loaded and run on the data's
    first prompts with made-up completions (rewards.check_rewards), all before any model loads."""
    for name in ("pack", "eval_only", "estimate_memory"):  # (the estimate would count no sampling, no G rows)
        if getattr(cfg, name):
            raise TrainError(f"--objective grpo does not take --{name.replace('_', '-')} (yet); drop it")
    if cfg.mask != "assistant":
        raise TrainError(f"--mask {cfg.mask}: with --objective grpo the sampled completions train, always; drop --mask")
    if cfg.max_new_tokens >= cfg.max_seq_len:
        raise TrainError(f"--max-new-tokens {cfg.max_new_tokens}: must be less than --max-seq-len {cfg.max_seq_len} "
                         "(a row is the prompt and its completion)")
    if not cfg.reward:
        raise TrainError("--objective grpo needs --reward module:function[,...] (e.g. training.rewards:exact_match)")
    try:
        for name in ("data", "val_data"):
            path = getattr(cfg, name)
            if path and Path(path).is_file() and not is_prompt_file(path):
                raise TrainError(f"--{name.replace('_', '-')} {path}: --objective grpo needs prompt records "
                                 '{"prompt", ...fields}; its first record has other fields')
        records = load_prompts(cfg.data)[:2]
    except DataError as e:
        raise TrainError(str(e)) from None
    names = list(dict.fromkeys(k for _, _, fields in records for k in fields))
    check_rewards(load_rewards(cfg.reward, cfg.reward_weights), [prompt[-1]["content"] for _, prompt, _ in records],
                  {k: [fields.get(k) for _, _, fields in records] for k in names})


def check_init_adapter(cfg: TrainConfig):
    """--init-adapter: a readable adapter (LoRAError names its file), for a plain LoRA run."""
    if not cfg.init_adapter:
        return
    if cfg.eval_only:
        raise TrainError("--init-adapter is for training; --eval-only scores --adapter (a chained run's adapter "
                         "already holds the one it started from)")
    if cfg.dora or cfg.lora_init != "default":
        raise TrainError(f"--init-adapter does not combine with {'--dora' if cfg.dora else '--lora-init'} yet")
    config = lora.read_adapter_config(lora.adapter.resolve_adapter_dir(cfg.init_adapter))
    if config.dora:
        raise TrainError(f"--init-adapter {cfg.init_adapter}: a DoRA adapter cannot be stacked with another")


def betas(cfg) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in cfg.adam_betas.split(","))
    except ValueError:
        raise TrainError(f"--adam-betas {cfg.adam_betas}: expected two numbers like 0.9,0.999") from None
