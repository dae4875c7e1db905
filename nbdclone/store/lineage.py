"""Publish a clone as a version of a base: the maintenance loop of a golden image.

    clone create maint --base gold      boot it, update it, shut it down
    base publish gold --from maint      its contents (base version + overlay, as a client reads them now)
                                        become the next version of gold
    base promote gold VERSION           (or --promote) every following clone moves to it

The new version's map starts as a copy of the version the clone reads, and only the chunks holding a block
the clone wrote (or zeroed) are read, merged and stored: the work is proportional to what the clone changed,
not to the disk's size, and a chunk the store already holds (any version's, by content) is shared.

Order and safety are an import's: new chunks are in the pack and synced before the map is written, the map
before the catalog names the version (chunks.py, catalog.py). The clone must have no client: under the
store's exclusive lock it is checked closed and read, so no server can open it meanwhile (a first open takes
the lock shared).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from nbdclone import errors
from nbdclone.store import Store
from nbdclone.store.catalog import BaseRecord, validate_name
from nbdclone.store.chunks import CHUNK
from nbdclone.store.clone import Clone
from nbdclone.store.images import open_clone_readonly
from nbdclone.store.overlay import BLOCK_SIZE

BLOCKS_PER_CHUNK = CHUNK // BLOCK_SIZE


def publish_clone(
    store: Store, base: str, clone_name: str, progress: Callable[[int, int], None] = lambda done, total: None
) -> tuple[BaseRecord, str, int]:
    """Make clone `clone_name`'s contents the next version of base `base` (created if new). Returns the
    base, the new version's id and how many chunks had to be stored."""
    validate_name("base", base)
    record = store.get_clone(clone_name)
    with store.chunks.writer():
        with store.lock():
            if store.is_open(record):
                raise errors.CloneInUse(name=clone_name)
            version = store.clone_version(record)  # what the clone reads; None for a blank clone
            clone = open_clone_readonly(store, clone_name)
            try:
                start = None  # a blank clone's version starts empty
                if record.base is not None and version is not None:
                    start = store.version_map(store.get_base(record.base), version, digests=True)
                changed = sorted({block // BLOCKS_PER_CHUNK for block in clone.changed_blocks()})
                existing = list(store.all_version_maps(digests=True))
                vmap, written = store.chunks.import_chunks(
                    _merged_chunks(clone, changed, progress), clone.size, existing, start=start
                )
            finally:
                clone.close()
                clone.base.close()
        source = f"clone {clone_name}" + (f" of {record.base}@{version}" if start is not None else "")
        base_record, vid = store.add_version(base, vmap, source, written)
    return base_record, vid, written


def _merged_chunks(
    clone: Clone, chunks: list[int], progress: Callable[[int, int], None]
) -> Iterator[tuple[int, bytes | None]]:
    """Each of `chunks` as a client reads it now (base under overlay); progress in bytes."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for k, i in enumerate(chunks):
        n = min(CHUNK, clone.size - i * CHUNK)
        clone.pread_into(view[:n], i * CHUNK)
        yield i, bytes(view[:n])
        progress((k + 1) * CHUNK, len(chunks) * CHUNK)
