"""Prepare a GPU machine that has torch but nothing else of ours, and cannot reach a package registry.

    python bench/prepare_device.py --python 3.12                # here, with network: fills bench/device_wheels
    python bench/prepare_device.py --python 3.12 --dry-run      # only print the pip commands
    bash bench/device_run.sh                                    # there: the one command (bench/README.md)

The device command (bench/gpu_check.py) needs the distributions named in bench/device_requirements.txt
and everything they require, except torch and what torch itself requires (the machine has those). This
script resolves that closure from the metadata of this environment (the one the tests run in), pins
each member to the version installed here, and downloads its wheel for the target Python version and
platform (`pip download --no-deps --only-binary=:all:`), so the machine installs exactly what was
tested, offline. pyautoattack's wheel ships a 44 MB example model (pyautoattack/examples/) that nothing
imports; it is repacked without that folder (RECORD rewritten to match) so that the folder travels with
the working tree under the 64 MiB a device call may carry.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "bench" / "device_requirements.txt"
WHEELS = ROOT / "bench" / "device_wheels"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
CARRY_LIMIT = 60 * 2**20   # a device call carries at most 64 MiB of ignored paths; keep a margin
DROP = {"pyautoattack": "pyautoattack/examples/"}   # wheel members nothing imports, dropped to fit


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def top_level(path: Path = REQUIREMENTS) -> list[str]:
    """The distribution names listed in device_requirements.txt (comments and blank lines skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def closure(names: list[str]) -> set[str]:
    """`names` and every distribution they require here (markers evaluated for this interpreter, no extras)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if canonical(name) in seen:
            continue
        seen.add(canonical(name))
        for text in md.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def pinned(names: list[str]) -> list[str]:
    """`name==version` for the closure of `names` minus torch's own, at the versions installed here."""
    needed = closure(names) - closure(["torch"])
    return sorted(f"{name}=={md.version(name)}" for name in needed)


def download_command(pins: list[str], python: str, dest: Path) -> list[str]:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
            "--python-version", python, *platforms, "--dest", str(dest), *pins]


def slim(wheel: Path, prefix: str) -> None:
    """Rewrite `wheel` without the members under `prefix`, its RECORD listing exactly what remains."""
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as target:
        kept = [info for info in source.infolist() if not info.filename.startswith(prefix)]
        record = next(info for info in kept if info.filename.endswith(".dist-info/RECORD"))
        rows = []
        for info in kept:
            if info is record:
                continue
            data = source.read(info)
            target.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{info.filename},sha256={digest},{len(data)}")
        target.writestr(record, "\n".join([*rows, f"{record.filename},,"]) + "\n")
    tmp.replace(wheel)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", required=True,
                        help="the device's Python version, e.g. 3.12 (repeat for several)")
    parser.add_argument("--dest", type=Path, default=WHEELS)
    parser.add_argument("--dry-run", action="store_true", help="print the pinned list and the pip commands only")
    args = parser.parse_args(argv)
    pins = pinned(top_level())
    args.dest.mkdir(parents=True, exist_ok=True)
    (args.dest / "requirements.txt").write_text("\n".join(pins) + "\n")
    (args.dest / "python-versions.txt").write_text(" ".join(args.python) + "\n")
    for python in args.python:
        command = download_command(pins, python, args.dest)
        print(shlex.join(command))
        if not args.dry_run:
            subprocess.run(command, check=True)
    if args.dry_run:
        return 0
    for name, prefix in DROP.items():
        for wheel in args.dest.glob(f"{name}-*.whl"):
            slim(wheel, prefix)
    size = sum(path.stat().st_size for path in args.dest.iterdir())
    print(f"{args.dest}: {len(pins)} distributions, {size / 2**20:.1f} MiB")
    if size > CARRY_LIMIT:
        print(f"error: {args.dest} is {size / 2**20:.1f} MiB, over the {CARRY_LIMIT / 2**20:.0f} MiB a device call "
              "carries; prepare one Python version at a time", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
