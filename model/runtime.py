"""Where a command runs, in which dtype, and how much memory it took: one place for train.py,
chat.py, merge.py and the benchmarks, so that `--device auto --precision auto` means the same in
all of them.

    device = choose_device("auto")             # "cuda" when available, else "cpu"
    dtype = choose_dtype("auto", device)       # bf16 on a CUDA GPU that has it, else fp32
    ...
    peak_memory_gib()                          # CUDA's peak allocation, or the process's peak RSS
    peak_reserved_gib()                        # CUDA's peak reserved (allocations + its cache), or peak RSS
"""

import ctypes
import sys
from pathlib import Path

import torch

from .errors import UserError

# The names flags use for dtypes, and back.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class DeviceError(UserError):
    """A device that was asked for and is not there."""


def choose_device(name: str = "auto") -> str:
    """"cpu" or "cuda" for a --device flag: "auto" is CUDA when there is a GPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name}: expected auto, cpu or cuda")
    return name


def indexed_device(name: str) -> torch.device:
    """The torch.device a "cpu" or "cuda" flag means here, the GPU's index filled in: "cuda" is the
    calling thread's current GPU (under torchrun the rank's own, which parallel.init sets), and the
    current GPU is kept per thread: "cuda" on another thread (train.py's batch prefetcher) is GPU 0."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def choose_dtype(precision: str, device: str) -> torch.dtype:
    """The dtype for a --precision flag: "auto" is bf16 on a CUDA GPU that supports it (Ampere and
    later), else fp32; fp16 on the CPU is slow, and bf16 there is an explicit choice."""
    if precision == "auto":
        precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in DTYPES:
        raise DeviceError(f"--precision {precision}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[precision]


# CPU features that give native bf16 / fp16 arithmetic (Linux's /proc/cpuinfo names, x86 and Arm).
NATIVE_CPU_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"},
                    torch.float16: {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"}}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere: nothing is claimed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.split(":", 1)[1].split()}


def slow_precision_note(dtype: torch.dtype, device: str, flags: set[str] | None = None) -> str | None:
    """One line to print when bf16 or fp16 was asked for on a CPU that has no native arithmetic
    for it: there every operation converts to fp32 and back, and a step runs several times slower
    than in fp32 (5x measured on an AVX2 machine). None when there is nothing to say."""
    if device != "cpu" or dtype not in NATIVE_CPU_FLAGS:
        return None
    if NATIVE_CPU_FLAGS[dtype] & (cpu_flags() if flags is None else flags):
        return None
    name = dtype_name(dtype)
    return (f"--precision {name}: this CPU has no native {name} arithmetic; each operation converts "
            f"through fp32, so expect a step several times slower than --precision fp32")


def dtype_name(dtype: torch.dtype) -> str:
    """"bf16", "fp16", "fp32" (or torch's name for any other dtype, e.g. "float64")."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def reset_peak_memory():
    """Start the peak count afresh, so that peak_memory_gib and peak_reserved_gib cover what comes
    after (training, not loading): CUDA's peak statistics, and on Linux the process's VmHWM ("5" to
    clear_refs)."""
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gib() -> float:
    """The peak memory of this process, in GiB: CUDA's peak allocation when CUDA ran, else the peak
    resident set. Linux: VmHWM, this process's own high-water mark (ru_maxrss also counts what the
    parent held when it forked this process). Elsewhere ru_maxrss (bytes on macOS, KiB on Linux)."""
    if torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def peak_reserved_gib() -> float:
    """The peak memory CUDA's caching allocator held, in GiB: the allocations of peak_memory_gib plus
    the blocks it keeps cached for reuse and loses to fragmentation; what the GPU must have free,
    and what nvidia-smi shows (less the CUDA context). On the CPU, the peak resident set, the same
    figure as peak_memory_gib: there the process's memory is all the allocator holds (what glibc
    keeps after keep_freed_memory is resident, so it is already in it)."""
    if torch.cuda.is_initialized():
        return torch.cuda.max_memory_reserved() / 2**30
    return peak_memory_gib()


def keep_freed_memory():
    """On the CPU, have glibc keep freed memory for reuse rather than hand it back to the system.

    A training step frees and reallocates the same activation and logits buffers (megabytes to
    hundreds of megabytes each) every time. By default glibc serves such blocks with fresh mmaps and
    unmaps them on free, so every step page-faults (and zero-fills) all of them again. Raising the
    mmap and trim thresholds keeps them in the heap; the process's RSS then stays at its peak, which
    a training run reaches every step anyway.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): leave the allocator alone
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's <malloc.h>
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
