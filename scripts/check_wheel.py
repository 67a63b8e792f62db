"""Checks what scripts/build_wheel.sh built: the wheel's tags, its auditwheel report, its contents.

Usage: python scripts/check_wheel.py dist/rslora_fast-*.whl [dist/rslora_fast-*.tar.gz]
Exits 1 naming the first problem.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

MAX_GLIBC = (2, 28)  # the oldest glibc the wheel must run on: RHEL/Rocky 8
MAX_BYTES = 64 * 2**20  # what travels to the GPU machine


def fail(msg: str) -> None:
    print(f"check_wheel: FAIL: {msg}")
    sys.exit(1)


def check_wheel(path: Path) -> None:
    m = re.fullmatch(r"rslora_fast-[^-]+-cp310-abi3-(manylinux_(\d+)_(\d+)_x86_64[.\w]*)\.whl", path.name)
    if not m:
        fail(f"{path.name}: expected a cp310-abi3-manylinux_2_X_x86_64 wheel")
    if (int(m.group(2)), int(m.group(3))) > MAX_GLIBC:
        fail(f"{path.name}: tagged for glibc {m.group(2)}.{m.group(3)}, newer than {MAX_GLIBC}")
    if path.stat().st_size > MAX_BYTES:
        fail(f"{path.name}: {path.stat().st_size} bytes, over {MAX_BYTES}")
    names = zipfile.ZipFile(path).namelist()
    for need in ("rslora_fast/_core.abi3.so", "rslora_fast/__init__.py", "rslora_fast/info.py"):
        if need not in names:
            fail(f"{path.name} lacks {need}")
    report = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(path)], capture_output=True, text=True
    )
    text = " ".join((report.stdout + report.stderr).split())
    print(text)
    tags = re.findall(r'"manylinux_(\d+)_(\d+)_x86_64"', text)
    if report.returncode != 0 or not tags:
        fail(f"auditwheel show {path.name} found no manylinux tag")
    if min((int(a), int(b)) for a, b in tags) > MAX_GLIBC:
        fail(f"auditwheel: {path.name} needs a glibc newer than {MAX_GLIBC}")
    print(f"check_wheel: ok {path.name} ({path.stat().st_size / 2**20:.1f} MiB)")


def check_sdist(path: Path) -> None:
    names = tarfile.open(path).getnames()
    for need in ("build.rs", "Cargo.toml", "pyproject.toml", "kernels/swiglu.cu", "kernels/common.cuh"):
        if not any(n.endswith("/" + need) for n in names):
            fail(f"{path.name} lacks {need}")
    print(f"check_wheel: ok {path.name} ({len(names)} files)")


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv]
    wheels = [p for p in paths if p.suffix == ".whl"]
    if len(wheels) != 1:
        fail(f"expected exactly one wheel, got {[p.name for p in wheels]}")
    for p in paths:
        check_wheel(p) if p.suffix == ".whl" else check_sdist(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
