"""Command line entry point: ``atso-fast relabel | export | import-nnunet | train | demo | bench | measure``.

Each subcommand keeps its own small ``main(argv)`` next to the code it drives; this module
only dispatches, so importing the CLI stays cheap (torch/onnx load only when needed).
"""

from __future__ import annotations

import importlib
import sys

from atso_fast import __version__
from atso_fast.cli.common import quiet_library_warnings, silence_stdout

__all__ = ["main"]

_COMMANDS = {
    "relabel": ("atso_fast.cli.relabel", "main", "relabel an archive of volumes with a model package"),
    "export": ("atso_fast.cli.export", "main", "export a training checkpoint to an ONNX model package"),
    "import-nnunet": ("atso_fast.cli.import_nnunet", "main", "import an nnU-Net v2 model folder as a model package"),
    "train": ("atso_fast.cli.train", "main", "run ATSO (or a baseline) from a config file"),
    "demo": ("atso_fast.train.cli", "demo_main", "synthetic end-to-end demo on CPU, no downloads"),
    "bench": ("atso_fast.cli.bench", "cli_main", "throughput benchmark of runtimes and settings"),
    "measure": ("atso_fast.cli.measure", "main", "record how exactly and fast each runtime runs a package"),
}
_BROKEN_PIPE = 141
"""Exit status when stdout's reader went away (128 + SIGPIPE, what a shell reports for it)."""


def _usage() -> str:
    lines = ["usage: atso-fast COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, _, help_) in _COMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help     show this message",
        "  -V, --version  show the version",
        "",
        "`atso-fast COMMAND --help` shows a command's options.",
    ]
    return "\n".join(lines)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"atso-fast {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"atso-fast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = _COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except SystemExit as exc:  # argparse's --help (0) or usage error (2) inside a command
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 1
        return int(exc.code or 0)


def main(argv: list[str] | None = None) -> int:
    """``atso-fast COMMAND ...``; returns the exit status (141 when stdout was closed early)."""
    quiet_library_warnings()
    try:
        code = _dispatch(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()
    except BrokenPipeError:  # `atso-fast ... | head`: the reader has all it wanted
        silence_stdout()
        return _BROKEN_PIPE
    return code


if __name__ == "__main__":  # pragma: no cover - `python -m atso_fast.cli`
    sys.exit(main())
