"""The ``fl-patch`` command (also ``python -m fl_patch``).

``fl-patch run -- CMD ARGS...`` runs CMD with the bootstrap directory first on PYTHONPATH, so CMD and
every Python process it starts (torchrun workers, multiprocessing children) activate fl_patch with zero
code changes. ``fl-patch status [--json]`` imports torch (and transformers, if installed), applies from
the environment and prints the environment and every target with its state. ``fl-patch check`` and
``fl-patch tune`` (their options: ``fl-patch check -h``) are fl_patch.conformance and fl_patch.tuning.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import sysconfig


def bootstrap_dir() -> str:
    """The directory holding fl_patch's ``sitecustomize.py``: beside the package in a checkout or an
    editable install, else where the wheel installed it (``<data>/share/fl_patch/sitecustomize``)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.path.join(os.path.dirname(package_dir), "sitecustomize"),
        os.path.join(sysconfig.get_path("data"), "share", "fl_patch", "sitecustomize"),
    ]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "sitecustomize.py")):
            return candidate
    raise FileNotFoundError(f"fl_patch's sitecustomize.py not found in: {', '.join(candidates)}")


def run(command: list[str]) -> int:
    """Replace this process with `command`, the bootstrap first on its PYTHONPATH."""
    if not command:
        print("fl-patch run: give a command, e.g. fl-patch run -- python train.py", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (bootstrap_dir(), env.get("PYTHONPATH", "")) if p)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"fl-patch run: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


def status(as_json: bool) -> int:
    """Print the environment and every target's state after applying from the environment."""
    from fl_patch import environment, reporting, runtime, settings

    info = environment.describe()
    try:
        chosen = settings.load()
    except Exception as exc:
        print(f"fl-patch status: {exc}", file=sys.stderr)
        return 2
    environment.import_targets()
    runtime.apply(chosen)
    records = runtime.records()
    warnings = environment.early_bindings()
    if as_json:
        print(json.dumps({"environment": info, "settings": environment.settings_dict(chosen),
                          "early_bindings": warnings, "targets": records}, indent=2, default=str))
        return 0
    print("fl_patch status")
    for key, value in info.items():
        print(f"  {key:<18} {value}")
    print("  settings          " + ", ".join(f"{k}={v}" for k, v in environment.settings_dict(chosen).items()))
    for line in warnings:
        print(f"  warning: {line}")
    print(reporting.format_table(records))
    return 0


# Commands whose module parses its own options (imported only when run: they import torch).
DELEGATED = {"check": ("fl_patch.conformance", "conformance of fl_patch's kernels on this device"),
             "tune": ("fl_patch.tuning", "measure FlagGems against native here and write a device profile")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fl-patch", description="Run code on FlagGems/FlagCX with no changes.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run a command with the fl_patch bootstrap on PYTHONPATH")
    run_parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    status_parser = commands.add_parser("status", help="show the environment and every target's state")
    status_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command in DELEGATED:
        import fl_patch

        fl_patch.revert()  # they compare with the originals: no activation when their import brings torch in
        return importlib.import_module(DELEGATED[args.command][0]).main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "run":
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return run(command)
    return status(args.json)


if __name__ == "__main__":
    sys.exit(main())
