"""The nbdclone command line: parses, calls the core, turns errors into one line and an exit code.

One module per group of commands (as borg's archiver has), over the shared apps and options of _common.
Only this package prints.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.markup import escape

from nbdclone import errors
from nbdclone.cli import bases, clones, fleet, serving, space
from nbdclone.cli._common import app, done, err, out

__all__ = ["app", "bases", "clones", "fleet", "main", "serving", "space"]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="nbdclone: %(message)s")
    os.umask(0o077)  # the store is private: every file and folder nbdclone makes is its owner's only
    try:
        try:
            code = app(standalone_mode=False)
        finally:
            done.flush()  # --json: what was done, even if the command failed part way
    except errors.NbdcloneError as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        sys.exit(1)
    except typer.TyperException as exc:
        # Usage errors: one line naming the problem, and where to look (typer would print a panel).
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            out.print(ctx.get_help())
            sys.exit(0)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(f"[red]error:[/red] {exc.format_message()}{hint}", soft_wrap=True)
        sys.exit(2 if ctx is not None else 1)
    except typer.Abort:
        err.print("[red]aborted[/red]")
        sys.exit(130)
    except OSError as exc:  # the system refused (a full disk, a permission): one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        err.print(f"[red]error:[/red] {escape(f'{exc.strerror or exc}{where}')}", soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
