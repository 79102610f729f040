"""train.py --estimate-memory: the memory a run's training step holds, counted, not guessed.

The step is plain PyTorch, so it can run on fake tensors (torch's FakeTensorMode: every op computes
its output's shape, dtype and size from the op's meta kernel, and no memory is allocated) and the
bytes alive can be counted op by op. `LiveBytes` is that mode: each storage an op creates is
counted while a Python object still refers to it (a weak reference tells when it dies), as the
caching allocator would hold it; its peak is the step's. train.py builds the model from config.json
alone on the meta device, injects LoRA as the run would, turns each tensor fake (`to_fake`) and
runs its own step functions (accumulate, update) twice, so that AdamW's state exists in the second.

What is alive at the peak is sorted by what it is: the frozen weights (by dtype, NF4 as its codes
and scales), the LoRA parameters, their gradients and AdamW state, the batch, the activations that
autograd saved for backward (a saved_tensors hook marks them; under checkpointing, the blocks'
inputs), and the rest, the transient of the op at the peak (the loss's logits chunk, a dequantized
weight, an attention output in flight). A kernel's own buffers, which no output shows, are added
while it runs where they scale with the batch: attention's backward (`LiveBytes.scratch`).

On CUDA each allocation is rounded up to the caching allocator's 512 bytes, as
torch.cuda.max_memory_allocated counts it; what fake tensors cannot see (the CUDA context, cuBLAS
workspaces, the allocator's fragmentation) is added on lines of its own, each with the size
assumed, so the counted part stays apart from the assumed.
"""

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, is_fake
from torch.utils._pytree import tree_flatten

GIB = 2**30
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this

# Categories of storage, in the order the table shows them.
WEIGHTS, LORA, GRADS, OPTIMIZER, BUCKETS, BATCH, SAVED, TRANSIENT, SCRATCH = (
    "frozen weights", "LoRA parameters", "LoRA gradients", "AdamW state", "DDP's gradient buckets", "batch",
    "activations saved for backward", "transient", "a kernel's own buffers")
HOST = "in host memory (offloaded)"  # counted apart: not on the device


class Entry:
    """One live storage: its bytes and what it is (a category, refined as the step goes on)."""
    __slots__ = ("nbytes", "category")

    def __init__(self, nbytes: int, category: str):
        self.nbytes, self.category = nbytes, category


class LiveBytes(FakeTensorMode):
    """A FakeTensorMode that counts the bytes of the storages alive after each op, and keeps, at
    the peak, which storages were alive (as Entry objects whose category may be refined later: a
    gradient is known as one only once backward stored it)."""

    def __init__(self, cuda: bool = False):
        super().__init__()
        self.cuda = cuda  # count as the CUDA caching allocator would, and CUDA's kernels' scratch
        self.block = CUDA_BLOCK if cuda else 1  # allocation granularity
        self.live: dict[int, Entry] = {}  # id of the storage -> Entry, while the storage lives
        self.now = self.peak = 0  # on the device
        self.host_now = self.host_peak = 0  # in host memory (--offload-activations), counted apart
        self.allocating_on_host = False
        self.peak_entries: list[tuple[Entry, int]] = []  # (entry, its bytes then)
        self.unrecorded = False  # the peak rose since the last snapshot: take one before anything frees
        self.depth = 0  # nesting of __torch_dispatch__: only the step's own ops (depth 0) allocate
        self.peak_phase = ""
        self.phase = "build"

    def size(self, storage) -> int:
        n = storage.nbytes()
        return -(-n // self.block) * self.block

    @contextmanager
    def meta_inputs(self):
        """Inside, ops may read meta tensors (FSDP2's to_empty of a model sharded on the meta device)."""
        self.allow_non_fake_inputs = True
        try:
            with self:
                yield
        finally:
            self.allow_non_fake_inputs = False

    def track(self, tensor: torch.Tensor, category: str = TRANSIENT) -> Entry | None:
        """Count `tensor`'s storage if it is not counted yet; -> its Entry. Of a DTensor (FSDP2's
        shards), its local tensor."""
        tensor = getattr(tensor, "_local_tensor", tensor)
        if not isinstance(tensor, FakeTensor):
            return None
        storage = tensor.untyped_storage()
        key = id(storage)
        entry = self.live.get(key)
        if entry is None and self.allocating_on_host:
            entry = self.live[key] = Entry(storage.nbytes(), HOST)
            self.host_now += entry.nbytes
            self.host_peak = max(self.host_peak, self.host_now)
            weakref.finalize(storage, self._gone, key, entry)
        elif entry is None:
            entry = self.live[key] = Entry(self.size(storage), category)
            self.now += entry.nbytes
            weakref.finalize(storage, self._gone, key, entry)
            self.rose()
        return entry

    def rose(self):
        """After the count grew: a new peak is noted, its contents kept only when the count is about
        to fall (`record`): copying what is alive at every rise would cost O(live) per op."""
        if self.now > self.peak:
            self.peak, self.unrecorded = self.now, True
            self.peak_phase = "backward" if torch._C._current_autograd_node() is not None else self.phase

    def record(self):
        """Before the count falls: keep what is alive as the peak's, if the peak is now."""
        if self.unrecorded:
            self.snapshot()

    def snapshot(self, *extra: Entry):
        """Keep what is alive now as the peak's: each entry with its size now (FSDP2 resizes
        storages in place), its category as it will be known."""
        self.peak_entries = [(e, e.nbytes) for e in (*self.live.values(), *extra)]
        self.unrecorded = False

    @contextmanager
    def storage_resizes(self):
        """Count storages resized in place, which no op shows: FSDP2 frees a gathered parameter's
        storage with resize_(0) after its block's forward, and grows it back for the next gather."""
        original = torch.UntypedStorage.resize_
        mode = self

        def resize_(storage, size):
            out = original(storage, size)
            entry = mode.live.get(id(storage))
            if entry is None:
                entry = mode.live[id(storage)] = Entry(0, TRANSIENT)
                weakref.finalize(storage, mode._gone, id(storage), entry)
            new = mode.size(storage)
            if new < entry.nbytes:
                mode.record()
            mode.now += new - entry.nbytes
            entry.nbytes = new
            mode.rose()
            return out

        torch.UntypedStorage.resize_ = resize_
        try:
            yield
        finally:
            torch.UntypedStorage.resize_ = original

    def _gone(self, key: int, entry: Entry):
        if self.live.get(key) is entry and entry.category == HOST:
            del self.live[key]
            self.host_now -= entry.nbytes
        elif self.live.get(key) is entry:
            self.record()
            del self.live[key]
            self.now -= entry.nbytes

    def to_host(self, tensor: torch.Tensor):
        """Count a tensor's storage as host memory from now on (--offload-embeddings' table)."""
        entry = self.track(tensor)
        if entry is not None and entry.category != HOST:
            self.record()
            self.now -= entry.nbytes
            entry.category, entry.nbytes = HOST, tensor.untyped_storage().nbytes()
            self.host_now += entry.nbytes
            self.host_peak = max(self.host_peak, self.host_now)

    def mark(self, tensor: torch.Tensor, category: str, only_from: tuple = (TRANSIENT,)):
        """Say what a counted tensor is (if it is still taken for `only_from`)."""
        entry = self.track(tensor, category)
        if entry is not None and entry.category in only_from:
            entry.category = category

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Only an op the step calls allocates: the ops a fake kernel or a decomposition runs inside
        # one (the first time an op is met; later its result comes from the mode's cache) compute
        # its shapes, not a kernel's buffers.
        self.depth += 1
        try:
            out = super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self.depth -= 1
        if self.depth == 0:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.track(t)
            scratch = self.scratch(func, args)
            if scratch:  # held while the kernel runs, beside its inputs and outputs
                self.now += scratch
                if self.now > self.peak:
                    self.rose()
                    self.snapshot(Entry(scratch, SCRATCH))  # now: the scratch is gone next line
                self.now -= scratch
        return out

    def scratch(self, func, args) -> int:
        """Bytes a kernel allocates for itself and frees before it returns, which no op's output
        shows, where they are large: bitsandbytes' NF4 matmul dequantizes the whole weight (in the
        activations' dtype) before it multiplies; and attention's backward.
        Modelled CUDA: FlashAttention-2's dq accumulator (fp32, B x round128(T) x H x
        round32(head_dim)) and its softmax row sums (fp32, B x H x round128(T)). The CPU: a
        contiguous copy of grad_out where its (B, T, H, D) view is not one (it is when the gradient
        comes back through the attention output's transpose), and each thread's blocks of scores
        and their gradients (fp32, and again in bf16/fp16), as aten's cpu_flash_attention_backward
        allocates them."""
        if getattr(func, "name", lambda: "")() == "bitsandbytes::gemm_4bit":  # NF4 weight dequantized whole
            return math.prod(args[2]) * args[0].element_size()  # shapeB, in A's dtype
        if func is not torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
            return 0
        grad_out, query = args[0], args[1]  # (B, H, T, D)
        B, H, T, D = query.shape
        S = args[2].shape[2]
        reduced = query.dtype in (torch.bfloat16, torch.float16)
        if self.cuda:
            if not reduced:  # fp32 does not take FlashAttention on CUDA
                return 0
            rounded = -(-T // 128) * 128
            return 4 * B * rounded * H * (-(-D // 32) * 32) + 4 * B * H * rounded
        q_split = min(256 if T >= 768 else 64 if T >= 192 else 32, T)
        kv_split = min(512, S)
        per_thread = 2 * q_split * kv_split
        threads = torch.get_num_threads()
        # grad_out is read as (B, T, H, D) and copied only if that view is not contiguous already
        copy = 0 if grad_out.transpose(1, 2).is_contiguous() else grad_out.numel() * grad_out.element_size()
        return (copy + threads * per_thread * 4
                + (threads * per_thread * query.element_size() if reduced else 0) + threads * q_split * 4)

    def at_peak(self) -> dict[str, int]:
        """Bytes alive at the peak, by category."""
        self.record()
        totals: dict[str, int] = {}
        for entry, nbytes in self.peak_entries:
            if nbytes and entry.category != HOST:
                totals[entry.category] = totals.get(entry.category, 0) + nbytes
        return totals

    def reset_peak(self):
        """From here on the peak is counted afresh (what is alive now is its floor)."""
        self.peak = self.now
        self.snapshot()
        self.peak_phase = self.phase

    def estimate(self, device: str, weights: dict, seconds: float) -> "Estimate":
        """The Estimate of what was counted, with CUDA's uncounted parts for a CUDA step."""
        categories = self.at_peak()
        extras = cuda_extras(self.peak) if device == "cuda" else {}
        return Estimate(device, self.peak, self.peak_phase, categories, weights, extras, seconds, self.host_peak)

    # model/offload.py's observer: what offloading keeps on the device, and what it puts on the host
    def kept(self, t: torch.Tensor):
        self.mark(t, SAVED)

    @contextmanager
    def host(self):
        """Storages made inside the block are host memory (offloaded activations): counted apart."""
        self.allocating_on_host = True
        try:
            yield
        finally:
            self.allocating_on_host = False

    @contextmanager
    def saved_for_backward(self):
        """Mark every tensor autograd saves for backward (outside checkpointed blocks, whose own
        hooks keep nothing: they recompute)."""
        def pack(t):
            self.mark(t, SAVED)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield


def to_fake(module: torch.nn.Module, mode: LiveBytes, device: torch.device = torch.device("cpu")):
    """Every parameter and buffer of a module built on the meta device as a fake tensor on `device`
    (same shape, dtype, requires_grad; no memory), in place; shared tensors stay shared."""
    made: dict = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:  # (t kept alive with it: its id is not reused meanwhile)
            made[id(t)] = (t, FakeTensor(mode, t.detach().to("meta"), device))
        return made[id(t)][1]

    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and not is_fake(p):  # (NF4 weights are built fake: lora.quant_shapes)
                if ("param", id(p)) not in made:  # a tied weight stays one Parameter
                    made[("param", id(p))] = (p, torch.nn.Parameter(fake(p), requires_grad=p.requires_grad))
                m._parameters[name] = made[("param", id(p))][1]
        for name, b in list(m._buffers.items()):
            if b is not None and not is_fake(b):
                m._buffers[name] = fake(b)


@contextmanager
def fake_process_group(world: int):
    """A process group of `world` ranks that sends nothing (torch's "fake" backend, made for tracing
    and memory tools): FSDP2 shards, gathers and reduce-scatters fake tensors as on rank 0."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def module_tensors(m: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a module holds itself (not its children's): parameters, buffers and, of an NF4
    weight, its quantization state's (absmax, codes, offset, and the nested state of double
    quantization)."""
    found = [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    states = [t.quant_state for t in found if getattr(t, "quant_state", None) is not None]
    while states:
        state = states.pop()
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif type(value).__name__ == "QuantState":
                states.append(value)
    return found


def weights_by_kind(model: torch.nn.Module, mode: LiveBytes) -> dict[str, int]:
    """The frozen weights' bytes by dtype, an NF4 layer's codes and scales together as "NF4"."""
    kinds: dict[str, int] = {}
    seen = set()
    for m in model.modules():
        nf4 = any(getattr(t, "quant_state", None) is not None for t in m._parameters.values())
        for t in module_tensors(m):
            storage = getattr(t, "_local_tensor", t).untyped_storage()
            entry = mode.live.get(id(storage))
            if t.requires_grad or id(storage) in seen or entry is not None and entry.category == HOST:
                continue
            seen.add(id(storage))
            nf4_part = nf4 and t is not m._parameters.get("bias")  # (an NF4 layer's bias stays as it was)
            kind = "NF4 (codes and scales)" if nf4_part else str(t.dtype).removeprefix("torch.")
            kinds[kind] = kinds.get(kind, 0) + mode.size(storage)
    return kinds


def fake_batch(batch: dict, mode: LiveBytes) -> dict:
    """A batch made and counted on the CPU (training/batches.step_batch) with each tensor fake, counted as the
    batch; PackedDocuments keep their CPU tensors (the host reads them, the step never waits on them)."""
    fake = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = FakeTensor(mode, v.to("meta"), torch.device("cpu"))
            mode.mark(v, BATCH)
        fake[k] = v
    return fake


def largest(total_at, budget: int, start: int, cap: int, low: int = 1) -> int:
    """The largest n in [low, cap] whose total_at(n) (bytes, growing with n) fits the budget; 0 if
    none does. Memory grows almost linearly in the batch and the length, so a line through two
    counts lands next to the answer; a bisection between the last n that fits and the first that
    does not then finds it exactly, in a few counts."""
    counted: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in counted:
            counted[n] = total_at(n)
        return counted[n] <= budget

    if not fits(low):
        return 0
    a = max(low, min(start, cap))
    b = min(cap, max(a * 2, low + 1))
    if b == a:
        return a
    fits(a), fits(b)
    slope = (counted[b] - counted[a]) / (b - a)
    guess = cap if slope <= 0 else int(a + (budget - counted[a]) / slope)
    guess = max(low, min(cap, guess))
    if fits(guess):  # step up until one does not fit
        lo, step = guess, 1
        while lo < cap and fits(min(cap, lo + step)):
            lo, step = min(cap, lo + step), step * 2
        if lo == cap:
            return cap
        hi = min(cap, lo + step)
    else:
        hi, step = guess, 1
        while hi - step > low and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(low, hi - step)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def budget_line(result: dict, batch: int, length: int) -> str:
    """Whether the run fits --memory-budget, and the largest batch and length that do."""
    verdict = "fits" if result["fits"] else "does not fit"
    return (f"{verdict} in {gib(result['budget_bytes'])} GiB (total {gib(result['total_bytes'])} GiB); "
            f"the largest --micro-batch-size at {length} tokens: {result['max_micro_batch_size']}; "
            f"the largest --max-seq-len at micro-batch {batch}: {result['max_seq_len']}")


@dataclass
class Estimate:
    """The counted step: its peak, where it falls, and what is alive there; plus, for CUDA, what
    fake tensors cannot see."""
    device: str
    peak_bytes: int  # counted: every storage the step's ops and its state hold, at the peak
    phase: str  # forward | backward | optimizer
    categories: dict[str, int]  # bytes alive at the peak, by category (sums to peak_bytes)
    weights_by_kind: dict[str, int]  # frozen weights by dtype (NF4: its codes and scales)
    extras: dict[str, int] = field(default_factory=dict)  # CUDA: assumed, not counted
    seconds: float = 0.0
    host_peak_bytes: int = 0  # --offload-activations: the host memory the offloaded activations peak at

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + sum(self.extras.values())

    def as_dict(self) -> dict:
        return {"device": self.device, "peak_bytes": self.peak_bytes, "peak_phase": self.phase,
                "categories": self.categories, "frozen_weights_by_kind": self.weights_by_kind,
                "not_counted": self.extras, "total_bytes": self.total_bytes, "host_peak_bytes": self.host_peak_bytes}


def cuda_extras(peak_bytes: int) -> dict[str, int]:
    """What a CUDA run holds beyond the counted tensors, as assumed sizes (bench/gpu_check.py
    measures them): the context (the driver's and the kernels' code, with lazy module loading), two
    cuBLAS workspaces, and the caching allocator's fragmentation, taken as a share of the counted
    peak."""
    return {"CUDA context (assumed 0.5 GiB)": GIB // 2,
            "cuBLAS and cuBLASLt workspaces (assumed 2 x 32 MiB)": 64 * 2**20,
            "allocator fragmentation (assumed 5% of the counted peak)": peak_bytes // 20}


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def table(est: Estimate, title: str):
    """The estimate as a rich Table: counted categories, the peak and its phase, then (CUDA) the
    assumed lines and the total nvidia-smi would show."""
    from rich.table import Table
    t = Table(title=title)
    t.add_column("what")
    t.add_column("GiB", justify="right")
    order = [WEIGHTS, LORA, GRADS, OPTIMIZER, BUCKETS, BATCH, SAVED, TRANSIENT, SCRATCH]
    for category in order:
        if category == WEIGHTS:
            for kind, n in est.weights_by_kind.items():
                t.add_row(f"frozen weights, {kind}", gib(n))
        elif est.categories.get(category):
            t.add_row(category + (" (at the peak)" if category in (SAVED, TRANSIENT, SCRATCH) else ""),
                      gib(est.categories[category]))
    t.add_row(f"[bold]peak, counted ({est.phase})[/bold]", f"[bold]{gib(est.peak_bytes)}[/bold]")
    for what, n in est.extras.items():
        t.add_row(f"+ {what}", gib(n))
    if est.extras:
        t.add_row("[bold]total, as nvidia-smi would show it[/bold]", f"[bold]{gib(est.total_bytes)}[/bold]")
    if est.host_peak_bytes:
        t.add_row(f"{HOST}, at its peak, not on the device", gib(est.host_peak_bytes))
    return t
