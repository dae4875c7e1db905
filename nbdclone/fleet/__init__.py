"""Fleet mode: many hosts share one catalog in etcd and one copy of each base version in Ceph (RADOS).

    etcd   PREFIX/bases/NAME/next             the next version number (allocated by a transaction)
           PREFIX/bases/NAME/versions/VID     {size, created, source, map object, map sha256}: present
                                              only once the version's chunks and map are in RADOS
           PREFIX/bases/NAME/current          the pointer: a flip is one transaction that compares its
                                              revision (a lost race reports the winner) and that the
                                              version record exists, then puts
    RADOS  chunk.SHA256                       a 64 KiB chunk, named by its SHA-256 (every fetch is
                                              verified), written put-if-absent (an existing object is the
                                              dedup hit: no lock)
           map.NAME.VID.DIGEST                a version's chunk list (index, SHA-256, the local digest)
           trace.NAME.VID.HOST[.K]            a version's boot trace, and its chunks in 4 MiB objects

Each host keeps its own store as it is (the hot path does not change): a fleet version is *staged* on a
host by its map alone, committed locally under the fleet's version number, with a slot for each chunk
its pack does not hold yet; the host's fetcher (fetch.py) fills a slot from RADOS, verified, the first
time something reads it, and a version's boot trace brings its chunks in a few large reads. The host's
local pointer follows the fleet's once the version is staged. Order on import: chunks, then the map
object, then the etcd record (so a version etcd names is always whole in RADOS); on a flip: etcd first,
hosts follow. The full list of records and invariants: docs/fleet.md.

Only objects.py imports rados and only catalog.py imports aetcd.
"""
