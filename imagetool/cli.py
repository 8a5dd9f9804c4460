"""The command line: parse, call an operation, render, exit. No logic lives here.

Exit codes (shared by every command): 0 ok, 1 internal error (a bug), 2 usage,
3 image rejected, 4 size limit exceeded, 5 I/O or environment; 130 interrupted.
With --json, stdout holds exactly one JSON object with a `schema` key, whatever
the outcome.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from imagetool.errors import ExitCode, ImageRejected, ImagetoolError, UsageProblem

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Prepare virtual-disk images for a cloud image library, safely.",
)


@app.callback()
def _root() -> None:
    """Prepare virtual-disk images for a cloud image library, safely."""


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
F = TypeVar("F", bound=Callable[..., Any])


def command(name: str) -> Callable[[F], F]:
    """Register a command whose errors all become one line (or one JSON object) and an exit code."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> None:
            from imagetool import render

            as_json = bool(kwargs.get("json_out"))
            try:
                code = func(*args, **kwargs)
            except ImageRejected as exc:
                report = getattr(exc.report, "as_dict", None)
                if as_json:
                    render.emit_json(report() if report else render.error_document(name, exc))
                render.error_line(exc.one_line() + f" [{exc.code}]")
                raise typer.Exit(int(exc.exit_code)) from None
            except ImagetoolError as exc:
                if as_json:
                    render.emit_json(render.error_document(name, exc))
                render.error_line(exc.one_line())
                raise typer.Exit(int(exc.exit_code)) from None
            raise typer.Exit(int(code or 0))

        app.command(name)(run)
        return func

    return wrap


@command("inspect")
def inspect_cmd(
    image: Annotated[str, typer.Argument(help="The disk image file.")],
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="The format you expect (raw, qcow2, vmdk, vdi, vhd, vhdx); a different content is rejected.",
        ),
    ] = None,
    max_virtual_size: Annotated[
        str, typer.Option(help="Refuse images whose virtual size is larger (binary units: 4T = 4 TiB).")
    ] = "4T",
    json_out: JsonOpt = False,
) -> int:
    """Report an image's true format, sizes and whether it is safe to touch."""
    from imagetool import render
    from imagetool.inspection import inspect_image
    from imagetool.sizes import parse_size

    report = inspect_image(image, format, parse_size(max_virtual_size))
    if json_out:
        render.emit_json(report.as_dict())
    else:
        print(render.inspect_text(report))
    render.rejection_line(report)
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    """Console entry point: usage errors exit 2 (with JSON if asked), bugs exit 1, never a traceback."""
    from imagetool import render

    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        app(args=args, prog_name="imagetool")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == ExitCode.USAGE and as_json and not render.json_emitted():
            # Typer rejected the command line before any command ran.
            render.emit_json(
                render.error_document(
                    args[0] if args else "imagetool",
                    UsageProblem("invalid command line (see the message on stderr)"),
                )
            )
    except Exception as exc:  # a bug: one line, and the traceback only when debugging
        if os.environ.get("IMAGETOOL_DEBUG"):
            raise
        bug = ImagetoolError(f"internal error (a bug, please report it): {type(exc).__name__}: {exc}")
        if as_json and not render.json_emitted():
            render.emit_json(render.error_document(args[0] if args else "imagetool", bug))
        render.error_line(bug.message)
        code = ExitCode.INTERNAL
    return int(code)
