"""Static throughput model of the kernels' inner loops (llvm-mca): AVX2 vs AVX-512.

Why a model: no CPU here has AVX-512, so that path can be tested (under SIMDe emulation) but not
timed. llvm-mca replays a loop on LLVM's scheduling model of a named core and predicts cycles per
iteration, so the two paths can be compared on the same core. It is a model: no cache misses,
no frequency changes, ideal front end. The AVX2 rows on znver3 (this machine's core) can be
checked against the measured kernel (BENCHMARKS.md, "CPU kernels").

    .venv/bin/python bench/kernel_mca.py            # needs llvm-mca (Debian: apt-get install llvm)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "plugins" / "cpu" / "routed_sparse_cpu.cpp"
VALUE_TYPES = {0: "fp32", 1: "fp16", 2: "bf16"}
# (kernel, path, symbol prefix by value type, instruction that marks the hot loop, lanes per
# marker, lanes per unit): the bitmap decode loop per mask byte (8 columns of one row), the
# prefill tile's loop per kept weight (times 64 tokens). Gathers (the csr16 decode loops) are
# left out: LLVM's models time them far from what this machine measures (znver3: 5 cycles per 8
# gathered values modelled, ~9 measured).
LOOPS = [
    ("bitmap decode", "avx2", "_ZN6se_cpu15dot_bitmap_avx2ILi{vd}E", "vpshufb", 8, 8),
    ("bitmap decode", "avx512", "_ZN9se_avx51210dot_bitmapILi{vd}E", "vexpandps", 16, 8),
    ("prefill tile", "avx2", "_ZN6se_cpu14row_block_avx2ILi{vd}ELi64ELb0E", "vfmadd231ps", 8, 64),
    ("prefill tile", "avx512", "_ZN9se_avx51213tile_productsILi{vd}ELi64E", "vfmadd231ps", 16, 64),
]
UNITS = {"bitmap decode": "mask byte", "prefill tile": "kept weight x 64 tokens"}


def compile_to_asm(out: Path) -> list[str]:
    """The kernel source as the library builds it (-O3), as assembly."""
    cmd = ["g++", "-std=c++17", "-O3", "-fopenmp", "-S", f"-I{SOURCE.parent}", str(SOURCE), "-o", str(out)]
    subprocess.run(cmd, check=True)
    return out.read_text().splitlines()


def function_body(lines: list[str], prefix: str) -> list[str]:
    """The body of the first function whose symbol starts with prefix (clones such as .constprop skipped)."""
    for i, line in enumerate(lines):
        name = line[:-1]
        if line.endswith(":") and name.startswith(prefix) and "." not in name:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(".size") and name in lines[j])
            return lines[i:end]
    raise SystemExit(f"no function {prefix}* in the assembly: did the kernel's signature change?")


def hottest_loop(body: list[str], marker: str) -> list[str]:
    """The backward-branch loop with the most marker instructions (the unrolled main loop)."""
    labels = {line[:-1]: i for i, line in enumerate(body) if re.match(r"^\.L\w+:$", line)}
    best: tuple[int, list[str]] | None = None
    for i, line in enumerate(body):
        m = re.match(r"^\s+j\w+\s+(\.L\w+)$", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            block = [b for b in body[labels[m.group(1)] + 1 : i + 1] if not b.strip().startswith(".")]
            count = sum(marker in b for b in block)
            if best is None or count > best[0]:
                best = (count, block)
    if not best or best[0] == 0:
        raise SystemExit(f"no loop with {marker} found")
    return best[1]


def mca_cycles(block: list[str], cpu: str, iterations: int = 200) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(block) + "\n")
    out = subprocess.run(["llvm-mca", f"-mcpu={cpu}", f"-iterations={iterations}", f.name],
                         capture_output=True, text=True, check=True).stdout
    Path(f.name).unlink()
    total = int(re.search(r"Total Cycles:\s+(\d+)", out).group(1))
    uops = int(re.search(r"Total uOps:\s+(\d+)", out).group(1))
    return {"cycles_per_iteration": total / iterations, "uops_per_iteration": uops / iterations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avx2-cpus", default="znver3,icelake-server", help="llvm-mca cores for the AVX2 loops")
    parser.add_argument("--avx512-cpus", default="icelake-server", help="llvm-mca cores for the AVX-512 loops")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernel_mca.json")
    args = parser.parse_args()
    if not shutil.which("llvm-mca"):
        sys.exit("llvm-mca not found: install LLVM (Debian: apt-get install llvm)")
    version = subprocess.run(["llvm-mca", "--version"], capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        asm = compile_to_asm(Path(tmp) / "kernels.s")
    rows = []
    for kernel, path, prefix, marker, lanes, unit_lanes in LOOPS:
        cpus = (args.avx2_cpus if path == "avx2" else args.avx512_cpus).split(",")
        for vd, vname in VALUE_TYPES.items():
            loop = hottest_loop(function_body(asm, prefix.format(vd=vd)), marker)
            units = sum(marker in line for line in loop) * lanes / unit_lanes
            for cpu in cpus:
                r = mca_cycles(loop, cpu)
                rows.append({"kernel": kernel, "path": path, "values": vname, "cpu": cpu, "unit": UNITS[kernel],
                             "units_per_iteration": units, **r, "cycles_per_unit": r["cycles_per_iteration"] / units})
    cols = list(dict.fromkeys((r["path"], r["cpu"]) for r in rows))
    print("| loop (cycles per unit) | values | " + " | ".join(f"{p.upper()} on {c}" for p, c in cols)
          + " | AVX2 / AVX-512, same core |")
    print("|---|---|" + "---:|" * (len(cols) + 1))
    for kernel, unit in UNITS.items():
        for vname in VALUE_TYPES.values():
            got = {(r["path"], r["cpu"]): r["cycles_per_unit"] for r in rows if r["values"] == vname and r["kernel"] == kernel}
            same = [got[("avx2", c)] / got[("avx512", c)] for path, c in cols
                if path == "avx512" and ("avx2", c) in got]
            print(f"| {kernel} (per {unit}) | {vname} | " + " | ".join(f"{got[k]:.2f}" for k in cols) + " | "
                  + (", ".join(f"**{x:.2f}x**" for x in same) or "-") + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps({"llvm_mca": version.strip().splitlines()[:2], "rows": rows}, indent=1))
    tmp_out.replace(args.out)
    print(f"wrote {args.out} (predicted cycles; a model, see the docstring)")


if __name__ == "__main__":
    main()
