"""Start-up cost of the zero-code bootstrap: `python -c pass` with and without it on PYTHONPATH.

Prints the median wall time of each over N fresh interpreters (interleaved, so machine noise hits both
alike) and the bootstrap's median overhead in milliseconds; the target is at most 5 ms. Also times
`import fl_patch` and `import torch` with and without the bootstrap (the second includes applying).

    python benchmarks/bench_startup.py [--runs 40] [--json PATH] [--quick] [--no-bytecode]

By default the children may write bytecode, as on a user's machine: the warm-up run caches it and the timed
runs read it. ``--no-bytecode`` measures a machine that never writes it (``PYTHONDONTWRITEBYTECODE=1``, as set
on this project's own machines): fl_patch's cached bytecode is deleted first, so every run compiles its sources.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP = str(REPO / "sitecustomize")


def _env(with_bootstrap: bool, bytecode: bool = True) -> dict:
    # By default PYTHONDONTWRITEBYTECODE is dropped: as on a user's machine, the warm-up run caches bytecode.
    skip = ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FL_PATCH") and k not in skip}
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(([BOOTSTRAP] if with_bootstrap else []) + [str(REPO)])
    env["FL_PATCH_KERNELS"] = "reference"
    return env


def _time_once(code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return (time.perf_counter() - start) * 1000


def compare(code: str, runs: int, bootstrap_a: bool = False, bootstrap_b: bool = True, bytecode: bool = True) -> dict:
    """Median ms of `code` in fresh interpreters under two PYTHONPATH set-ups, interleaved."""
    a, b = [], []
    env_a, env_b = _env(bootstrap_a, bytecode), _env(bootstrap_b, bytecode)
    _time_once(code, env_a), _time_once(code, env_b)  # warm the file cache
    for _ in range(runs):
        a.append(_time_once(code, env_a))
        b.append(_time_once(code, env_b))
    return {"code": code, "runs": runs, "without_ms": statistics.median(a), "with_ms": statistics.median(b),
            "overhead_ms": statistics.median(b) - statistics.median(a)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="5 runs, `pass` and `import fl_patch` only")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="children never write bytecode, and fl_patch's cached bytecode is deleted first")
    args = parser.parse_args()
    runs = 5 if args.quick else args.runs
    bytecode = not args.no_bytecode
    if not bytecode:
        for cache in [*REPO.joinpath("fl_patch").rglob("__pycache__"), REPO / "sitecustomize" / "__pycache__"]:
            shutil.rmtree(cache, ignore_errors=True)
    results = [compare("pass", runs, bytecode=bytecode),
               compare("import fl_patch", runs, bootstrap_a=False, bootstrap_b=False, bytecode=bytecode)]
    if not args.quick:
        results.append(compare("import torch", max(5, runs // 4), bytecode=bytecode))
    for row in results:
        row["bytecode"] = "cached" if bytecode else "never written (PYTHONDONTWRITEBYTECODE=1, fl_patch's deleted)"
    results[1]["note"] = "import fl_patch vs itself, no bootstrap: its absolute cost is with_ms - pass without_ms"
    print(f"{'command':<18} {'without ms':>10} {'with ms':>9} {'overhead ms':>12}")
    for row in results:
        print(f"{row['code']:<18} {row['without_ms']:>10.1f} {row['with_ms']:>9.1f} {row['overhead_ms']:>12.2f}")
    print(f"bootstrap overhead on `python -c pass`: {results[0]['overhead_ms']:.2f} ms median (target <= 5 ms)")
    print(f"`import fl_patch` costs {results[1]['with_ms'] - results[0]['without_ms']:.2f} ms over `pass`")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
