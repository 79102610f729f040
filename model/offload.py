"""Activation offloading (--offload-activations): what autograd saves for backward waits in host
memory, not on the GPU, between a block's forward and its backward.

With gradient checkpointing a decoder block keeps only its input x (B, T, hidden) for the
recomputation, one per block: at long T those inputs are most of the activations (a 32-block 8B
model at 2 x 2048 tokens in bf16: 32 x 32 MiB). Without checkpointing every tensor a block saves
counts. `Offloader.block(i)` is a saved-tensors hook around block i (torch.autograd.graph
.saved_tensors_hooks): `pack` copies each saved tensor worth moving to host memory and hands
autograd a handle instead, so the device copy is freed as soon as forward is done with it;
`unpack`, in backward, returns the tensor on the device again and starts bringing back the
tensors of block i - 1, the next backward needs, so that copy runs behind block i's backward.

Under checkpointing the hook sees what torch.utils.checkpoint saves of a block, its inputs; the
tensors the recomputation saves are its own business (its hooks keep them only until the block's
backward). Not moved: tensors under `min_bytes` (their copy costs more than they hold), the
model's parameters and buffers, and the tensors every block shares (`keep`: RoPE's cos and sin,
the attention mask), which would be copied once per block.

On CUDA the copies run on a side stream into pinned host memory, ordered by events, never by a
host sync: pack makes the side stream wait for the compute stream, copies, and tells the caching
allocator (record_stream) that the device tensor is in use until the copy is done; unpack makes
the compute stream wait for the copy back. On the CPU the same path copies host to host, so
its correctness is tested without a GPU.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are

_observer = None  # the memory estimate's: told what is kept on the device and what goes to the host


@contextmanager
def observed(observer):
    """Inside the block, `observer.kept(t)` is called for each saved tensor left on the device, and
    each host copy is made inside `observer.host()` (training/memory_estimate.py counts them apart)."""
    global _observer
    before, _observer = _observer, observer
    try:
        yield
    finally:
        _observer = before


@dataclass
class Offloaded:
    """A saved tensor in host memory: what autograd holds instead of the device tensor."""
    block: int
    host: torch.Tensor  # (span,): the saved tensor's elements as its strides lay them out; pinned on CUDA
    device: torch.device  # where unpack returns it
    shape: torch.Size
    stride: tuple
    fetched: torch.Tensor | None = None  # brought back ahead of its block's backward
    ready: object = None  # CUDA: the event after the copy back


class Offloader:
    """The saved-tensor hooks of one forward pass; `block(i)` around each decoder block."""

    def __init__(self, device: torch.device, keep=(), resident=(), min_bytes: int | None = None):
        self.cuda = torch.device(device).type == "cuda"
        self.stream = side_stream(torch.device(device)) if self.cuda else None
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        # storages never moved: the model's parameters and buffers, and the tensors blocks share
        self.resident = {_storage(t) for t in (*resident, *keep) if isinstance(t, torch.Tensor)}
        self.blocks: dict[int, list[Offloaded]] = {}
        self.prefetched: set[int] = set()  # blocks whose tensors were brought back ahead, once each

    @contextmanager
    def block(self, i: int):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self.pack(t, i), self.unpack):
            yield

    def pack(self, t: torch.Tensor, block: int):
        if t.nbytes < self.min_bytes or _storage(t) in self.resident or t.device.type == "meta":
            if _observer is not None:
                _observer.kept(t)
            return t
        # The span of t's storage that holds it, copied flat: unpack gives back t's very strides
        # (a compiled backward expects them), a view of part of a larger tensor included.
        span = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride())) if t.numel() else 0
        flat = t.as_strided((span,), (1,), t.storage_offset())  # (span,), a view of t's storage
        with _observer.host() if _observer is not None else nullcontext():
            host = self.host_empty(span, t.dtype)
        if self.cuda:  # on the side stream, once the compute stream has made t
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(flat, non_blocking=True)
            t.record_stream(self.stream)  # t's memory is not reused before the copy is done
        else:
            host.copy_(flat)
        handle = Offloaded(block, host, t.device, t.shape, t.stride())
        self.blocks.setdefault(block, []).append(handle)
        return handle

    def host_empty(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Host memory for n elements: pinned on CUDA, so the copies run asynchronously."""
        return torch.empty(n, dtype=dtype, pin_memory=self.cuda)

    def unpack(self, handle):
        if not isinstance(handle, Offloaded):
            return handle
        if handle.fetched is None:
            self.fetch(handle)
        if handle.block - 1 not in self.prefetched:  # the next backward's, behind this one
            self.prefetched.add(handle.block - 1)
            for ahead in self.blocks.get(handle.block - 1, ()):
                self.fetch(ahead)
        t, handle.fetched = handle.fetched, None  # the device copy lives as long as autograd uses it
        if self.cuda:
            current = torch.cuda.current_stream(t.device)
            current.wait_event(handle.ready)
            t.record_stream(current)
        return t

    def fetch(self, handle: Offloaded):
        """Start the copy back to the device (on CUDA, on the side stream, with an event after)."""
        if not self.cuda:
            handle.fetched = handle.host.clone().as_strided(handle.shape, handle.stride)
            return
        with torch.cuda.stream(self.stream):
            flat = handle.host.to(handle.device, non_blocking=True)
            handle.fetched = flat.as_strided(handle.shape, handle.stride)
            handle.ready = torch.cuda.Event()
            handle.ready.record(self.stream)


_streams: dict[torch.device, object] = {}


def side_stream(device: torch.device):
    """The copies' CUDA stream on `device`: one for the process, not one per forward."""
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def _storage(t: torch.Tensor) -> int:
    """An identity of the memory a tensor views (views of one tensor share it)."""
    return t.untyped_storage()._cdata
