"""The output samples that README.md and docs/*.md show, checked against (or rewritten from) a fresh run.

A sample is the fenced block right after a line ``<!-- sample: NAME -->``; NAME is a key of :data:`SAMPLES`,
which says which command prints it. A sample of kind ``code`` runs the ``python`` block that follows the line
``<!-- sample-code: NAME -->`` in the same file, so the code shown is the code that ran.

    python tools/readme_samples.py           # check every sample; exit 1 with a diff where one is stale
    python tools/readme_samples.py --write   # replace every sample with a fresh run's output

Samples are what a CPU machine without FlagGems prints (CI's machine): the commands run from the repository
root with this interpreter, no ``FL_PATCH_*`` / ``LIGHTX2V_FL_*`` variables and no ``PYTHONPATH``. A check
compares a sample and the fresh output after these normalizations of both:

- a number with a decimal point or an exponent (``5.36e-07``, ``0.47``, ``7.3``, ``2.13.0``) reads as ``#``:
  error magnitudes, timings and versions differ between machines and releases;
- runs of spaces read as one space, and trailing spaces are dropped (column widths follow the numbers).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- sample(-code)?: ([\w.-]+) -->$")
NUMBER = re.compile(r"\d*\.\d+(?:\.\d+)*(?:e[-+]?\d+)?|\d+e[-+]?\d+")


@dataclass(frozen=True)
class Sample:
    """What prints a sample: `argv` after the interpreter, or, for ``code``, the marked python block."""

    argv: tuple[str, ...] = ()
    code: bool = False
    timeout_s: int = 120


SAMPLES = {
    "demo": Sample(("examples/demo.py",)),
    "status": Sample(("-m", "fl_patch", "status")),
    "record": Sample(code=True),
    "targets": Sample(code=True),
    "check-quick": Sample(("-m", "fl_patch", "check", "--quick")),
}


@dataclass
class Block:
    """A fenced block after a marker: `first`..`last` are the indices of its content lines in `lines`."""

    path: Path
    name: str
    code: bool
    first: int
    last: int

    def text(self, lines: list[str]) -> str:
        return "\n".join(lines[self.first:self.last])


def documents() -> list[Path]:
    """The files that may hold samples: README.md and every page under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def find_blocks(path: Path, lines: list[str]) -> list[Block]:
    """Every marked block of one file; ValueError naming the line for a marker without a fenced block after it
    or with an unknown name."""
    blocks = []
    for index, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        code, name = bool(match.group(1)), match.group(2)
        where = f"{path.relative_to(REPO)}:{index + 1}"
        if name not in SAMPLES:
            raise ValueError(f"{where}: unknown sample {name!r}; known: {', '.join(SAMPLES)}")
        if index + 1 >= len(lines) or not lines[index + 1].startswith("```"):
            raise ValueError(f"{where}: a fenced block must follow the marker")
        end = next((i for i in range(index + 2, len(lines)) if lines[i].startswith("```")), None)
        if end is None:
            raise ValueError(f"{where}: the fenced block is not closed")
        blocks.append(Block(path, name, code, index + 2, end))
    return blocks


def all_blocks() -> dict[Path, tuple[list[str], list[Block]]]:
    """Each document's lines and its marked blocks."""
    found = {}
    for path in documents():
        lines = path.read_text(encoding="utf-8").split("\n")
        found[path] = (lines, find_blocks(path, lines))
    return found


def child_env() -> dict[str, str]:
    """This process's environment without fl_patch's settings and without PYTHONPATH."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("FL_PATCH", "LIGHTX2V_FL_")) and key != "PYTHONPATH"}


def run(name: str, code: str | None = None) -> str:
    """The output (stdout) of sample `name`, run now; RuntimeError with its stderr if it fails."""
    sample = SAMPLES[name]
    argv = [sys.executable, "-c", code] if sample.code else [sys.executable, *sample.argv]
    done = subprocess.run(argv, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=sample.timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"sample {name!r} ({' '.join(argv[1:])}) exited {done.returncode}:\n{done.stderr}")
    out = done.stdout.replace(str(REPO), "<checkout>")  # the clone's folder differs from machine to machine
    return "\n".join(line.rstrip() for line in out.rstrip("\n").split("\n"))


def normalized(text: str) -> list[str]:
    """`text` as compared: numbers with a point or an exponent as ``#``, space runs as one, no trailing spaces."""
    return [re.sub(r" +", " ", NUMBER.sub("#", line)).rstrip() for line in text.rstrip("\n").split("\n")]


def environment_problem() -> str | None:
    """Why this machine can't produce the samples (they are CPU-without-FlagGems output), or None."""
    if importlib.util.find_spec("flag_gems") is not None:
        return "flag_gems is importable here; the samples are what a machine without FlagGems prints"
    import torch

    if torch.cuda.is_available():
        return "a CUDA device is available here; the samples are what a CPU machine prints"
    build = getattr(torch.version, "cuda", None) or getattr(torch.version, "hip", None)
    if build:
        return (f"torch {torch.__version__} is a GPU build (it brings triton); the samples are what torch's CPU "
                "build prints, the one .ci/setup installs")
    return None


def fresh_outputs(found) -> dict[tuple[Path, str], str]:
    """Run each sample the documents use once (two at a time); key: (document, name) for code samples, whose
    code lives in their document, else (None, name)."""
    jobs: dict[tuple[Path | None, str], str | None] = {}
    for path, (lines, blocks) in found.items():
        for block in blocks:
            if not block.code and SAMPLES[block.name].code:
                code = next((b.text(lines) for b in blocks if b.code and b.name == block.name), None)
                if code is None:
                    raise ValueError(f"{path.relative_to(REPO)}: sample {block.name!r} needs a "
                                     f"'<!-- sample-code: {block.name} -->' python block in the same file")
                jobs[(path, block.name)] = code
            elif not block.code:
                jobs[(None, block.name)] = None
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(run, key[1], code) for key, code in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def _output_key(block: Block) -> tuple[Path | None, str]:
    return (block.path if SAMPLES[block.name].code else None, block.name)


def check() -> list[str]:
    """A unified diff (normalized) for every sample that differs from a fresh run; empty when all match."""
    found = all_blocks()
    outputs = fresh_outputs(found)
    problems = []
    for path, (lines, blocks) in found.items():
        for block in blocks:
            if block.code:
                continue
            shown, fresh = normalized(block.text(lines)), normalized(outputs[_output_key(block)])
            if shown != fresh:
                where = f"{path.relative_to(REPO)}:{block.first} ({block.name})"
                problems.append("\n".join(difflib.unified_diff(shown, fresh, f"{where}, shown", "fresh run",
                                                               lineterm="")))
    return problems


def write() -> list[Path]:
    """Replace every sample with a fresh run's output; the documents changed."""
    found = all_blocks()
    outputs = fresh_outputs(found)
    changed = []
    for path, (lines, blocks) in found.items():
        new = list(lines)
        for block in reversed([b for b in blocks if not b.code]):  # from the end: earlier indices stay valid
            new[block.first:block.last] = outputs[_output_key(block)].split("\n")
        if new != lines:
            path.write_text("\n".join(new), encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the samples from a fresh run")
    args = parser.parse_args(argv)
    problem = environment_problem()
    if problem:
        print(f"readme_samples: {problem}; run it on a CPU machine (as CI does)", file=sys.stderr)
        return 2
    if args.write:
        changed = write()
        print("readme_samples: rewrote " + (", ".join(str(p.relative_to(REPO)) for p in changed) or "nothing"))
        return 0
    problems = check()
    for problem in problems:
        print(problem)
    if problems:
        print(f"readme_samples: {len(problems)} sample(s) differ from a fresh run; "
              "`python tools/readme_samples.py --write` rewrites them", file=sys.stderr)
        return 1
    print("readme_samples: every sample matches a fresh run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
