"""Whether two runs of the same config agree: every output byte for byte, except the timings in the records
(and the checksums over them) and the report's cost table and throughput column.

    python -m pipeline.compare results/ ../other-checkout/results/
    python -m pipeline.compare results/ gpu-rerun/results/ --rtol 1e-4     # numbers within a tolerance

With --rtol, outputs that differ in their bytes are compared as numbers: the arrays of .npy, .safetensors,
parquet and zarr stores, and the numbers in JSON records, each within the relative tolerance (and an
absolute one of rtol times the array's largest magnitude); integers and text must still be equal. A GPU
adds in no fixed order, so its reruns agree to a tolerance, not byte for byte; the CPU's do byte for byte.

Prints each output that differs (and each that only one side has) and exits 1 if any does. Logs,
benchmarks and resumable state are not outputs and are not compared.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .data import contract

VOLATILE_KEYS = {"seconds", "tokens_per_second", "checksum"}  # timings, and the checksums over them
SKIPPED = (contract.LOGS, contract.BENCHMARKS, "resume")


def outputs(results: Path) -> dict[str, Path]:
    return {p.relative_to(results).as_posix(): p for p in sorted(results.rglob("*"))
            if p.is_file() and p.relative_to(results).parts[0] not in SKIPPED}


def comparable(path: Path, root: Path):
    """A file's content as compared across runs: timings (and checksums over them) left out."""
    rel = path.relative_to(root).as_posix()
    if path.suffix == ".json":
        obj = _without(json.loads(path.read_text()))
        if rel == contract.REPORT_MANIFEST:
            obj["files"].pop(Path(contract.REPORT_MD).name)
            obj["files"].pop(Path(contract.REPORT_HTML).name)
        return obj
    if rel == contract.REPORT_MD:
        text = path.read_text().split("## Cost of each stage")[0]
        return re.sub(r"\| [\d,]+ \|$", "| tokens/s |", text, flags=re.M)  # the students' throughput column
    if rel == contract.REPORT_HTML:  # the same page (its table of contents names the section too)
        text = path.read_text().split('<h2 id="cost-of-each-stage">')[0]
        return re.sub(r"<td>[\d,]+</td></tr>", "<td>tokens/s</td></tr>", text)
    return path.read_bytes()


def _without(obj):
    if isinstance(obj, dict):
        return {k: _without(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_without(v) for v in obj]
    return obj


def differences(ours: Path, theirs: Path, rtol: float = 0.0) -> list[str]:
    a, b = outputs(ours), outputs(theirs)
    problems = [f"only in {ours}: {rel}" for rel in sorted(a.keys() - b.keys())]
    problems += [f"only in {theirs}: {rel}" for rel in sorted(b.keys() - a.keys())]
    differ = [rel for rel in sorted(a.keys() & b.keys()) if comparable(a[rel], ours) != comparable(b[rel], theirs)]
    if rtol:
        from .data.numbers import close

        differ = [rel for rel in differ if not close(a[rel], b[rel], rtol, ours, theirs)]
    return problems + [f"differs: {rel}" for rel in differ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ours", type=Path)
    p.add_argument("theirs", type=Path)
    p.add_argument("--rtol", type=float, default=0.0, help="compare differing outputs as numbers to this tolerance")
    args = p.parse_args()
    problems = differences(args.ours, args.theirs, args.rtol)
    print("\n".join(problems) or f"{len(outputs(args.ours))} outputs, all equal")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
