"""`spinctl`: the project's one console script.

Subcommands are registered here and implemented in their own modules (``add_parser`` +
``run(args) -> int``), imported only when that command runs, so `spinctl validate` never loads
kopf and `spinctl crd` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

# name -> (module, one-line help); the module provides add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "crd": ("spin_operator.cli", "print the SPINRun CRD generated from the API models"),
    "docs": ("spin_operator.cli", "print the SPINRun API reference (docs/api.md)"),
    "validate": (
        "spin_operator.cli",
        "check SPINRun files; print every problem with its field path",
    ),
    "plan": (
        "spin_operator.plan",
        "every Job of every iteration: pods, GPUs, steps, tokens, GPU-hours, cost",
    ),
    "render": (
        "spin_operator.plan",
        "print the manifests the operator would create for one iteration",
    ),
    "run": ("spin_operator.local.runner", "run a SPINRun on this machine (no cluster)"),
    "status": (
        "spin_operator.local.status_cmd",
        "where a local run (spinctl run FILE) stands: iterations, steps, metrics",
    ),
    "demo": (
        "spin_operator.local.demo",
        "build a tiny task and model, then run SPIN on it locally",
    ),
    "operator": ("spin_operator.handlers", "run the operator (the kopf controller)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the commands implemented in this module (crd, docs, validate)."""
    if parser.prog.endswith(" validate"):
        parser.add_argument("files", nargs="+", metavar="FILE", help="YAML files with SPINRuns")
        parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
        parser.add_argument(
            "--cluster",
            action="store_true",
            help="also refuse what cannot work when the operator runs it (e.g. a local MLflow store)",
        )


def run(args: argparse.Namespace) -> int:
    if args.command == "crd":
        from spin_operator.api.crd import crd_yaml

        sys.stdout.write(crd_yaml())
        return 0
    if args.command == "docs":
        from spin_operator.api.reference import markdown

        sys.stdout.write(markdown())
        return 0
    return _validate(args.files, quiet=args.quiet, cluster=args.cluster)


def _validate(files: list[str], quiet: bool, cluster: bool = False) -> int:
    from spin_operator.validation import validate_cluster_file, validate_file

    failed = 0
    for path in files:
        problems = validate_cluster_file(path) if cluster else validate_file(path)
        for problem in problems:
            print(f"{path}: {problem}")
        if problems:
            failed += 1
        elif not quiet:
            print(f"{path}: valid")
    return 1 if failed else 0


def build_parser(
    command: str | None,
) -> tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], int] | None]:
    """The parser, with the arguments of `command` only: other command modules stay unimported."""
    parser = argparse.ArgumentParser(
        prog="spinctl", description="SPIN (Self-Play Fine-Tuning) runs, on Kubernetes or locally."
    )
    parser.add_argument("--version", action="version", version=f"spinctl {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runner: Callable[[argparse.Namespace], int] | None = None
    for name, (module_name, help_text) in COMMANDS.items():
        parsed = sub.add_parser(name, help=help_text, description=help_text)
        parsed.add_argument("--log-level", default="WARNING", help="Python logging level")
        if name != command:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a command whose extra is not installed
            message = f"spinctl {name} needs a missing package: {exc.name} (install spin-operator[operator,runtime])"
            runner = lambda _args, m=message: _missing(m)  # noqa: E731
            continue
        module.add_arguments(parsed)
        runner = module.run
    return parser, runner


def version() -> str:
    """The installed distribution's version (the source tree's pyproject when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("spin-operator")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _missing(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, runner = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    assert runner is not None  # parse_args exits on an unknown command
    return runner(args)


if __name__ == "__main__":
    sys.exit(main())
