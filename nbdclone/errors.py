"""One error hierarchy: each error carries the errno a client or shell sees and a message template."""

from __future__ import annotations

import errno as _errno
from typing import Any, ClassVar


class NbdcloneError(Exception):
    """Base of every error nbdclone raises on purpose."""

    errno: int = _errno.EIO  # what a client (set_error) or shell sees
    template: ClassVar[str] = "{detail}"

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        super().__init__(self.template.format(**fields))


class InvalidName(NbdcloneError, ValueError):
    errno = _errno.EINVAL
    template = (
        "invalid {kind} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )


class InvalidArgument(NbdcloneError, ValueError):
    errno = _errno.EINVAL


class NotAStore(NbdcloneError):
    errno = _errno.ENOTDIR
    template = "{path} is not an nbdclone store ({why}): give a store, or a new or empty folder to make one in"


class BaseNotFound(NbdcloneError, FileNotFoundError):
    errno = _errno.ENOENT
    template = "no base named {name!r} in store {store}"


class CloneNotFound(NbdcloneError, FileNotFoundError):
    errno = _errno.ENOENT
    template = "no clone named {name!r} in store {store}"


class SnapshotNotFound(NbdcloneError, FileNotFoundError):
    errno = _errno.ENOENT
    template = "clone {clone!r} has no snapshot named {name!r}"


class SnapshotExists(NbdcloneError, FileExistsError):
    errno = _errno.EEXIST
    template = "clone {clone!r} already has a snapshot named {name!r}"


class NotAllowed(NbdcloneError):
    errno = _errno.EACCES
    template = "refused a connection from {address}: not in --allow"


class NotOwned(NbdcloneError):
    errno = _errno.EACCES
    template = "clone {name!r} is not this host's to serve ({why})"


class Fenced(NbdcloneError):
    errno = _errno.ESHUTDOWN
    template = "this host's fleet lease ran out or its clone moved: it no longer serves {name!r}"


class BaseExists(NbdcloneError, FileExistsError):
    errno = _errno.EEXIST
    template = "a base named {name!r} already exists in store {store}"


class CloneExists(NbdcloneError, FileExistsError):
    errno = _errno.EEXIST
    template = "a clone named {name!r} already exists in store {store}"


class BaseInUse(NbdcloneError):
    errno = _errno.EBUSY
    template = "base {name!r} is used by clone(s) {clones}; remove them first"


class CloneBusy(NbdcloneError):
    errno = _errno.EBUSY
    template = "clone {name!r} already has a client, and this server lets one client use a clone at a time"


class CloneInUse(NbdcloneError):
    errno = _errno.EBUSY
    template = "clone {name!r} is open on a running server; disconnect its clients first"


class CloneLeaving(NbdcloneError):
    errno = _errno.EBUSY
    template = "clone {name!r} is moving to host {to}; connect there once it is moved"


class SourceNotFound(NbdcloneError, FileNotFoundError):
    errno = _errno.ENOENT
    template = "source {path} does not exist"


class NotADiskImage(NbdcloneError, ValueError):
    errno = _errno.EINVAL
    template = "{path} is not a disk image: {reason}"


class ServerNotRunning(NbdcloneError):
    errno = _errno.ENOTCONN
    template = "no nbdclone server is running for store {store}; start one with 'nbdclone serve'"


class ShortRead(NbdcloneError, OSError):
    errno = _errno.EIO
    template = "short read of {path}: wanted {wanted} bytes at offset {offset}, got {got}"


class StorageError(NbdcloneError):
    """An overlay or base failed underneath us; errno says how (ENOSPC, EROFS, EIO...)."""

    template = "{what}: {detail}"

    def __init__(self, err: int, **fields: Any) -> None:
        super().__init__(**fields)
        self.errno = err


class VersionNotFound(NbdcloneError):
    errno = _errno.ENOENT
    template = "base {name!r} has no version {version!r} in store {store}"


class VersionInUse(NbdcloneError):
    errno = _errno.EBUSY
    template = "version {version} of base {name!r} cannot be removed: {why}"


class Damaged(NbdcloneError):
    """A stored record or data failed its check: it is not used, and nothing is done on its strength."""

    errno = _errno.EIO
    template = "{path} is damaged: {detail} (see 'nbdclone check')"
