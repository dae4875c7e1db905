"""The Prometheus endpoint (`serve --metrics HOST:PORT`) and what `nbdclone stats` reads: one view of the
workers' counters.

Workers count per clone in plain integers (a prometheus-client Counter in the request path would cost
about a microsecond per request, 5-10% of a 4 KiB read) and write them to run/stats-worker-K.json every
second (process.publish_stats). This collector reads those files at each scrape, and only those of workers
alive now: a worker's file goes when it stops, so nothing stale is served after a restart (its successor
counts from zero, which Prometheus reads as a counter reset).

A scrape is served from the last rendering while it is younger than REFRESH seconds: what a scrape costs
the supervisor does not grow with how often it is scraped, and a scrape that finds a fresh rendering costs
the same at 10 or 10,000 clones. `names=False` leaves clone names out (the series are summed over clones);
a token makes every scrape carry `Authorization: Bearer TOKEN` (Prometheus: `authorization:
credentials_file:`), compared in constant time.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
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


#: Seconds a rendered scrape is served again (workers publish their counters every second).
REFRESH = 5.0


def _summed(totals: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The per-clone totals summed over clones, under one nameless entry (for names=False)."""
    return {"": clone_totals([{"clones": {"": ops}} for ops in totals.values()])[""]} if totals else {}


class StoreCollector(Collector):
    def __init__(self, store: Store, run: RunDir, *, names: bool = True) -> None:
        self.store, self.run, self.names = store, run, names

    def collect(self) -> Iterator[Metric]:
        try:
            info, records = worker_records(self.store, self.run)
        except errors.ServerNotRunning:
            return
        labels = ["clone", "op"] if self.names else ["op"]
        requests = CounterMetricFamily("nbdclone_requests", "NBD requests served", labels=labels)
        nbytes = CounterMetricFamily("nbdclone_request_bytes", "Bytes requested", labels=labels)
        failed = CounterMetricFamily("nbdclone_request_errors", "Requests answered with an error", labels=labels)
        latency = HistogramMetricFamily("nbdclone_request_duration_seconds", "Time to serve a request", labels=labels)
        totals = clone_totals(records)
        for name, ops in sorted((totals if self.names else _summed(totals)).items()):
            for op, s in ops.items():
                series = [name, op] if self.names else [op]
                requests.add_metric(series, s["requests"])
                nbytes.add_metric(series, s["bytes"])
                failed.add_metric(series, s["errors"])
                if "buckets" in s:
                    cumulative, acc = [], 0
                    for bound, n in zip([*LATENCY_BUCKETS, None], s["buckets"], strict=True):
                        acc += n
                        cumulative.append(("+Inf" if bound is None else repr(bound / 1e9), acc))
                    latency.add_metric(series, cumulative, s["seconds"])
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
        refused = CounterMetricFamily(
            "nbdclone_refused_requests",
            "Requests nbdkit refused before the plugin saw them (read-only, out of range, too large, invalid)",
            labels=["worker", "op", "reason"],
        )
        for record in records:
            for key, n in sorted(record.get("refused", {}).items()):
                op, _, reason = key.partition(":")
                refused.add_metric([str(record["worker"]), op, reason], n)
        yield refused
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
        labels = ["clone"] if self.names else []
        overlays = GaugeMetricFamily("nbdclone_overlay_disk_bytes", "Disk taken by clones' writes", labels=labels)
        total = 0.0
        for name, record in sorted(self.store.catalog().clones.items()):
            try:
                taken = float(self.store.overlay_bytes(record))
            except (errors.NbdcloneError, OSError):  # damaged or going away: `nbdclone check` says which
                continue
            total += taken
            if self.names:
                overlays.add_metric([name], taken)
        if not self.names:
            overlays.add_metric([], total)
        yield overlays
        pack = GaugeMetricFamily("nbdclone_pack_disk_bytes", "Disk taken by the chunks of every base version")
        try:
            pack.add_metric([], float(os.stat(self.store.chunks.pack).st_blocks * 512))
        except OSError:
            pack.add_metric([], 0.0)
        yield pack


class _Rendered:
    """The exposition text, rendered again only once it is REFRESH seconds old (one rendering at a time)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.lock = threading.Lock()
        self.body, self.at = b"", float("-inf")

    def get(self) -> bytes:
        with self.lock:
            if time.monotonic() - self.at >= REFRESH:
                self.body, self.at = generate_latest(self.registry), time.monotonic()
            return self.body


def _app(rendered: _Rendered, token: str | None) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: /metrics\n"]
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if token is not None and not hmac.compare_digest(given, f"Bearer {token}".encode()):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"a bearer token is needed\n"]
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [rendered.get()]

    return app


class _Quiet(WSGIRequestHandler):
    timeout = 10  # seconds a scrape may stall (its TLS handshake, its request, reading the reply)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a client that never reads holds its own thread only


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The endpoint's TLS: a certificate chain and its key in PEM (Prometheus: scheme https, tls_config)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise errors.InvalidArgument(detail=f"--metrics-tls-cert {cert} / --metrics-tls-key {key}: {exc}") from None
    return context


def serve_metrics(
    where: tuple[str, int],
    store: Store,
    run: RunDir,
    *,
    names: bool = True,
    token: str | None = None,
    tls: tuple[Path, Path] | None = None,
) -> MetricsServer:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, run, names=names))
    host, port = where
    family = _Server6 if ":" in host else _Server
    try:
        server = make_server(host, port, _app(_Rendered(registry), token), family, _Quiet)
    except OSError as exc:
        raise errors.InvalidArgument(detail=f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    if tls is not None:  # the handshake happens in the request's thread: a stalling client holds only that
        server.socket = tls_context(*tls).wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", host, port)
    with contextlib.suppress(ValueError):
        if not ipaddress.ip_address(host).is_loopback and (token is None or tls is None):
            log.warning(
                "metrics on %s:%d: anyone who can reach it %s (give --metrics-tls-cert/--metrics-tls-key and "
                "--metrics-token-file%s)",
                host,
                port,
                f"reads every clone's {'name and ' if names else ''}traffic"
                if token is None
                else "sees the token in the clear",
                "" if not names else ", or --no-metrics-names",
            )
    return MetricsServer(server, thread)
