"""`qrealign` command line.

Each sub-command lives in its own module in this package and exposes `COMMAND` (its name),
`HELP`, `add_arguments(parser)` and `run(args) -> int`. Modules are discovered, so adding a
command never touches this file. User errors (`QrealignError`) print one line and exit 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import sys

from ..errors import QrealignError


def _command_modules():
    mods = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "COMMAND"):
            mods.append(module)
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 50), m.COMMAND))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrealign",
        description="Recover the safety alignment of a fine-tuned LLM while quantizing it (Q-realign).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"qrealign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {}
    for module in _command_modules():
        p = sub.add_parser(module.COMMAND, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _defaults_from=getattr(module, "defaults_from", None))
        commands[module.COMMAND] = p
    parser.command_parsers = commands  # for `defaults_from`: a command's defaults that depend on its arguments
    return parser


def main(argv: list[str] | None = None) -> int:
    _allocator_hints()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    debug = getattr(args, "debug", False)
    if not debug:
        _quiet_libraries()
    try:
        args = _with_command_defaults(parser, args, argv)
    except QrealignError as exc:
        if debug:
            raise
        print(f"qrealign: error: {in_flags(str(exc), parser, args)}", file=sys.stderr)
        return 2
    restore = _terminate_as_interrupt()
    import warnings

    formatwarning = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _warning_line
    try:
        if getattr(args, "device", None) is not None:  # a typo or a missing GPU fails before any model loads
            from ..utils import resolve_device

            resolve_device(args.device)
        return int(args._run(args) or 0)
    except QrealignError as exc:
        if debug:
            raise
        print(f"qrealign: error: {in_flags(str(exc), parser, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if sys.stderr.isatty():  # below the progress bar's line, not glued to it
            print(file=sys.stderr)
        print("qrealign: interrupted (nothing half-written; quantize, realign and the demo resume from their "
              "checkpoints and cached stages when the same command runs again)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qrealign inspect --json | head`: the reader left, nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as exc:
        # The file system said no (disk full, read-only, permission): one line, not a traceback;
        # outputs are written to a temporary folder and renamed, so none is left half-written.
        if debug or exc.errno not in _FILE_SYSTEM_ERRORS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"qrealign: error: {exc.strerror or exc}{where} (nothing half-written; --debug shows the traceback)",
              file=sys.stderr)
        return 1
    finally:
        restore()
        warnings.formatwarning = formatwarning


_FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def in_flags(message: str, parser, args) -> str:
    """The library speaks its parameters' names (`batch_size must be >= 1`); on the command line the
    same option is a flag (`--batch-size`). Each snake_case option name of this command that stands
    as a word of the message (not inside a path, a file name or a value the user gave) becomes its
    flag, unless the message names that flag already."""
    import re

    sub = parser.command_parsers.get(getattr(args, "command", None))
    if sub is None:
        return message
    # the user's own values (an --out path named batch_size, a prompt file) are left as typed
    given = sorted({v for v in vars(args).values() if isinstance(v, str) and len(v) > 2}, key=len, reverse=True)
    masked = {f"\x00{i}\x00": value for i, value in enumerate(given)}
    for key, value in masked.items():
        message = message.replace(value, key)
    for action in sub._actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        if "_" not in action.dest or not flags or re.search(rf"{re.escape(flags[0])}(?![\w-])", message):
            continue
        message = re.sub(rf"(?<![\w./\\-]){action.dest}(?![\w/-]|\.\w)", flags[0], message)
    for key, value in masked.items():
        message = message.replace(key, value)
    return message


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning on the command line reads as one line of the tool's, not as a source location
    and a line of Python (`--debug` keeps Python's form, with where it came from)."""
    return f"qrealign: warning: {message}\n"


def _with_command_defaults(parser, args, argv):
    """A command may take defaults from its own arguments (`realign --recipe`): the hook gets the
    parsed arguments and the options given on the line; what it returns becomes the command's
    defaults and the line is parsed again, so a flag given on it still wins."""
    hook = getattr(args, "_defaults_from", None)
    if hook is None:
        return args
    sub = parser.command_parsers[args.command]
    extra = hook(args, _given(sub, args, argv))
    if not extra:
        return args
    sub.set_defaults(**extra)
    return parser.parse_args(argv)


def _given(sub, args, argv) -> set[str]:
    """The options set on the command line (a flag repeating its default included): the command's
    part of the line parsed again into a namespace where every option is None already, which
    argparse leaves alone where nothing on the line sets it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    probe = argparse.Namespace(**{dest: None for dest in vars(args)})
    sub.parse_args(argv[argv.index(args.command) + 1:], namespace=probe)  # only --debug may come before it
    return {dest for dest, value in vars(probe).items() if value is not None}


def _terminate_as_interrupt():
    """SIGTERM (`kill`, SLURM's time limit, Kubernetes) ends a command like Ctrl-C does: the output
    being written is removed, block checkpoints stay, the message says the command resumes. A
    second SIGTERM ends it at once. Returns the function that puts the previous handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _allocator_hints() -> None:
    """Ask torch's CPU allocator for transparent huge pages on tensors of 2 MB and more
    (`THP_MEM_ALLOC_ENABLE`; set it to 0 to opt out). torch reads it once, at its first CPU
    allocation of any size: importing qrealign allocates none, so setting it here takes effect
    (tests/test_offload.py checks that it does).

    Why: glibc hands every large tensor fresh 4 KB pages from the kernel, and a block-by-block
    run allocates weight-sized temporaries by the hundred per block. Offloaded RTN of a 30 GB
    Llama spent more time in page faults than in arithmetic (sys 47 s, user 58 s on 4 blocks);
    with huge pages the same run took 42 s instead of 84, with the same result
    (docs/performance.md). Numerics do not change: only where the pages come from."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")  # the libraries' deprecation chatter...
    # ...but not qrealign's own: they say a result is weaker than it looks (an overlap forced, a
    # teacher that fell back to the CPU, a run evaluated in another precision)
    warnings.filterwarnings("default", module=r"qrealign(\.|$)")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
