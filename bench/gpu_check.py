"""The one-shot GPU check: on a lent H100/H200, the CUDA paths proved or disproved in one table.

    python bench/gpu_check.py --out "$OUT"          # on a CUDA machine (make gpu-bundle: the command)
    python bench/gpu_check.py --dry-run             # every row on the CPU, at the same shapes
    python bench/gpu_check.py --budget 200 --skip speed --row-timeout 60
    python bench/gpu_check.py --only "torchrun fsdp" speed   # a rerun of some rows

Every row runs in a process of its own with its own timeout, so a crash, a sticky CUDA error, a hang
or a timeout costs that row alone: it is marked ERROR or TIMEOUT with the end of its log, and the
next row runs. Rows run in order of value, correctness first, then the speed cases: a row whose
estimate no longer fits in --budget seconds is SKIPPED, saying so. A row that cannot test what it
names here says SKIP and why (varlen without the kernel, NF4 without bitsandbytes), never PASS.

What comes back, and nothing else, in --out ($OUT by default): gpu_check.md (the table),
gpu_check.json (the same, for tools) and logs.tar.gz (each row's log), all three rewritten after
every row, so a run killed half-way leaves the rows it finished. Scratch (the random model, the
runs) lives in a temporary directory under /tmp and is removed at the end.

Rows (bench/gpu_rows.py and, for memory, bench/gpu_memory_rows.py hold the checks):
  precision    bf16 and fp16 (autocast, LoRA fp32) against fp32: the loss and every LoRA gradient
  packed       varlen and per-document attention against the block-diagonal mask; packed against
               unpacked; gradient checkpointing on against off
  nf4          NF4 logits on the GPU against the CPU's (bitsandbytes)
  torchrun     train.py under torchrun (nccl) with DDP and FSDP2 in bf16, against one process; a
               DDP run resumed from its step-2 checkpoint against the whole run
  memory       loading (bf16, NF4 while loading) takes the model plus one tensor, never two copies
               train.py --estimate-memory's counted peak against max_memory_allocated of the real
               step (1B bf16, 8B NF4; 2 x 2048, checkpointing), its total against reserved + context
  speed        bench/train_speed.py's GPU cases against transformers+PEFT (tokens/s, GiB allocated
               and reserved)
  torchrun     DDP and FSDP2 in fp32 (last: test_parallel proves them on gloo)

GPU_CHECK_HANG=<row name> makes that row sleep (to see a TIMEOUT end it while the others go on).
"""

import argparse
import importlib.metadata
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.errors import positive_float  # noqa: E402

LOG_TAIL = 15  # lines of a failed row's log quoted in the table's JSON
LOG_BYTES = 1 << 20  # the end of each row's log kept in logs.tar.gz


@dataclass
class Row:
    name: str
    check: str  # a function of gpu_rows
    args: tuple = ()
    cuda_s: float = 20  # seconds it is expected to take on an H100, process start included (a guess
    #                     until a GPU run measures it: the table's s column)
    dry_s: float = 20  # on a 2-core CPU, --dry-run at the CUDA shape (measured: 459 s in all)
    # A torchrun row of a precision also makes the one-process run it compares with (the first
    # such row pays for it), hence the ddp rows' larger estimates.


# In order of value: the correctness of what users run first (bf16 before fp32 where both are
# there: test_parallel covers fp32 DDP and FSDP on gloo), then memory, then what a step costs.
ROWS = [
    Row("precision bf16", "check_precision", ("bf16",), 12, 25),
    Row("precision fp16", "check_precision", ("fp16",), 12, 25),
    Row("packed varlen vs mask bf16", "check_packed_kernel", ("varlen", "bf16"), 10, 8),
    Row("packed documents vs mask fp32", "check_packed_kernel", ("documents", "fp32"), 10, 15),
    Row("packed documents vs mask bf16", "check_packed_kernel", ("documents", "bf16"), 10, 15),
    Row("packed vs unpacked", "check_packing", (), 10, 10),
    Row("grad checkpointing", "check_checkpointing", (), 10, 25),
    Row("nf4 device vs cpu", "check_nf4", (), 15, 20),
    Row("torchrun ddp bf16", "check_torchrun", ("ddp", "bf16"), 35, 90),
    Row("torchrun fsdp bf16", "check_torchrun", ("fsdp", "bf16"), 25, 40),
    Row("torchrun ddp resume", "check_resume", (), 35, 85),
    Row("memory load bf16", "check_load_memory", (None,), 10, 10),
    Row("memory load nf4", "check_load_memory", ("nf4",), 10, 10),
    Row("memory estimate llama-3.2-1b", "check_memory_estimate", ("llama-3.2-1b", None), 25, 10),
    Row("memory estimate llama-3.1-8b nf4", "check_memory_estimate", ("llama-3.1-8b", "nf4"), 50, 15),
    Row("speed llama-3.2-1b", "check_speed", ("llama-3.2-1b",), 30, 30),
    Row("speed deepseek-llm-7b", "check_speed", ("deepseek-llm-7b",), 45, 30),
    Row("speed llama-3.1-8b-qlora", "check_speed", ("llama-3.1-8b-qlora",), 75, 40),
    Row("speed llama-3.1-8b-qlora offloaded", "check_speed", ("llama-3.1-8b-qlora-offload", False), 40, 25),
    Row("speed llama-3.1-8b-qlora MLP tiled", "check_speed", ("llama-3.1-8b-qlora-tiled", False), 40, 25),
    Row("memory estimate llama-3.1-8b nf4 offloaded tiled", "check_memory_estimate",
        ("llama-3.1-8b", "nf4", True, 8), 50, 15),
    Row("torchrun ddp fp32", "check_torchrun", ("ddp", "fp32"), 20, 30),
    Row("torchrun fsdp fp32", "check_torchrun", ("fsdp", "fp32"), 20, 30),
]
ROW_NAMES = [r.name for r in ROWS]


# ----------------------------------------------------------------------------- one row, in its own process

class Context:
    """What a row reads: the device, the model's shape and directory, the scratch directory."""

    def __init__(self, device: str, shape_name: str, scratch: Path):
        import gpu_rows
        self.device, self.shape, self.scratch = device, gpu_rows.SHAPES[shape_name], scratch
        self.model_dir = scratch / "model"


def run_one(args):
    """Run the row args.one and write its result to args.result (the parent reads it)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_memory_rows
    import gpu_rows
    row = next(r for r in ROWS if r.name == args.one)
    checks = gpu_memory_rows if hasattr(gpu_memory_rows, row.check) else gpu_rows
    if os.environ.get("GPU_CHECK_HANG") == row.name:
        time.sleep(10**6)  # a hang, on request: the parent's timeout must end it
    ctx = Context("cpu" if args.dry_run else "cuda", args.shape, args.scratch)
    extra = (row.name.replace(" ", "-"),) if row.check in ("check_torchrun", "check_resume") else ()
    try:
        result = getattr(checks, row.check)(ctx, *row.args, *extra)
    except gpu_rows.Skip as e:
        result = {"status": "SKIP", "what": str(e)}
    else:
        if isinstance(result, gpu_rows.Measured):
            result = {"status": "MEASURED", "what": result.what, "figures": result.figures}
        else:
            result = {"status": "PASS" if result.figure <= result.bound else "FAIL", "figure": result.figure,
                      "bound": result.bound, "what": result.what, "figures": result.figures}
    args.result.write_text(json.dumps(result))


# ----------------------------------------------------------------------------- the runner

def run_row(row: Row, args, scratch: Path, timeout: float) -> dict:
    """The row in a child process (its own session, so a timeout ends it and everything it started)."""
    result_file, log = scratch / f"{row.name.replace(' ', '-')}.json", scratch / "logs" / f"{row.name.replace(' ', '-')}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", row.name, "--result", str(result_file),
           "--scratch", str(scratch), "--shape", args.shape] + ["--dry-run"] * args.dry_run
    t = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"})
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_process_tree(proc)
            rc = None
    seconds = time.perf_counter() - t
    if rc is None:
        return {"status": "TIMEOUT", "what": f"still running after {timeout:.0f} s", "log": tail(log), "s": seconds}
    if rc != 0 or not result_file.exists():
        return {"status": "ERROR", "what": f"exited {rc}: {last_error(log)}", "log": tail(log), "s": seconds}
    return {**json.loads(result_file.read_text()), "s": seconds}


def end_process_tree(proc: subprocess.Popen):
    """SIGKILL the row's process and all it started: its process group, and any descendant that
    made a session of its own (torchrun's ranks may)."""
    try:
        import psutil
        family = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing, or the process already gone
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in family:
        try:
            p.kill()
        except Exception:
            pass
    proc.wait()


def tail(log: Path, n: int = LOG_TAIL) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def last_error(log: Path) -> str:
    """The last line of a traceback's message, or the log's last line."""
    lines = [line for line in tail(log, 200) if line.strip()]
    errors = [line for line in lines if not line.startswith((" ", "\t")) and ("Error" in line or "error" in line)]
    return (errors or lines or ["(no output)"])[-1].strip()[:300]


def environment(args) -> dict:
    """What the table was measured on."""
    import torch
    env = {"torch": torch.__version__, "python": platform.python_version(), "budget_s": args.budget}
    env["device"] = "CPU (dry run)" if args.dry_run else device_name()
    if not args.dry_run:
        env["cuda"] = torch.version.cuda
    for name in ("bitsandbytes", "transformers", "peft"):  # versions from metadata: nothing imported here
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "missing"
    return env


def device_name() -> str:
    """The GPU's name, asked in a child process: this one never touches CUDA, so that no error of
    the device's can end it."""
    code = "import torch; print(torch.cuda.get_device_name())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return out.stdout.strip() or f"a CUDA device (its name: {out.stderr.strip()[-200:]})"
    except subprocess.TimeoutExpired:
        return "a CUDA device (its name did not come within 120 s)"


def write_report(out: Path, env: dict, rows: list[dict], scratch: Path, done: bool, planned: int):
    """gpu_check.md, gpu_check.json and logs.tar.gz in `out`, each replaced whole (written beside,
    then renamed): a run killed at any moment leaves the last complete report."""
    out.mkdir(parents=True, exist_ok=True)
    head = f"# gpu_check on {env['device']}: torch {env['torch']}, Python {env['python']}"
    extras = ", ".join(f"{k} {env[k]}" for k in ("cuda", "bitsandbytes", "transformers", "peft") if k in env)
    lines = [head, "", extras, "", "| row | result | figure | bound | what | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        figure = f"{r['figure']:.2e}" if "figure" in r else "-"
        bound = f"{r['bound']:.2e}" if "bound" in r else "-"
        lines.append(f"| {r['name']} | {r['status']} | {figure} | {bound} | {r['what'].replace('|', '/')} | "
                     f"{r.get('s', 0):.0f} |")
    total = sum(r.get("s", 0) for r in rows)
    lines += ["", f"{len(rows)} of {planned} rows, {total:.0f} s" + ("" if done else " (still running)")]
    replace(out / "gpu_check.md", "\n".join(lines) + "\n")
    replace(out / "gpu_check.json", json.dumps({"environment": env, "rows": rows, "complete": done}, indent=1))
    tmp = out / "logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for log in sorted((scratch / "logs").glob("*.log")):
            data = log.read_bytes()[-LOG_BYTES:]
            info = tarfile.TarInfo(f"logs/{log.name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp.rename(out / "logs.tar.gz")


def replace(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def run_all(args) -> int:
    import gpu_rows
    rows = [r for r in ROWS if not any(r.name.startswith(w) for w in args.skip)
            and (not args.only or any(r.name.startswith(w) for w in args.only))]
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-", dir="/tmp"))
    (scratch / "logs").mkdir()
    try:
        gpu_rows.write_model(scratch / "model", gpu_rows.SHAPES[args.shape])  # on the CPU: no CUDA here
        env, results, t0 = environment(args), [], time.perf_counter()
        for row in rows:
            left = args.budget - (time.perf_counter() - t0)
            estimate = row.dry_s if args.dry_run else row.cuda_s
            if estimate > left:
                result = {"status": "SKIPPED", "what": f"budget: needs about {estimate:.0f} s, {max(left, 0):.0f} s left"}
            else:
                timeout = min(args.row_timeout or max(3 * estimate, 60), left)
                result = run_row(row, args, scratch, timeout)
            results.append({"name": row.name, **result})
            print(f"{row.name}: {result['status']} {result['what']}", flush=True)
            write_report(args.out, env, results, scratch, done=False, planned=len(rows))
        write_report(args.out, env, results, scratch, done=True, planned=len(rows))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print((args.out / "gpu_check.md").read_text())
    return 1 if any(r["status"] in ("FAIL", "ERROR", "TIMEOUT") for r in results) else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every row on the CPU (no CUDA kernels), same shapes")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check"),
                   help="where the three files go (default $OUT, else runs/gpu-check)")
    p.add_argument("--budget", type=positive_float, default=420, help="seconds for all rows; rows that no longer fit are SKIPPED")
    p.add_argument("--row-timeout", type=positive_float, default=None,
                   help="seconds each row may run (default: 3x its estimate, at least 60, at most the budget left)")
    p.add_argument("--skip", nargs="*", default=[], metavar="ROW",
                   help="leave out the rows whose names start with these words (e.g. torchrun speed)")
    p.add_argument("--only", nargs="*", default=[], metavar="ROW",
                   help="run only the rows whose names start with these words (a rerun of some rows)")
    p.add_argument("--shape", choices=("cuda", "tiny"), default="cuda",
                   help="the random model's shape (tiny: the test suite's quick pass over every row)")
    p.add_argument("--one", choices=ROW_NAMES, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return run_one(args)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device; pass --dry-run to run every row on the CPU")
    sys.exit(run_all(args))


if __name__ == "__main__":
    main()
