"""bench/gpu_bundle.py's trimmed wheel is one pip installs: on a fake wheel built here (a package
with a .py, a CPU library and CUDA 11.8 and 13.0 libraries), trim_wheel keeps exactly the Python
file, the metadata, the CPU and CUDA 13 libraries; the new RECORD lists each kept file once with its
sha256 and size; `pip install --no-index --no-deps --target` takes the result and the package imports
from there. A wheel whose file does not match its RECORD, and a failed download, write nothing.
Offline: nothing is downloaded.
"""

import csv
import hashlib
import io
import subprocess
import sys
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_bundle  # noqa: E402
from gpu_bundle import BundleError, keep_cpu_and_cuda13, trim_wheel  # noqa: E402

FILES = {  # name in the wheel -> contents
    "fakebnb/__init__.py": b"VALUE = 42\n",
    "fakebnb/libfakebnb_cpu.so": b"\x7fELF cpu",
    "fakebnb/libfakebnb_cuda118.so": b"\x7fELF cuda 11.8" * 100,
    "fakebnb/libfakebnb_cuda130.so": b"\x7fELF cuda 13.0" * 100,
    "fakebnb-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fakebnb\nVersion: 1.0\n"
                                      b"Requires-Dist: torch<3,>=2.4\n"
                                      b"Requires-Dist: pandas; extra == \"benchmark\"\n",
    "fakebnb-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                                   b"Tag: py3-none-any\n",
}
KEPT = {"fakebnb/__init__.py", "fakebnb/libfakebnb_cpu.so", "fakebnb/libfakebnb_cuda130.so",
        "fakebnb-1.0.dist-info/METADATA", "fakebnb-1.0.dist-info/WHEEL", "fakebnb-1.0.dist-info/RECORD"}


def sha256_b64(data: bytes) -> str:
    """Written out here rather than taken from gpu_bundle, so the test checks its encoding."""
    return "sha256=" + urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


def fake_wheel(folder: Path, files: dict = FILES) -> Path:
    """fakebnb-1.0-py3-none-any.whl holding `files`, with the RECORD of FILES (which other `files`
    then fail to match)."""
    path = folder / "fakebnb-1.0-py3-none-any.whl"
    record = "".join(f"{name},{sha256_b64(data)},{len(data)}\n" for name, data in FILES.items())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("fakebnb-1.0.dist-info/RECORD", record + "fakebnb-1.0.dist-info/RECORD,,\n")
    return path


def test_trim_keeps_python_metadata_cpu_and_cuda13(tmp_path):
    src = fake_wheel(tmp_path)
    dst = tmp_path / "out" / src.name
    dst.parent.mkdir()
    kept = trim_wheel(src, dst, keep_cpu_and_cuda13)
    with zipfile.ZipFile(dst) as z:
        assert set(z.namelist()) == KEPT == set(kept)
        assert z.testzip() is None
        rows = list(csv.reader(io.StringIO(z.read("fakebnb-1.0.dist-info/RECORD").decode())))
        files = {name: z.read(name) for name in z.namelist()}
    assert sorted(row[0] for row in rows) == sorted(KEPT)  # each file once
    for name, digest, size in rows:
        if name.endswith("/RECORD"):
            assert (digest, size) == ("", "")
        else:
            assert (digest, size) == (sha256_b64(files[name]), str(len(files[name]))), name
            assert files[name] == FILES[name]


def test_pip_installs_the_trimmed_wheel_and_it_imports(tmp_path):
    src = fake_wheel(tmp_path)
    dst = tmp_path / "out" / src.name
    dst.parent.mkdir()
    trim_wheel(src, dst, keep_cpu_and_cuda13)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(dst)], check=True)
    assert sorted(p.name for p in (target / "fakebnb").glob("*.so")) == ["libfakebnb_cpu.so",
                                                                         "libfakebnb_cuda130.so"]
    out = subprocess.run([sys.executable, "-c", "import fakebnb; print(fakebnb.__file__, fakebnb.VALUE)"],
                         cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert Path(out[0]).is_relative_to(target) and out[1] == "42"


def test_a_file_that_does_not_match_its_record_writes_nothing(tmp_path):
    src = fake_wheel(tmp_path, {**FILES, "fakebnb/__init__.py": b"VALUE = 43\n"})
    dst = tmp_path / "trimmed.whl"
    with pytest.raises(BundleError, match="fakebnb/__init__.py does not match"):
        trim_wheel(src, dst, keep_cpu_and_cuda13)
    assert not dst.exists()


def test_requirements_outside_extras_the_device_lacks(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path)
    assert gpu_bundle.requirements_device_lacks(wheel) == []  # torch; pandas only for an extra
    monkeypatch.setattr(gpu_bundle, "DEVICE_HAS", set())
    assert gpu_bundle.requirements_device_lacks(wheel) == ["torch<3,>=2.4"]


def test_a_failed_download_leaves_the_old_bundle_and_no_partial_folder(tmp_path, monkeypatch):
    def no_network(name, version, dest):
        raise BundleError(f"pip download {name}=={version} failed: no network")

    monkeypatch.setattr(gpu_bundle, "download_wheel", no_network)
    lock = tmp_path / "requirements.lock"
    lock.write_text("bitsandbytes==0.50.2\ngguf==0.19.0\n")
    out = tmp_path / ".gpu"
    out.mkdir()
    (out / "old.whl").write_bytes(b"old")
    with pytest.raises(BundleError, match="bitsandbytes==0.50.2 failed"):
        gpu_bundle.write_bundle(lock, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gpu", "requirements.lock"]
    assert (out / "old.whl").read_bytes() == b"old"
    lock.write_text("gguf==0.19.0\n")
    with pytest.raises(BundleError, match="pins no version of bitsandbytes"):
        gpu_bundle.write_bundle(lock, out)
