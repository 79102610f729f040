"""Training on several GPUs (or CPU processes) with PyTorch's own engines: DDP or FSDP2, under torchrun.

    torchrun --nproc_per_node=4 train.py --parallel ddp ...    # 4 replicas, LoRA gradients all-reduced
    torchrun --nproc_per_node=8 train.py --parallel fsdp ...   # 8 ranks share one sharded model

Every rank runs the same loop of train.py; this file holds what differs from one process:

    data      a global micro-batch has micro_batch_size x world_size examples and rank r takes the
              r-th slice of it (`rank_share`), so the ranks together see exactly what one process
              with the bigger micro-batch would, in the same seeded order, from the same position
    loss      the trained-token count of the whole global step is all-reduced first; each rank
              backprops sum(its token losses) / that count, and the gradients are *summed* over
              ranks (not averaged): the gradient is the single-process one, to rounding
    DDP       each rank holds the whole model; the LoRA gradients are all-reduced once per
              optimizer step (`no_sync` while accumulating)
    FSDP2     `fully_shard` on every decoder block (frozen base and LoRA alike) and on the rest of
              the model (embeddings, final norm, lm_head): each rank stores 1/world of everything
              and gathers one block at a time, so a model bigger than one GPU trains; the LoRA
              gradients are reduce-scattered and the optimizer state stays sharded. The model is
              built on the meta device and sharded before it has weights; each rank then reads
              only its own rows of each tensor from the files (`load_shards`), so no rank ever
              holds the whole model, in memory or on the GPU
    saving    LoRA weights and optimizer state are gathered whole on every rank and rank 0 writes
              the files a single process writes, so checkpoints move freely between the two
    numbers   what the host holds (token counts, the stop flag) is summed over a gloo group beside
              nccl, which waits for the other ranks but never for the GPU (`all_reduce_sum`); the
              step's loss sums are summed on the device (`all_reduce_tensor`) and read once, with
              the grad norm: a step waits for the GPU once, as in one process
    failures  collectives time out after --parallel-timeout seconds; a rank that raises prints
              its error with its rank and exits non-zero, and torchrun then stops the others

A micro-batch slice can be empty (the last micro-batch of an epoch may hold fewer than
micro_batch_size x world_size examples). That rank still runs forward and backward, on
`empty_batch()`: one pad token with no trained target, so it joins the gradient collectives and
adds exactly zero.
"""

import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import lora
from model.llama import rope_frequencies
from model.files import checkpoint_tensors, read_tensor
from model.loss import IGNORE_INDEX, LanguageModelLoss

# -----------------------------------------------------------------------------
# the process group

def launched_by_torchrun() -> bool:
    """torchrun (and other launchers: deepspeed, srun scripts) set RANK and WORLD_SIZE per process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


_host_group = None  # a gloo group of all ranks beside the device's, made by init: all_reduce_sum's


def init(device: str, timeout_s: float):
    """Join the other ranks (nccl on CUDA, gloo on the CPU) if a launcher started this process, and
    make a second group of them on gloo, for the numbers the host holds (all_reduce_sum); on the
    CPU both groups are gloo.

    On CUDA each rank takes the GPU of its LOCAL_RANK, so "cuda" means that GPU from here on.
    A collective that waits longer than `timeout_s` for a rank fails instead of hanging.
    """
    global _host_group
    if not launched_by_torchrun() or dist.is_initialized():
        return
    device_id = None
    if device == "cuda":
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device_id)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout, device_id=device_id)
    _host_group = dist.new_group(backend="gloo", timeout=timeout)


def shutdown():
    """Leave the process group once every rank is done.

    The barrier also lets gloo's worker thread release the last collectives' tensors first: that
    needs the GIL, which the main thread holds while DDP tears the group down (a deadlock seen
    here; pytorch/pytorch#56297)."""
    global _host_group
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # every group, the host group too
    _host_group = None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 alone logs, writes metrics, TensorBoard and checkpoints."""
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


class Silent:
    """Stands in for the metrics file and the TensorBoard writer on ranks other than 0."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# -----------------------------------------------------------------------------
# data and reductions

def rank_share(global_micro_batch: list, micro_batch_size: int) -> list:
    """This rank's slice of a global micro-batch: items [r * mb, (r + 1) * mb). May be empty."""
    r = rank()
    return global_micro_batch[r * micro_batch_size:(r + 1) * micro_batch_size]


def empty_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch that trains nothing: one pad token, label -100, attention_mask 0."""
    return {"input_ids": torch.tensor([[pad_id]]), "labels": torch.tensor([[IGNORE_INDEX]]),
            "attention_mask": torch.tensor([[0]])}


def all_reduce_sum(*values):
    """The sums over all ranks of some Python numbers (ints stay ints); in one process, the numbers.

    For numbers the host already holds (token counts, a stop flag): they go over init's gloo group,
    in a CPU tensor, so the host waits for the other ranks to get there but never for the GPU (over
    nccl they would be copied to the GPU and read back, behind the queued kernels)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, group=_host_group)
    return tuple(type(v)(x) for v, x in zip(values, t.tolist()))


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all ranks where it lies (nccl on the GPU: queued behind the kernels that make
    it, the host does not wait); in one process, `t` itself. For values still on the device (the
    loss sums of a step), so that they are read once, with the rest of the step's figures."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (every rank must then take the same branch)."""
    return all_reduce_sum(int(flag))[0] > 0


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects the host holds: RNG
    states, GRPO's rewards and completions), over the host's gloo group."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * world_size()
    dist.all_gather_object(objects, obj, group=_host_group)
    return objects


# FSDP2 and DTensor are imported only under torchrun: they add a second or two to every start.

def is_shard(t) -> bool:
    """Whether `t` is an FSDP2 shard: a DTensor, 1/world of a parameter, gradient or state."""
    if not dist.is_initialized():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def fsdp2_available() -> bool:
    """Whether this torch has FSDP2 as wrap() uses it: public `fully_shard`, forward methods other
    than forward, and per-module sum reduction (older releases lack some of these)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method  # noqa: F401
    except ImportError:
        return False
    return all(hasattr(FSDPModule, m) for m in ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms"))


def shards_model(mode: str) -> bool:
    """Whether this run shards its model with FSDP2 (--parallel fsdp, under torchrun)."""
    return mode == "fsdp" and dist.is_initialized()


def is_fsdp(module) -> bool:
    if not dist.is_initialized():
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (every rank must call this), else `t` itself."""
    return t.full_tensor() if is_shard(t) else t


def shard_like(whole: torch.Tensor, shard) -> torch.Tensor:
    """This rank's part of `whole`, placed as `shard` is (each rank cuts its own: no communication)."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(whole.to(shard.device), shard.device_mesh, shard.placements, src_data_rank=None)


# -----------------------------------------------------------------------------
# the model under DDP or FSDP2

def _allreduce_sum_hook(process_group, bucket):
    """DDP comm hook: sum the ranks' gradients instead of averaging them, because each rank's loss
    is already divided by the trained tokens of the whole global step (all ranks)."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap(loss_fn: LanguageModelLoss, mode: str, device: str = "cpu") -> nn.Module:
    """The module the training micro-steps call under torchrun: DDP(loss_fn), or `loss_fn` with its
    model sharded in place by FSDP2 (mode "fsdp"); `loss_fn` itself when no process group is up.

    Call after LoRA is injected and before the optimizer is built: FSDP2 replaces every parameter
    of the model by its shard (a DTensor). A model on the meta device (model.load.meta_model, as
    train.py builds it for FSDP) gets its weights here, after sharding: `load_shards`.
    """
    if not dist.is_initialized():
        return loss_fn
    if mode == "ddp":
        # Every rank loaded the same checkpoint and drew the same LoRA init from the same seed, so
        # there is nothing to broadcast (init_sync would send the whole frozen base).
        cuda = next(loss_fn.parameters()).is_cuda
        ddp = DistributedDataParallel(loss_fn, device_ids=[torch.cuda.current_device()] if cuda else None,
                                      init_sync=False)
        ddp.broadcast_buffers = False  # the only buffer is RoPE's constant inv_freq: no sync per forward
        ddp.register_comm_hook(None, _allreduce_sum_hook)
        return ddp
    model = loss_fn.model
    shard(model)
    if model.lm_head.weight.is_meta:
        load_shards(model, device)
    return loss_fn


def shard(model: nn.Module):
    """FSDP2 over the model, in place: each decoder block a unit, and the rest the root."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for layer in model.model.layers:
        fully_shard(layer)  # gathered for its forward, freed after, gathered again in backward
    fully_shard(model)  # the root: embed_tokens, norm and lm_head (tied or not)
    # lm_loss_sum calls model.hidden_states, then uses lm_head.weight: let FSDP gather the root's
    # parameters for hidden_states as it does for forward (the root stays gathered until backward).
    register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if is_fsdp(module):  # sum the ranks' gradients, as with DDP above, with a
            module.set_gradient_divide_factor(1.0)  # plain SUM reduce-scatter (gloo has no other)
            module.set_force_sum_reduction_for_comms(True)


def shard_rows(p) -> tuple[int, int]:
    """The rows [start, end) of the whole tensor that this rank's shard of `p` holds. FSDP2 shards
    dim 0 as torch.chunk does: ceil(rows / world) each, the last ranks fewer (or none)."""
    n, local = p.shape[0], p.to_local().shape[0]
    per_rank = -(-n // world_size())
    start = min(rank() * per_rank, n)
    if local != min(per_rank, n - start):
        raise RuntimeError(f"FSDP2 placed {local} of {n} rows on rank {rank()}; expected torch.chunk's layout")
    return start, start + local


@torch.no_grad()
def load_shards(model: nn.Module, device: str):
    """Fill a model that FSDP2 sharded while it was on the meta device. Each parameter gets storage
    for its shard alone; each rank reads from the checkpoint files only the rows its shards hold
    (safetensors reads slices from disk); LoRA's A and B are initialised as one process does it,
    the same draws in the same order (every rank draws each whole A, small, and keeps its rows),
    so a run under FSDP starts where a single-process run with the same seed starts."""
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gave lm_head its own tensor; share the embeddings' again
    model.rope_inv_freq = rope_frequencies(model.config).to(device)
    params = dict(model.named_parameters())
    for key, f in checkpoint_tensors(model.source_dir):
        p = params[key]
        if is_shard(p):
            start, end = shard_rows(p)
            p.to_local().copy_(read_tensor(f, key, (start, end)))  # copy_ casts to p's dtype
        else:
            p.copy_(read_tensor(f, key))
    for m in lora.lora_modules(model).values():
        A, B = m.lora_A.weight, m.lora_B.weight
        A_whole, B_whole = torch.empty(A.shape, device=device), torch.empty(B.shape, device=device)
        lora.init_lora_weights(A_whole, B_whole)
        for p, whole in ((A, A_whole), (B, B_whole)):
            p.copy_(shard_like(whole, p) if is_shard(p) else whole)


def gradient_sync(module: nn.Module, enabled: bool):
    """Context for one micro-batch's forward and backward: only the step's last one communicates
    gradients (DDP's no_sync; FSDP2's set_requires_gradient_sync); the others accumulate locally."""
    if isinstance(module, DistributedDataParallel):
        return nullcontext() if enabled else module.no_sync()
    if is_fsdp(getattr(module, "model", None)):
        module.model.set_requires_gradient_sync(enabled)
    return nullcontext()


# -----------------------------------------------------------------------------
# saving and loading: the files of a single process

def _lora_linears(model: nn.Module) -> list[nn.Linear]:
    return [getattr(m, f"lora_{ab}") for m in lora.lora_modules(model).values() for ab in "AB"]


@contextmanager
def full_lora(model: nn.Module):
    """Under FSDP2: inside the block, A and B of every LoRA layer are whole tensors, so lora's own
    save_adapter and load_adapter work unchanged; on exit each rank copies its shard of them back
    (a loaded adapter lands in the shards) and the sharded parameters return. Else a no-op."""
    swapped = []
    for linear in _lora_linears(model):
        shard = linear.weight
        if is_shard(shard):
            linear.weight = nn.Parameter(shard.full_tensor(), requires_grad=shard.requires_grad)
            swapped.append((linear, shard))
    try:
        yield
    finally:
        with torch.no_grad():
            for linear, shard in swapped:
                shard.copy_(shard_like(linear.weight.detach(), shard))
                linear.weight = shard  # the very Parameter the optimizer holds


def save_adapter(model: nn.Module, lora_config, out_dir, base_model: str, files: dict[str, str] | None = None):
    """lora.save_adapter, once for all ranks: gathered under FSDP2, written by rank 0."""
    with full_lora(model):
        if is_main():
            lora.save_adapter(model, lora_config, out_dir, base_model, files)
    barrier()


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every FSDP2-sharded state tensor (exp_avg, ...) gathered whole:
    the layout one process saves, so the checkpoint resumes with any number of ranks."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict):
    """optimizer.load_state_dict of a full_optimizer_state, each tensor cut to its parameter's shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    like = lambda value, p: shard_like(value, p) if is_shard(p) and value.dim() > 0 else value  # not `step`
    optimizer.load_state_dict({**state, "state": {i: {k: like(v, params[i]) for k, v in s.items()}
                                                  for i, s in state["state"].items()}})
