"""The ``fl-patch`` command (also ``python -m fl_patch``).

``fl-patch run -- CMD ARGS...`` runs CMD with the bootstrap directory first on PYTHONPATH, so CMD and
every Python process it starts (torchrun workers, multiprocessing children) activate fl_patch with zero
code changes. ``fl-patch bootstrap-path`` prints that directory, for setting PYTHONPATH yourself (a job
script, a container's environment). ``fl-patch status [--json]`` imports torch (and transformers, if
installed), applies from the environment and prints the environment and every target with its state.
``fl-patch check`` and ``fl-patch tune`` (their options: ``fl-patch check -h``) are fl_patch.device.conformance and
fl_patch.device.tuning. ``fl-patch --version`` prints fl_patch's version.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import signal
import sys
import sysconfig


def bootstrap_dir() -> str:
    """The directory holding fl_patch's ``sitecustomize.py``: beside the package in a checkout or an
    editable install, else where the wheel installed it (``<data>/share/fl_patch/sitecustomize``, ``<data>``
    being the environment's prefix, or the user base after ``pip install --user``). Raises FileNotFoundError
    naming the places looked at."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    installed = [os.path.join(sysconfig.get_path("data", scheme), "share", "fl_patch", "sitecustomize")
                 for scheme in (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user"))]
    candidates = [os.path.join(os.path.dirname(package_dir), "sitecustomize"), *dict.fromkeys(installed)]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "sitecustomize.py")):
            return candidate
    raise FileNotFoundError(f"fl_patch's sitecustomize.py not found in: {', '.join(candidates)}")


def run(command: list[str]) -> int:
    """Replace this process with `command`, the bootstrap first on its PYTHONPATH."""
    if not command:
        print("fl-patch run: give a command, e.g. fl-patch run -- python train.py", file=sys.stderr)
        return 2
    try:
        bootstrap = bootstrap_dir()
    except FileNotFoundError as exc:
        print(f"fl-patch run: {exc}", file=sys.stderr)
        return 1
    flag = site_disabling_flag(command)
    if flag:
        print(f"fl-patch run: warning: {flag} makes Python skip sitecustomize, so {command[0]} runs unpatched",
              file=sys.stderr)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (bootstrap, env.get("PYTHONPATH", "")) if p)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"fl-patch run: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


def bootstrap_path() -> int:
    """Print the directory to put first on PYTHONPATH for zero-code activation (what ``fl-patch run`` puts
    there), alone on one line; 1 with a message when it can't be found."""
    try:
        print(bootstrap_dir())
    except FileNotFoundError as exc:
        print(f"fl-patch bootstrap-path: {exc}", file=sys.stderr)
        return 1
    return 0


def site_disabling_flag(command: list[str]) -> str | None:
    """The option of a Python command line that keeps the bootstrap from running (``-S``: no site; ``-I``:
    isolated; ``-E``: PYTHONPATH ignored), or None. Only interpreter options before the program count."""
    if not re.fullmatch(r"python[0-9.]*", os.path.basename(command[0])) and command[0] != sys.executable:
        return None
    arguments = iter(command[1:])
    for argument in arguments:
        if argument.startswith("--"):
            continue  # --version, --help, ...: no value to skip
        if not argument.startswith("-") or argument == "-":
            return None  # the script: what follows is its own
        for position, letter in enumerate(argument[1:], start=1):
            if letter in "SIE":
                return f"-{letter}"
            if letter in "cm":
                return None  # what follows is the program
            if letter in "WX":
                if position == len(argument) - 1:
                    next(arguments, None)  # the option's value is the next argument
                break
    return None


SWITCHED_OFF = "FL_PATCH=0: the bootstrap and `import fl_patch` do nothing; fl_patch.apply() in code still patches"


def status(as_json: bool) -> int:
    """Print the environment and every target's state after applying from the environment as automatic activation
    would (with FL_PATCH=0: nothing applied, every row says so). Every setting fl_patch can't use (the rule in
    fl_patch.settings) is said once on stderr, ``fl-patch status: <message>``, and the exit status is 2; the rest
    is still shown."""
    from fl_patch import environment, reporting, runtime, settings, table
    from fl_patch.kernels import gems

    info = environment.describe()
    try:
        info["bootstrap"] = bootstrap_dir()
    except FileNotFoundError as exc:
        info["bootstrap"] = f"not found ({exc})"
    chosen, problems = settings.load_lenient()
    environment.import_targets()
    if not chosen.enabled:
        records = runtime.unapplied_records(SWITCHED_OFF)
    else:
        try:
            problems += runtime.apply(chosen, lenient=True, source="fl-patch status", say=False)
            records = runtime.records()
        except settings.SettingsError as exc:
            problems.append(f"{exc} (nothing was applied)")
            records = runtime.unapplied_records("not applied: a setting can't be read")
    profile = _profile(chosen, problems)
    warnings = environment.early_bindings()
    if as_json:
        print(json.dumps({"environment": info, "settings": environment.settings_dict(chosen), "profile": profile,
                          "fast_launch": gems.fast_launch_info(), "problems": problems, "early_bindings": warnings,
                          "targets": records},
                         indent=2, default=str))
    else:
        print("fl_patch status")
        for key, value in info.items():
            print(f"  {key:<18} {value}")
        print(f"  {'settings':<18} " + ", ".join(f"{k}={v}" for k, v in environment.settings_dict(chosen).items()))
        print(f"  {profile['summary']}")
        families = profile.get("families", {})
        form_width = max((len(form) for entry in families.values() for form in entry.get("forms", {})), default=0)
        for family, entry in families.items():
            print(f"    {family:<{table.FAMILY_WIDTH}} {_route_words(entry, compiled_shown=True)}: {entry['why']}" + (
                f" ({entry['lifted']})" if "lifted" in entry else ""))
            for form, own in entry.get("forms", {}).items():
                print(f"      {form:<{form_width}} {_route_words(own)}: {own['why']}")
        if profile.get("device") is not None:
            from fl_patch.device import routing

            for line in routing.learning_lines(profile):
                print(f"    {line}")
        if chosen.kernels == "gems":
            print(f"  {gems.fast_launch_line()}")
        for line in warnings:
            print(f"  warning: {line}")
        print(reporting.format_table(records))
    for problem in problems:
        print(f"fl-patch status: {problem}", file=sys.stderr)
    return 2 if problems else 0


def _profile(chosen, problems: list[str]) -> dict:
    """The device profile in force for the first accelerator here (looked up now, as a first call would)."""
    from fl_patch import environment
    from fl_patch.device import profiles, routing

    if not chosen.enabled:
        return {"state": "not used", "summary": "profile: not used (FL_PATCH=0)"}
    if chosen.kernels != "gems":
        return {"state": "not used", "summary": f"profile: not used (FL_PATCH_KERNELS={chosen.kernels})"}
    device = environment.first_device()
    if device is None:
        return {"state": "no device", "summary": "profile: none needed, no accelerator here (it routes device calls)"}
    try:
        routing.resolve(device)
    except profiles.ProfileError as exc:
        problems.append(str(exc))
    return routing.describe()


def _route_words(entry: dict, compiled_shown: bool = False) -> str:
    from fl_patch.device import profiles

    return profiles.route_words(entry["route"], entry["min_elements"], entry.get("device_bound"),
                                entry.get("compiled"), compiled_shown)


TORCH_MISSING = ("torch is not installed: fl_patch patches PyTorch's ops; install torch first (the CPU build: "
                 "pip install torch --index-url https://download.pytorch.org/whl/cpu)")
INTERRUPTED = 130  # the exit status after Ctrl-C, as a shell gives (128 + SIGINT)

# Commands whose module parses its own options (imported only when run: they import torch).
DELEGATED = {"check": ("fl_patch.device.conformance", "conformance of fl_patch's kernels on this device"),
             "tune": ("fl_patch.device.tuning", "measure FlagGems against native here and write a device profile")}


def main(argv: list[str] | None = None) -> int:
    """The ``fl-patch`` command. Exit status: the command's; 2 for bad arguments or settings, or torch not installed
    (status, check and tune need it); 130 when interrupted (Ctrl-C)."""
    import fl_patch
    from fl_patch import _bootstrap

    _bootstrap.uninstall()  # `import fl_patch` set up automatic activation: each command applies (or not) itself
    if hasattr(signal, "SIGPIPE"):
        # As a Unix tool: end quietly when a reader such as `head` closes the pipe, and let `run`'s command
        # start with SIGPIPE at its default (Python ignores it, and exec would pass that on).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fl-patch", description="Run code on FlagGems/FlagCX with no changes.")
    parser.add_argument("--version", action="version", version=f"fl-patch {fl_patch.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run a command with the fl_patch bootstrap on PYTHONPATH")
    run_parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    commands.add_parser("bootstrap-path", help="print the directory to put first on PYTHONPATH (what run does)")
    status_parser = commands.add_parser("status", help="show the environment and every target's state")
    status_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in DELEGATED:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "run":
        command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return run(command)
    if args.command == "bootstrap-path":
        return bootstrap_path()
    if importlib.util.find_spec("torch") is None:
        print(f"fl-patch {args.command}: {TORCH_MISSING}", file=sys.stderr)
        return 2
    try:
        if args.command in DELEGATED:
            fl_patch.revert()  # they compare with the originals: no activation when their import brings torch in
            return importlib.import_module(DELEGATED[args.command][0]).main(rest)
        return status(args.json)
    except KeyboardInterrupt:
        print(f"fl-patch {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
