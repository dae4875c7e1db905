"""What every command shares: the typer apps, the common options, sizes, progress bars, JSON."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TimeRemainingColumn, TransferSpeedColumn

import nbdclone
from nbdclone import errors
from nbdclone.host import Host, open_host
from nbdclone.store import Store
from nbdclone.store.layout import check_place, default_store

app = typer.Typer(
    help="Serve copy-on-write clones of read-only base images over NBD.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
base_app = typer.Typer(help="Base images and their versions: import, list, promote, remove.", no_args_is_help=True)
clone_app = typer.Typer(help="Create, inspect, reset, upgrade, export and remove clones.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(clone_app, name="clone")


def _console(stderr: bool) -> Console:
    """Rich's console for standard output or error: as wide as the terminal, or, piped (a log, a timer's
    mail), as wide as what it prints: rich would cut tables at 80 columns, and a cut path names no file."""
    stream = sys.stderr if stderr else sys.stdout
    wide = None if stream.isatty() else 1 << 16
    return Console(stderr=stderr, highlight=False, width=wide)


out = _console(stderr=False)
err = _console(stderr=True)


def _checked_store(path: Path) -> Path:
    check_place(path.absolute())  # before the command touches anything
    return path


StoreOpt = Annotated[
    Path,
    typer.Option(
        "--store",
        envvar="NBDCLONE_STORE",
        help="Store directory.",
        show_default=str(default_store()),
        callback=_checked_store,
    ),
]


class Report:
    """What a command did, one event at a time: a line for a person, or under --json one record per event,
    all in one document printed at the end ({"format": 1, "results": [...]}), also when the command fails
    part way (what was done is printed; the error goes to standard error)."""

    def __init__(self) -> None:
        self.as_json = False
        self.printed = False  # a command printed its own document (print_json)
        self.records: list[dict[str, Any]] = []

    def __call__(self, text: str, **record: Any) -> None:
        if self.as_json:
            self.records.append(record)
        else:
            out.print(text, soft_wrap=True)

    def note(self, text: str) -> None:
        """A line for a person only (a hint, a summary): on standard error under --json."""
        (err if self.as_json else out).print(text, soft_wrap=True)

    def flush(self) -> None:
        if self.as_json and not self.printed:
            print_json(self.records, items="results")


done = Report()


def _json_mode(value: bool) -> bool:
    done.as_json = done.as_json or value
    return value


def _completion_catalog(ctx: typer.Context) -> Any:
    """The catalog of the store a command line names (--store, NBDCLONE_STORE, or the default), read
    without touching anything; None if there is none."""
    from nbdclone.store.catalog import load_catalog
    from nbdclone.store.layout import Layout

    given = ctx.params.get("store") or os.environ.get("NBDCLONE_STORE") or default_store()
    try:
        return load_catalog(Layout(Path(given)).catalog_path)
    except (OSError, errors.NbdcloneError):
        return None


def complete_clone(ctx: typer.Context, incomplete: str) -> list[str]:
    cat = _completion_catalog(ctx)
    return sorted(n for n in (cat.clones if cat else ()) if n.startswith(incomplete))


def complete_base(ctx: typer.Context, incomplete: str) -> list[str]:
    """Base names, or NAME@VERSION once an @ is typed."""
    cat = _completion_catalog(ctx)
    if cat is None:
        return []
    names = [n for n, r in cat.bases.items() if not r.owner]  # not clones' own bases
    if "@" in incomplete:
        names = [f"{n}@{v}" for n in names for v in cat.bases[n].versions]
    return sorted(n for n in names if n.startswith(incomplete))


CloneArg = Annotated[str, typer.Argument(metavar="NAME", help="The clone.", autocompletion=complete_clone)]
BaseArg = Annotated[str, typer.Argument(metavar="NAME", help="The base.", autocompletion=complete_base)]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON (one document) instead of text.", callback=_json_mode)
]
BaseFilter = Annotated[str | None, typer.Option("--base", help="Only this base (and its clones).")]
DEFAULT_STORE = default_store()


def _print_version(value: bool) -> None:
    if value:
        out.print(f"nbdclone {nbdclone.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    store: Annotated[
        Path | None,
        typer.Option("--store", help="Store directory, for every command (also accepted after the command)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Show progress bars (bytes, rate, time left) on standard error.",
            show_default="on a terminal",
        ),
    ] = None,
) -> None:
    """Serve copy-on-write clones of read-only base images over NBD."""
    if store is not None:  # a command's own --store option reads it from here (an option after it still wins)
        os.environ["NBDCLONE_STORE"] = str(store)
    _show_progress[0] = progress


_show_progress: list[bool | None] = [None]  # --progress / --no-progress; None: only on a terminal


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def host_of(path: Path | str) -> Host:
    """The command's host (nbdclone/host.py): a single host, or a fleet host if the store joined one."""
    return open_host(path, say=done.note)


def open_store(path: Path | str) -> Store:
    """The command's store, opened by its host (a fleet host's can fetch chunks with no server running)."""
    return host_of(path).store


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m or int(m.group(1)) == 0:
        raise errors.InvalidArgument(detail=f"invalid size {text!r}: use a number with K, M, G or T, like 10G")
    size = int(m.group(1)) * _UNITS[m.group(2)]
    if size % 512:
        raise errors.InvalidArgument(detail=f"size {text!r} is not a multiple of 512 bytes")
    return size


def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def progress_bar() -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=err.is_terminal,
        disable=not (err.is_terminal if _show_progress[0] is None else _show_progress[0]),
    )


def updater(bar: Progress, task: TaskID) -> Callable[[int, int], None]:
    """A core progress callback (done, total) that moves `task` of `bar`."""
    return lambda done, total: bar.update(task, completed=done, total=total)


#: The version of every --json document's shape; each is an object that says it ("format": 1). Keys may be
#: added within a version; a key removed or changed in meaning gets a new one.
JSON_FORMAT = 1


def print_json(data: dict[str, Any] | list[dict[str, Any]], items: str = "") -> None:
    """Print one --json document: `data` (an object), or a list of rows under the key `items`."""
    doc = {"format": JSON_FORMAT, items: data} if isinstance(data, list) else {"format": JSON_FORMAT, **data}
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    done.printed = True


def when(iso: str) -> str:
    return iso[:16].replace("T", " ")


def record_dict(record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__slots__}
