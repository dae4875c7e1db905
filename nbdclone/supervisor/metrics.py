"""The Prometheus endpoint (`serve --metrics HOST:PORT`) and what `nbdclone stats` reads: one view of the
workers' counters.

Workers count per clone in plain integers (a prometheus-client Counter in the request path would cost
about a microsecond per request, 5-10% of a 4 KiB read) and write them to run/stats-worker-K.json every
second (process.publish_stats). This collector reads those files at each scrape, and only those of workers
alive now: a worker's file goes when it stops, so nothing stale is served after a restart (its successor
counts from zero, which Prometheus reads as a counter reset).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from nbdclone import errors
from nbdclone.runtime import RunDir
from nbdclone.store import Store
from nbdclone.worker.process import LATENCY_BUCKETS

log = logging.getLogger(__name__)


def worker_records(store: Store, run: RunDir) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The running server's record and, per worker alive now, the counters it last published."""
    info = store.server_info()
    records = []
    for k, w in enumerate(info["workers"]):
        try:
            record = json.loads(run.worker_stats(k).read_text())
        except (FileNotFoundError, ValueError):
            record = {}
        if record.get("pid") != w.get("pid"):  # not published yet by this worker (or a dead one's)
            record = {"worker": k, "pid": w.get("pid")}
        records.append(record)
    return info, records


def clone_totals(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per clone, per request type: requests, bytes, errors (and latency buckets), summed over workers."""
    totals: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        for name, ops in record.get("clones", {}).items():
            mine = totals.setdefault(name, {})
            for op, s in ops.items():
                acc = mine.setdefault(op, {"requests": 0, "bytes": 0, "errors": 0})
                for key in ("requests", "bytes", "errors"):
                    acc[key] += s[key]
                if "buckets" in s:
                    acc["seconds"] = acc.get("seconds", 0.0) + s["seconds"]
                    prev = acc.get("buckets") or [0] * len(s["buckets"])
                    acc["buckets"] = [a + b for a, b in zip(prev, s["buckets"], strict=True)]
    return totals


class StoreCollector(Collector):
    def __init__(self, store: Store, run: RunDir) -> None:
        self.store, self.run = store, run

    def collect(self) -> Iterator[Metric]:
        try:
            info, records = worker_records(self.store, self.run)
        except errors.ServerNotRunning:
            return
        requests = CounterMetricFamily("nbdclone_requests", "NBD requests served", labels=["clone", "op"])
        nbytes = CounterMetricFamily("nbdclone_request_bytes", "Bytes requested", labels=["clone", "op"])
        failed = CounterMetricFamily(
            "nbdclone_request_errors", "Requests answered with an error", labels=["clone", "op"]
        )
        latency = HistogramMetricFamily(
            "nbdclone_request_duration_seconds", "Time to serve a request", labels=["clone", "op"]
        )
        for name, ops in sorted(clone_totals(records).items()):
            for op, s in ops.items():
                requests.add_metric([name, op], s["requests"])
                nbytes.add_metric([name, op], s["bytes"])
                failed.add_metric([name, op], s["errors"])
                if "buckets" in s:
                    cumulative, acc = [], 0
                    for bound, n in zip([*LATENCY_BUCKETS, None], s["buckets"], strict=True):
                        acc += n
                        cumulative.append(("+Inf" if bound is None else repr(bound / 1e9), acc))
                    latency.add_metric([name, op], cumulative, s["seconds"])
        yield from (requests, nbytes, failed, latency)
        gauges: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "connections": GaugeMetricFamily("nbdclone_connections", "Open NBD connections", labels=["worker"]),
            "open_clones": GaugeMetricFamily("nbdclone_open_clones", "Clones open", labels=["worker"]),
        }
        cache: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "hits": CounterMetricFamily("nbdclone_cache_hits", "Base reads served from memory", labels=["worker"]),
            "misses": CounterMetricFamily("nbdclone_cache_misses", "Base reads that went to disk", labels=["worker"]),
            "hit_bytes": CounterMetricFamily("nbdclone_cache_hit_bytes", "Bytes read from memory", labels=["worker"]),
            "miss_bytes": CounterMetricFamily("nbdclone_cache_miss_bytes", "Bytes read from disk", labels=["worker"]),
        }
        for record in records:
            for key, family in (*gauges.items(), *cache.items()):
                family.add_metric([str(record["worker"])], float(record.get(key, 0)))
        yield from gauges.values()
        yield from cache.values()
        restarts = CounterMetricFamily("nbdclone_worker_restarts", "Workers restarted after they died")
        restarts.add_metric([], info.get("restarts", 0))
        yield restarts
        try:
            held = json.loads(self.run.cache_stats.read_text())
        except (FileNotFoundError, ValueError):
            held = {}
        for key, doc in (("resident_bytes", "Base bytes held in memory"), ("limit", "Bound of the shared cache")):
            g = GaugeMetricFamily(f"nbdclone_cache_{key}", doc)
            g.add_metric([], float(held.get(key, 0)))
            yield g
        yield from self._space()

    def _space(self) -> Iterator[Metric]:
        """What the store takes on disk: each clone's overlay, and the chunk pack every base shares."""
        overlays = GaugeMetricFamily("nbdclone_overlay_disk_bytes", "Disk taken by a clone's writes", labels=["clone"])
        for name, record in sorted(self.store.catalog().clones.items()):
            try:
                overlays.add_metric([name], float(self.store.overlay_bytes(record)))
            except (errors.NbdcloneError, OSError):  # damaged or going away: `nbdclone check` says which
                continue
        yield overlays
        pack = GaugeMetricFamily("nbdclone_pack_disk_bytes", "Disk taken by the chunks of every base version")
        try:
            pack.add_metric([], float(os.stat(self.store.chunks.pack).st_blocks * 512))
        except OSError:
            pack.add_metric([], 0.0)
        yield pack


class MetricsServer:
    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_metrics(where: tuple[str, int], store: Store, run: RunDir) -> MetricsServer:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, run))
    host, port = where
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise errors.InvalidArgument(detail=f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    log.info("metrics on http://%s:%d/metrics", host, port)
    with contextlib.suppress(ValueError):
        if not ipaddress.ip_address(host).is_loopback:
            log.warning(
                "metrics on %s:%d: anyone who can reach it reads every clone's name and traffic (no TLS nor "
                "password here: keep it on 127.0.0.1 and let Prometheus reach it through a TLS proxy)",
                host,
                port,
            )
    return MetricsServer(server, thread)
