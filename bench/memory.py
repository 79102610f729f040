"""Training memory beside the peers' published figures: train.py --estimate-memory's count of a
LoRA/QLoRA step on a modelled CUDA device, for the shapes and settings torchtune, unsloth and
Answer.AI publish figures for.

    python bench/memory.py                                  # every case, a markdown table
    python bench/memory.py --cases llama-3.1-8b-qlora --json

No weight is read and nothing is downloaded: each model is built from its public config.json
values (written out below) on fake tensors, and training.estimate.estimate_step runs the run's own step on
them (see training/memory_estimate.py). "ours, counted" is the step's counted peak (what
torch.cuda.max_memory_allocated would show); "ours, total" adds the assumed CUDA lines (context,
cuBLAS workspaces, fragmentation) that bench/gpu_check.py is to measure. The peers' figures are
quoted as published, with their settings where they differ from ours: they are measurements on
their GPUs (or, for unsloth, stated minimums), ours is a count. The default run takes about
25 minutes on this project's 2-core CPU: each long-context case searches its length with about ten
counts at up to half a million tokens (12 minutes each here, beside other work); the others take 3 to 30 s.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.runtime import DTYPES  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# The public config.json values of each checkpoint (the fields LlamaConfig.from_hf reads).
MODELS = {
    "meta-llama/Llama-3.2-1B": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "meta-llama/Llama-3.1-8B": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
    "deepseek-ai/deepseek-llm-7b-chat": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False),
    "meta-llama/Llama-3.1-70B": dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
}

# Where the peers' figures come from: a short name, the page.
SOURCES = {
    "torchtune README": "https://github.com/pytorch/torchtune#memory-and-training-speed",
    "unsloth requirements": "https://unsloth.ai/docs/get-started/fine-tuning-for-beginners/unsloth-requirements",
    "Answer.AI FSDP+QLoRA": "https://www.answer.ai/posts/2024-03-06-fsdp-qlora",
    "unsloth context length": "https://unsloth.ai/blog/llama3-3",
}
TORCHTUNE_NOTE = "torchtune: measured on 1x RTX 4090, packed to 2048, torch.compile"
UNSLOTH_NOTE = "unsloth: an 'absolute minimum', its settings not stated"
UNSLOTH_CONTEXT = "unsloth context length"
UNSLOTH_CONTEXT_NOTE = ("unsloth: Llama 3.1 8B QLoRA, rank 32 on all linear layers, batch 1, its offloaded "
                        "checkpointing; HF+FA2 on the same GPU: {hf}")
ALL_LINEAR = "all-linear"
# The context cases lift the model's 131,072-position limit, as the peer's longest figure does.
LONG_CONTEXT = 1 << 19
# torchtune's Llama recipes: LoRA on q, v and output_proj and the whole MLP, rank 8, alpha 16.
TORCHTUNE_TARGETS = "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ALL_SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class Peer:
    figure: str  # as published, with its unit
    source: str  # a key of SOURCES
    note: str = ""  # where the peer's settings differ from ours


@dataclass
class Case:
    model: str  # a key of MODELS
    batch: int
    seq: int
    targets: str
    r: int = 8
    alpha: float = 16.0
    quantize: str | None = None
    peers: list[Peer] = field(default_factory=list)
    note: str = ""  # about our own figure
    world: int = 1  # GPUs under torchrun --parallel fsdp: the figures are one rank's
    offload: bool = False  # --offload-activations and --offload-embeddings
    tile_mlp: int = 1  # --tile-mlp
    budget_gib: int | None = None  # the case is the longest --max-seq-len whose total fits this (seq: the cap)


CASES = {
    "llama-3.2-1b-lora": Case("meta-llama/Llama-3.2-1B", 2, 2048, TORCHTUNE_TARGETS,
                              peers=[Peer("not published", "torchtune README",
                                          "its memory table has Llama 3.1 8B, 70B, 405B only")]),
    "llama-3.1-8b-lora": Case("meta-llama/Llama-3.1-8B", 2, 2048, TORCHTUNE_TARGETS,
                              peers=[Peer("16.2 GiB", "torchtune README", TORCHTUNE_NOTE),
                                     Peer("22 GB", "unsloth requirements", UNSLOTH_NOTE)]),
    "llama-3.1-8b-qlora": Case("meta-llama/Llama-3.1-8B", 2, 2048, TORCHTUNE_TARGETS, quantize="nf4",
                               peers=[Peer("7.4 GiB", "torchtune README", TORCHTUNE_NOTE),
                                      Peer("6 GB", "unsloth requirements", UNSLOTH_NOTE)]),
    "llama-3.1-8b-qlora-offloaded": Case("meta-llama/Llama-3.1-8B", 2, 2048, TORCHTUNE_TARGETS, quantize="nf4",
                                         offload=True, tile_mlp=8,
                                         peers=[Peer("7.4 GiB", "torchtune README", TORCHTUNE_NOTE)]),
    "llama-3.1-8b-qlora-r16-all": Case("meta-llama/Llama-3.1-8B", 2, 2048, ALL_LINEAR, r=16, alpha=32.0,
                                       quantize="nf4"),
    "llama-3.1-8b-qlora-r16-all-offloaded": Case("meta-llama/Llama-3.1-8B", 2, 2048, ALL_LINEAR, r=16, alpha=32.0,
                                                 quantize="nf4", offload=True, tile_mlp=8),
    **{f"llama-3.1-8b-qlora-context-{gib}gb": Case(
        "meta-llama/Llama-3.1-8B", 1, LONG_CONTEXT, ALL_LINEAR, r=32, alpha=64.0, quantize="nf4", offload=True,
        tile_mlp=16, budget_gib=gib,
        peers=[Peer(f"{unsloth:,} tokens", UNSLOTH_CONTEXT, UNSLOTH_CONTEXT_NOTE.format(hf=hf))])
       for gib, unsloth, hf in ((24, 78_475, "5,789"), (80, 342_733, "28,454"))},
    # The seeds' walkthrough run: no peer publishes a figure for it.
    "deepseek-llm-7b-lora": Case("deepseek-ai/deepseek-llm-7b-chat", 2, 1024, ALL_SEVEN, alpha=32.0),
    "llama-3.1-70b-qlora": Case(
        "meta-llama/Llama-3.1-70B", 1, 2048, TORCHTUNE_TARGETS, quantize="nf4",
        peers=[Peer("trains on 2 x 24 GB", "Answer.AI FSDP+QLoRA",
                    "FSDP over 2 GPUs with CPU offload and checkpointing: no figure, and per GPU"),
               Peer("41 GB", "unsloth requirements", UNSLOTH_NOTE)],
        note="one GPU: nanolora's FSDP takes no NF4 base (FSDP2 cannot shard bitsandbytes' weights); "
             "70B LoRA in bf16 under FSDP below"),
    **{f"llama-3.1-70b-lora-fsdp-{n}": Case(
        "meta-llama/Llama-3.1-70B", 1, 2048, TORCHTUNE_TARGETS, world=n,
        peers=[Peer("trains on 2 x 24 GB", "Answer.AI FSDP+QLoRA",
                    "QLoRA (an NF4 base, a quarter of bf16's bytes), CPU offload of the shards")] if n == 2 else [],
        note=f"one rank of {n} under FSDP2, bf16 base sharded") for n in (2, 4, 8)},
}


def settings_text(case: Case, precision: str) -> str:
    targets = "all seven" if case.targets == ALL_SEVEN else ",".join(
        t.removesuffix("_proj") for t in case.targets.split(","))
    nf4 = ", NF4 base" if case.quantize else ""
    fsdp = f", FSDP x {case.world}" if case.world > 1 else ""
    flags = (", --offload-activations --offload-embeddings" if case.offload else "") + (
        f", --tile-mlp {case.tile_mlp}" if case.tile_mlp > 1 else "")
    seq = f"the longest that fits {case.budget_gib} GiB" if case.budget_gib else case.seq
    return f"{case.batch} x {seq}, r {case.r} on {targets}, {precision}{nf4}, ckpt{fsdp}{flags}"


def estimate(case: Case, precision: str, seq: int | None = None):
    """training.estimate.estimate_step for `case` (at `seq` tokens, else its own) on a modelled CUDA
    device: -> memory_estimate.Estimate."""
    import training.estimate
    from model import LlamaConfig
    from training.settings import TrainConfig
    limit = {"max_position_embeddings": LONG_CONTEXT} if case.budget_gib else {}
    config = LlamaConfig.from_hf({"architectures": ["LlamaForCausalLM"], **MODELS[case.model], **limit},
                                 source=case.model)
    # As the peers' recipes: no LoRA dropout (torchtune's and unsloth's default), one micro-batch a step.
    cfg = TrainConfig(model=case.model, micro_batch_size=case.batch, max_seq_len=seq or case.seq, grad_accum=1,
                      lora_r=case.r, lora_alpha=case.alpha, lora_dropout=0.0, lora_targets=case.targets,
                      quantize=case.quantize, grad_checkpointing=True, precision=precision, device="cuda",
                      parallel="fsdp" if case.world > 1 else "ddp", estimate_world_size=case.world,
                      offload_activations=case.offload, offload_embeddings=case.offload, tile_mlp=case.tile_mlp)
    return training.estimate.estimate_step(cfg, config, "cuda", DTYPES[precision])


def run_case(name: str, precision: str) -> dict:
    """One case's row: our figures (bytes and GiB), the settings, the peers."""
    from training.memory_estimate import GIB
    case = CASES[name]
    t0 = time.perf_counter()
    seq = longest(case, precision) if case.budget_gib else None
    est = estimate(case, precision, seq)
    return {"case": name, "model": case.model, "settings": settings_text(case, precision), "seq": seq or case.seq,
            "host_gib": round(est.host_peak_bytes / GIB, 2),
            "counted_bytes": est.peak_bytes, "total_bytes": est.total_bytes,
            "counted_gib": round(est.peak_bytes / GIB, 2), "total_gib": round(est.total_bytes / GIB, 2),
            "peak_phase": est.phase,
            "note": case.note + (f"the search's cap: {case.seq:,} tokens fit, the longest may be longer"
                                 if seq == case.seq else ""),
            "peers": [{"figure": p.figure, "source": p.source, "url": SOURCES[p.source], "note": p.note}
                      for p in case.peers],
            "seconds": round(time.perf_counter() - t0, 1)}


def longest(case: Case, precision: str, step: int = 1024) -> int:
    """The longest sequence, in multiples of `step` up to case.seq, whose total (counted and the
    assumed CUDA lines) fits case.budget_gib: bisection, the total growing with the length."""
    from training.memory_estimate import GIB
    fits = lambda n: estimate(case, precision, n * step).total_bytes <= case.budget_gib * GIB
    low, high = 0, case.seq // step + 1  # fits(low) (0: nothing), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step


def markdown_table(rows: list[dict]) -> str:
    """A row per peer (a case without one: one row, its peer columns a dash); our figures on the
    case's first row; the sources' addresses below the table."""
    lines = ["| case | settings | ours, counted GiB | ours, with CUDA lines GiB | peer's figure | source | "
             "note |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        peers = row["peers"] or [{"figure": "-", "source": "-", "note": ""}]
        for i, peer in enumerate(peers):
            settings = row["settings"] + (f": {row['seq']:,} tokens" if "longest" in row["settings"] else "") + (
                f"; host {row['host_gib']:.2f} GiB" if row["host_gib"] else "")
            ours = (row["case"], settings, f"{row['counted_gib']:.2f}", f"{row['total_gib']:.2f}") if i == 0 \
                else ("", "", "", "")
            note = "; ".join(n for n in (row["note"] if i == 0 else "", peer["note"]) if n)
            lines.append("| " + " | ".join((*ours, peer["figure"], peer["source"], note)) + " |")
    used = {p["source"] for row in rows for p in row["peers"]}
    lines += [""] + [f"- {name}: {url}" for name, url in SOURCES.items() if name in used]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), metavar="CASE",
                   help=f"which cases (default: all): {', '.join(CASES)}")
    p.add_argument("--precision", choices=list(DTYPES), default="bf16",
                   help="the step's dtype (the peers' figures are bf16)")
    p.add_argument("--json", action="store_true", help="one JSON object per case on stdout, no table")
    args = p.parse_args(argv)
    names = list(dict.fromkeys(args.cases or CASES))  # (a case named twice runs once)
    rows = []
    for name in names:
        rows.append(run_case(name, args.precision))
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
        else:
            print(f"{name}: counted in {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    if not args.json:
        print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
