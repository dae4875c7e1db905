"""The storage core: bases, overlays, clones and the catalog. No nbdkit, typer or asyncio here.

A Store is one store directory, put together from one class per responsibility:

    layout.Layout            every path, and the work files in STORE/tmp
    catalog.CatalogStore     the catalog and the lookups that start from it
    clones.Clones            clones, their overlays and states, and changing them while closed
    versions.Versions        adding versions, the pointer flip, who uses what, freeing space
    running.ServerRecord     the record of the running server

Operations that span them (publish, snapshots) are functions over a Store in lineage.py.
"""

from __future__ import annotations

from nbdclone.store.running import ServerRecord
from nbdclone.store.versions import Versions


class Store(Versions, ServerRecord):
    """One store directory. Safe to use from many processes at once."""


__all__ = ["Store"]
