"""`make wheels`: the wheels a GPU node without internet needs to run the pipeline and `make gpu-check`, in one
folder (.whl/, which git ignores): every package of this environment but torch and CUDA's own (the node's
CUDA build of torch stays), at this environment's versions, for the node's Python.

    python bench/wheels.py --out .whl --python-version 3.12     # make wheels WHEEL_PYTHON=3.12

Then copy the folder to the node with the repository and run `make gpu-check WHEELS=.whl` there: the check
installs what the node lacks from it (pip --no-index). A package with no wheel for that Python or platform is
listed at the end; build it on the node, or pick another --python-version.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

KEPT_ON_THE_NODE = ("torch", "triton", "nvidia-", "mlsm-pipeline", "pip", "setuptools", "wheel")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def wanted() -> list[str]:
    names = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and not name.lower().startswith(KEPT_ON_THE_NODE):
            names[name.lower()] = f"{name}=={dist.version}"
    return sorted(names.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(".whl"))
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform={name}" for name in PLATFORMS]
    missing = []
    for requirement in wanted():
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               f"--python-version={args.python_version}", "--implementation=cp", *platforms,
                               "-d", str(args.out), requirement], capture_output=True, text=True)
        if done.returncode:
            missing.append(requirement)
    print(f"{len(list(args.out.glob('*.whl')))} wheels in {args.out}" +
          (f"; no wheel for Python {args.python_version}: {', '.join(missing)}" if missing else ""))


if __name__ == "__main__":
    main()
