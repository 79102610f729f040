"""Build .gpu/, the packages a lent GPU machine lacks, and print the command that runs gpu_check.py there.

    python bench/gpu_bundle.py          # or `make gpu-bundle`: rebuilds .gpu/ from nothing

The lent machine (one H100/H200, x86_64, Python 3.12, torch 2.11.0+cu130, transformers, peft, no
network) has all that bench/gpu_check.py needs but bitsandbytes (the nf4 row, QLoRA) and gguf
(merge.py and chat.py import it). Both travel as wheels in the run's `carry`, which holds 64 MiB for
the whole working tree. bitsandbytes' wheel is 43 MB because it ships one library per CUDA release
from 11.8 to 13.2, and ROCm and XPU ones; torch cu130 loads libbitsandbytes_cuda130.so. So the wheel
is trimmed to its Python files, its metadata, the CPU library and the CUDA 13 libraries, with RECORD
rewritten for what is kept, so that `pip install` takes it like the original. The versions are
requirements.lock's, the ones the test suite ran against.

.gpu/ is built in a temporary folder beside it and renamed into place only when complete: a failed
download or a bundle over MAX_BYTES leaves the previous .gpu/ (or none) as it was.
"""

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import HeaderParser
from fnmatch import fnmatch
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

CARRY = [".gpu"]
DEVICE_COMMAND = ('python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl'
                  ' && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$OUT"')
PACKAGES = ("bitsandbytes", "gguf")
MAX_BYTES = 20 * 2**20  # the carry holds 64 MiB in all: leave most of it to the repo itself
# The device's interpreter, for pip: CPython 3.12 on glibc x86_64 (bitsandbytes is manylinux_2_24).
DEVICE_WHEEL_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                     "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
                     "--platform", "manylinux_2_17_x86_64"]
# Native libraries kept: the CPU one (bitsandbytes loads it when no GPU is seen) and CUDA 13's
# (cuda130 for torch cu130; cuda132, 3.5 MB more, for a device whose torch is built on CUDA 13.2).
KEEP_LIBRARIES = ("lib*_cpu.so", "lib*_cuda13*.so")
# Requirements the device meets: torch, numpy and packaging (bitsandbytes' Requires-Dist; it also
# imports typing_extensions without listing it, which torch requires), pyyaml and tqdm (gguf's;
# transformers requires both).
DEVICE_HAS = {"torch", "numpy", "packaging", "pyyaml", "tqdm"}
# Requirements the device may lack that nothing we run imports: gguf imports requests only inside
# its remote-safetensors helpers, which merge.py and chat.py never call.
NOT_NEEDED = {"requests"}
# Markers are read as on the device; the rest of the environment (linux, x86_64) is this machine's.
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.0", "extra": ""}


class BundleError(Exception):
    """A one-line reason the bundle was not built."""


def pinned_version(lock: Path, name: str) -> str:
    """The version requirements.lock pins `name` at (its `name==version` line)."""
    try:
        lines = lock.read_text().splitlines()
    except OSError as e:
        raise BundleError(f"cannot read {lock}: {e.strerror}") from None
    for line in lines:
        pkg, sep, version = line.strip().partition("==")
        if sep and canonicalize_name(pkg) == canonicalize_name(name):
            return version
    raise BundleError(f"{lock} pins no version of {name} (no '{name}==' line)")


def download_wheel(name: str, version: str, dest: Path) -> Path:
    """pip download name==version's wheel for the device's Python into the empty folder `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *DEVICE_WHEEL_ARGS, "-d", str(dest),
           f"{name}=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no wheel written"]
        raise BundleError(f"pip download {name}=={version} failed: {last[0].strip()}")
    return wheels[0]


def keep_cpu_and_cuda13(name: str) -> bool:
    """True for every file of the wheel but the native libraries other than KEEP_LIBRARIES."""
    base = name.rpartition("/")[2]
    return not base.endswith(".so") or any(fnmatch(base, pattern) for pattern in KEEP_LIBRARIES)


def record_hash(data: bytes) -> str:
    """A RECORD hash: sha256, urlsafe base64 without padding (the wheel spec, PEP 376/427)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def record_name(wheel: zipfile.ZipFile, path: Path) -> str:
    """The wheel's `<name>-<version>.dist-info/RECORD`, which must be the only one at its top level."""
    found = [n for n in wheel.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
    if len(found) != 1:
        raise BundleError(f"{path}: not a wheel ({len(found)} .dist-info/RECORD files, want 1)")
    return found[0]


def trim_wheel(src: Path, dst: Path, keep) -> list[str]:
    """Write wheel `src` to `dst` with only the files `keep(name)` accepts and a RECORD for them.

    Every kept file must have the hash src's RECORD gives it, so a corrupted download fails here and
    not on the device. RECORD's own signatures (RECORD.jws, .p7s) sign the old RECORD: dropped.
    Entries keep their dates and permission bits, so the same src gives the same bytes. Returns the
    kept names, RECORD last.
    """
    try:
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
            record = record_name(zin, src)
            listed = {row[0]: row[1] for row in csv.reader(io.StringIO(zin.read(record).decode())) if row}
            rows = []
            for info in zin.infolist():
                name = info.filename
                if info.is_dir() or name.startswith(record) or not keep(name):
                    continue
                data = zin.read(info)
                digest = record_hash(data)
                if listed.get(name) != digest:
                    raise BundleError(f"{src}: {name} does not match the hash in its RECORD")
                rows.append([name, digest, str(len(data))])
                zout.writestr(copy_info(info, name), data)
            rows.append([record, "", ""])  # RECORD lists itself without a hash
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(rows)
            zout.writestr(copy_info(zin.getinfo(record), record), text.getvalue())
    except zipfile.BadZipFile as e:
        dst.unlink(missing_ok=True)
        raise BundleError(f"{src}: not a wheel ({e})") from None
    except BaseException:
        dst.unlink(missing_ok=True)  # no half-written wheel
        raise
    return [row[0] for row in rows]


def copy_info(info: zipfile.ZipInfo, name: str) -> zipfile.ZipInfo:
    """A fresh entry for `name` with `info`'s date and permission bits, deflated."""
    out = zipfile.ZipInfo(name, info.date_time)
    out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
    return out


def requirements_device_lacks(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist (outside extras, markers as on the device) not known to be there."""
    with zipfile.ZipFile(wheel) as z:
        dist_info = record_name(z, wheel).rpartition("/")[0]
        metadata = HeaderParser().parsestr(z.read(f"{dist_info}/METADATA").decode())
    lacking = []
    for line in metadata.get_all("Requires-Dist") or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            raise BundleError(f"{wheel.name}: cannot parse Requires-Dist {line!r}") from None
        if req.marker is not None and not req.marker.evaluate(DEVICE_MARKERS):
            continue
        if canonicalize_name(req.name) not in DEVICE_HAS | NOT_NEEDED:
            lacking.append(str(req))
    return lacking


def build_bundle(lock: Path, staging: Path) -> None:
    """Download PACKAGES' wheels at the lock's versions into `staging`, bitsandbytes trimmed."""
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as downloads:
        for name in PACKAGES:
            version = pinned_version(lock, name)
            wheel = download_wheel(name, version, Path(downloads) / name)
            lacking = requirements_device_lacks(wheel)
            if lacking:
                raise BundleError(f"{wheel.name} requires {', '.join(lacking)}, which the device may "
                                  "lack: bundle it, or list it in DEVICE_HAS if the device has it")
            if name != "bitsandbytes":
                shutil.copy(wheel, staging / wheel.name)
                continue
            kept = trim_wheel(wheel, staging / wheel.name, keep_cpu_and_cuda13)
            if not any(fnmatch(n.rpartition("/")[2], "lib*_cuda130.so") for n in kept):
                raise BundleError(f"{wheel.name} has no libbitsandbytes_cuda130.so, which torch cu130 loads")
            print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB as shipped, trimmed to the "
                  f"Python files, the CPU and CUDA 13 libraries")


def folder_bytes(folder: Path) -> int:
    """The size of every file under `folder`, in bytes."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_bundle(lock: Path, out: Path) -> None:
    """Build the bundle beside `out`, check its size, then put it in out's place."""
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # same file system: rename is atomic
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        build_bundle(lock, staging)
        size = folder_bytes(staging)
        if size >= MAX_BYTES:
            raise BundleError(f"the bundle is {size / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} MiB "
                              "limit (the carry holds 64 MiB for the whole tree)")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except OSError as e:  # a full disk, a read-only folder: name what we were writing
        raise BundleError(f"{out}: not written ({e.strerror or e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lock", type=Path, default=ROOT / "requirements.lock",
                   help="the versions to bundle (default: requirements.lock)")
    args = p.parse_args()
    out = ROOT / CARRY[0]  # the folder the device command installs from
    try:
        write_bundle(args.lock, out)
    except BundleError as e:
        sys.exit(f"gpu-bundle: {e}")
    print(f"{out.relative_to(ROOT)}/: {folder_bytes(out) / 2**20:.1f} MiB")
    for wheel in sorted(out.glob("*.whl")):
        print(f"  {wheel.name}  {wheel.stat().st_size / 2**20:.2f} MiB")
    print("device run:")
    print(f"carry {json.dumps(CARRY)}; command: {DEVICE_COMMAND}")


if __name__ == "__main__":
    main()
