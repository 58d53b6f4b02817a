"""The ``schedsearch`` command line (the only package that imports typer).

One module per subcommand; each imports its heavy dependencies inside the command body so
``schedsearch --help`` never imports torch or transformers. :func:`main` turns every
:class:`~schedsearch.errors.SchedsearchError` into ``error: <one line>`` and a non-zero exit.
"""

from __future__ import annotations

import sys

import typer

from schedsearch.errors import SchedsearchError

app = typer.Typer(
    name="schedsearch",
    help="Find, freeze and apply visual-token pruning schedules for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# set by progress displays that leave a line open with "\r"; errors first close that line
PARTIAL_LINE = {"open": False}


def _fail(message: str) -> None:
    if PARTIAL_LINE["open"]:
        sys.stderr.write("\n")
        PARTIAL_LINE["open"] = False
    print(message, file=sys.stderr)


def _register() -> None:
    from schedsearch.cli import baseline, evaluate, library, optimize, ui, validate  # noqa: F401  (each adds commands)


def _one_line_warnings() -> None:
    """schedsearch's own warnings (tracking fallback, schedule version/compatibility) print as one line."""
    import warnings

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if category.__module__.startswith("schedsearch"):
            _fail(f"warning: {' '.join(str(message).split())}")
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns the exit code instead of raising SystemExit when called in-process."""
    _register()
    _one_line_warnings()
    try:
        app(args=argv, standalone_mode=False)
    except SchedsearchError as err:
        _fail(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        _fail("error: interrupted")
        return 130
    except typer.Exit as exc:  # raised by commands that set their own exit code
        return exc.exit_code
    except SystemExit as exc:  # click usage errors in standalone_mode=False still end here
        return int(exc.code or 0)
    except Exception as exc:  # usage errors of the click that typer vendors (typer._click) or of plain click
        fmt = getattr(exc, "format_message", None)
        if callable(fmt) and hasattr(exc, "exit_code"):
            ctx = getattr(exc, "ctx", None)
            where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            _fail(f"error: {' '.join(fmt().split())}{where}")
            return int(exc.exit_code) or 2
        if type(exc).__name__ == "Abort":
            _fail("error: aborted")
            return 130
        raise
    return 0


def _console() -> None:  # pragma: no cover - thin wrapper for [project.scripts]
    sys.exit(main())
