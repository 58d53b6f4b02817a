"""The ``schedsearch`` command line (the only package that imports typer).

One module per subcommand; each imports its heavy dependencies inside the command body so
``schedsearch --help`` never imports torch or transformers. :func:`main` turns every
:class:`~schedsearch.errors.SchedsearchError` into ``error: <one line>`` and a non-zero exit.

Shared conventions, so every command reads the same:

* numeric options take ``**ranged(name)``: the range from :data:`schedsearch.config.RANGES` is shown in
  ``--help`` and checked while the command line is parsed, before anything is loaded;
* options with a fixed set of values are typed :func:`choice` (``Literal`` of the package's own registry), so
  ``--help`` lists them and a typo is refused with the list;
* defaults are real option defaults, so ``--help`` shows ``[default: ...]`` the same way everywhere;
* progress displays register in :data:`LIVE`; an error first stops them so its line starts on a fresh line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, Literal

import typer

from schedsearch import __version__
from schedsearch.errors import SchedsearchError


def _version(value: bool) -> None:
    if value:
        typer.echo(f"schedsearch {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    name="schedsearch",
    help="Find, freeze and apply visual-token pruning schedules for vision-language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Find, freeze and apply visual-token pruning schedules for vision-language models."""


#: progress displays currently drawing (objects with ``stop()``); errors stop them before printing
LIVE: list[Any] = []


def choice(values: Iterable[str]) -> Any:
    """A ``Literal`` type over ``values`` for a typer option: listed in ``--help``, anything else refused."""
    return Literal[tuple(values)]  # type: ignore[misc]


def ranged(name: str) -> dict[str, Any]:
    """``typer.Option`` keyword arguments that check ``RANGES[name]`` while parsing (one ConfigError line)."""
    from schedsearch.config import RANGES, check_range

    def check(value: Any) -> Any:
        return check_range(name, value)

    return {"callback": check, "metavar": f"[{RANGES[name].text()}]"}


def stop_live() -> None:
    while LIVE:
        LIVE.pop().stop()


def _fail(message: str) -> None:
    stop_live()
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


def _usage_message(exc: Exception) -> str:
    msg = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    return msg.replace(": Value error, ", ": ")  # typer's Literal check prefixes pydantic-style "Value error, "


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns the exit code instead of raising SystemExit when called in-process."""
    # the weights' loading bar is not the CLI's output: it would be the first thing printed before an error line
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
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
        stop_live()
        return exc.exit_code
    except SystemExit as exc:  # click usage errors in standalone_mode=False still end here
        stop_live()
        return int(exc.code or 0)
    except Exception as exc:  # usage errors of the click that typer vendors (typer._click) or of plain click
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, SchedsearchError):  # raised by an option callback, wrapped by the parser
            _fail(f"error: {cause}")
            return cause.exit_code
        fmt = getattr(exc, "format_message", None)
        if callable(fmt) and hasattr(exc, "exit_code"):
            ctx = getattr(exc, "ctx", None)
            where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            _fail(f"error: {_usage_message(exc)}{where}")
            return int(exc.exit_code) or 2
        if type(exc).__name__ == "Abort":
            _fail("error: aborted")
            return 130
        raise
    finally:
        stop_live()
    return 0


def _console() -> None:  # pragma: no cover - thin wrapper for [project.scripts]
    sys.exit(main())
