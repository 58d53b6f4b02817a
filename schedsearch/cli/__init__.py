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


def _register() -> None:
    from schedsearch.cli import baseline, evaluate, library, optimize, ui, validate  # noqa: F401  (each adds commands)


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns the exit code instead of raising SystemExit when called in-process."""
    _register()
    try:
        app(args=argv, standalone_mode=False)
    except SchedsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except typer.Exit as exc:  # raised by commands that set their own exit code
        return exc.exit_code
    except SystemExit as exc:  # click usage errors in standalone_mode=False still end here
        return int(exc.code or 0)
    except Exception as exc:  # click.UsageError and friends
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            print("error: aborted", file=sys.stderr)
            return 130
        raise
    return 0


def _console() -> None:  # pragma: no cover - thin wrapper for [project.scripts]
    sys.exit(main())
