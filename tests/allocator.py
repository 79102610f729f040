"""The CPU allocator's own record of a step, the independent measure tests/test_memory_estimate.py
holds the estimate against: torch.profiler with profile_memory=True logs every allocation and
free; their running sum, over the bytes alive before, peaks where the step's memory peaks.
Imported by the test and by tests/fsdp_memory_rank.py (each torchrun rank measures itself)."""

import bisect

import torch
from torch.profiler import ProfilerActivity, profile

# Ops that only allocate or copy: a temporary made inside another op's kernel shows as one of these.
ALLOCATING = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::to", "aten::_to_copy", "aten::copy_",
              "aten::contiguous", "aten::clone", "aten::resize_"}
MODELLED = {"aten::_scaled_dot_product_flash_attention_for_cpu_backward"}  # the estimate adds their scratch
# (and bitsandbytes::gemm_4bit's, its dequantized weight, which is no aten op: kept below too)


def storage_bytes(tensors) -> int:
    """The bytes of the storages under `tensors` (a DTensor: its local shard), each counted once."""
    storages = [getattr(t, "_local_tensor", t).untyped_storage() for t in tensors]
    return sum({st.data_ptr(): st.nbytes() for st in storages}.values())


def step_peak(cfg, model, loss_fn, dtype, wrap=None) -> int:
    """The peak of two steps of the run's own functions (training.step.accumulate and training.step.update, on
    training.estimate.worst_batch) on `model`, built by the caller with LoRA and its weights. wrap(), when
    given, makes the module the steps call (DDP), inside the measured span: what it allocates (the
    Reducer's buckets) is part of the step."""
    from contextlib import nullcontext

    from training import memory_estimate
    from training import parallel
    import training.estimate, training.phases, training.step
    model.train()
    batches = [training.estimate.worst_batch(cfg) for _ in range(min(cfg.grad_accum, 2))]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scaler = training.phases.build_optimizer(cfg, model, "cpu", torch.float32)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    held = [t for m in model.modules() for t in memory_estimate.module_tensors(m)]
    held += [v for b in batches for v in b.values() if isinstance(v, torch.Tensor)]

    def steps():
        step_fn = wrap() if wrap else loss_fn
        n_loss = parallel.all_reduce_sum(sum(b["n_loss"] for b in batches))[0]
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            training.step.accumulate(step_fn, batches, scaler, autocast, n_loss, loss_fn.STATS)
            training.step.update(optimizer, scaler, params, cfg.max_grad_norm)
    return peak_of(steps, held)


def peak_of(run_steps, held) -> int:
    """The peak of memory while run_steps() runs: the bytes of `held` (alive before) plus the
    highest running sum of the allocator's events.

    Left out: a CPU kernel's own temporaries, allocated and freed inside one op (a bf16 matmul's
    fp32 buffers on a CPU without bf16 arithmetic, the cast a mixed-dtype in-place op makes of its
    input), which a CUDA step does not have (cuBLAS's workspace is its own line; CUDA kernels cast
    as they read). Attention's backward keeps its temporaries: the estimate counts them."""
    before = storage_bytes(held)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_steps()
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e.start_ns(), e.nbytes(), e.start_thread_id()) for e in events if e.name() == "[memory]")
    scratch = kernel_temporaries(memory, events)
    now = peak = 0
    for i, (_, n, _) in enumerate(memory):
        if i not in scratch:
            now += n
            peak = max(peak, now)
    return before + peak


def kernel_temporaries(memory: list, events: list) -> set[int]:
    """Indices of the memory events that are a kernel's own temporaries: an allocation and its
    free (the next free of that size on that thread) both inside the innermost op, not a mere
    allocating one, that holds the allocation."""
    ops: dict[int, list] = {}
    for e in events:
        if e.name().startswith("aten::"):
            ops.setdefault(e.start_thread_id(), []).append((e.start_ns(), e.end_ns(), e.name()))
    for spans in ops.values():
        spans.sort()
    frees: dict[tuple, list] = {}
    for i, (t, n, thread) in enumerate(memory):
        if n < 0:
            frees.setdefault((thread, -n), []).append((t, i))
    found = set()
    for i, (t, n, thread) in enumerate(memory):
        if n <= 0:
            continue
        spans = ops.get(thread, [])
        j = bisect.bisect_right(spans, (t, float("inf"), "")) - 1
        while j >= 0 and not (spans[j][1] >= t and spans[j][2] not in ALLOCATING):
            j -= 1  # (intervals nest: the latest-starting one that holds t is the innermost)
        if j < 0 or spans[j][2] in MODELLED:
            continue
        end = spans[j][1]
        candidates = frees.get((thread, n), [])
        k = bisect.bisect_right(candidates, (t, len(memory)))
        if k < len(candidates) and candidates[k][0] <= end:
            found.update((i, candidates.pop(k)[1]))
    return found
