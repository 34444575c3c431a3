"""`sdrun run --engine ray`: the batches of a run on a Ray cluster (Ray Data).

Each row of the Ray Dataset is one batch of `sdrun run`'s (the same pairs, in the same
batches, as a local run with the same --batch-pairs), so every model call sees the same
inputs and the details are byte-identical to a local run's. `map_batches` runs them in a
pool of actors that load the bundle once each; images are read inside the actors from
their paths (shared storage on a real cluster); results stream back to the driver, which
writes them with spotdiff's own writer (`runner.run_dataset`: the lock, the run record,
`--resume`, the final sorted files).

Ray's known pitfalls, handled here: a pool that takes every CPU starves the tasks that
read the rows and the job hangs, so actors ask for at most the cluster's CPUs less one
(fractions if need be); output order is not kept, so results are keyed by batch; tests
and CI need `RAY_USAGE_STATS_ENABLED=0` and a capped object store (`init_ray`).

Every wait on Ray is bounded:
- joining a cluster (`init_ray`): ray.init retries an address that is not there for
  minutes, so the address is checked first (a TCP connection to host:port, then a GCS
  client for host:port addresses, both in a daemon thread with a deadline) and fails with
  `RayConnectError` naming the address and what to check. ray.init itself runs in the main
  thread (Ray started from another thread never answers in Ray 2.60); once the GCS
  answered, it is bounded by Ray's own timeouts (60 s at most to find the node).
- the pool (`plan_pool`): each actor loads the whole bundle, so the pool is capped to the
  actors the cluster's CPUs, GPUs and memory can hold (`actors_that_fit`), and each actor
  reserves its memory in Ray's accounting (`memory=`: other jobs see it taken; Ray 2.60
  does not refuse an actor for it, so the cap is what keeps the machine from swapping);
  the actors must then start within `start_timeout_s` (Ray Data's `wait_for_min_actors_s`;
  e.g. a node with the GPUs they ask for is lost), else `RayError`.
- the batches: a batch takes what its model calls take, which depends on the bundle and
  the images, so there is no fixed bound; a failing actor fails the run (Ray Data).
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backends.memory import GraphCost, available_memory, format_size, parse_size
from ..errors import SpotdiffError
from .dataset import PairSource

if TYPE_CHECKING:
    from ..bundle.bundle import Bundle

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 * 2**20  # a local cluster's object store: rows here are small JSON
CONNECT_TIMEOUT_S = 30.0  # joining a cluster (`init_ray`), all checks together
TCP_TIMEOUT_S = 10.0  # a host:port that has not answered a TCP connection in this long is not there
ACTOR_START_TIMEOUT_S = 300.0  # the pool's actors: scheduled and the bundle loaded
# What a Ray worker process with numpy, onnxruntime and sdrun imported holds before it
# loads a graph (the driver with them imported: 113 MiB RSS; a worker adds Ray's core).
ACTOR_OVERHEAD_BYTES = 192 * 2**20
# The graphs a Pipeline opens (sdrun.pipeline.Pipeline.__init__): an actor holds these.
PIPELINE_GRAPHS = (("owlvit", "image"), ("gdino", "model"), ("siamese", "pair"), ("clip", "visual"))
GCS_DEFAULT_PORT, CLIENT_DEFAULT_PORT = 6379, 10001

_cluster = {"local": False}  # whether init_ray started the cluster here (its memory is this machine's)


class RayError(SpotdiffError):
    """Ray is missing or the cluster cannot run the job."""


class RayConnectError(RayError):
    """The cluster at --address cannot be reached or joined."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RayError(f"--engine ray needs the ray extra ({e}): pip install 'spotdiff[ray]'") from None
    return ray


# ---- joining a cluster ----------------------------------------------------------------------
def parse_address(address: str | None) -> tuple[str, str | None, int | None]:
    """(kind, host, port) of an --address: kind "local" (None, "", "local": start a cluster
    here), "auto" (the one `ray start` left on this machine), "client" (ray://host[:port]) or
    "gcs" (host:port of the head's GCS)."""
    a = (address or "").strip()
    if a in ("", "local"):
        return "local", None, None
    if a == "auto":
        return "auto", None, None
    kind, rest = ("client", a[len("ray://"):]) if a.startswith("ray://") else ("gcs", a)
    rest = rest.rstrip("/")
    if rest.startswith("[") and rest.endswith("]"):  # [ipv6] without a port
        host, port = rest[1:-1], ""
    elif ":" in rest:
        host, port = rest.rsplit(":", 1)
        host = host.strip("[]")
    else:
        host, port = rest, ""
    if not port and kind == "client":
        port = str(CLIENT_DEFAULT_PORT)
    if "://" in rest or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayConnectError(
            f"--address {address!r}: not a Ray address; write host:port (the head's GCS port, "
            f"{GCS_DEFAULT_PORT} by default), ray://host:{CLIENT_DEFAULT_PORT} (Ray Client) or auto")
    return kind, host, int(port)


def _what_to_check(kind: str, host: str, port: int) -> str:
    what = (f"the head node runs the Ray Client server on port {port} ({CLIENT_DEFAULT_PORT} by default)"
            if kind == "client" else
            f"{port} is the head node's GCS port (`ray start --head --port`, {GCS_DEFAULT_PORT} by default)")
    return (f"check that the cluster is up (`ray status` on its head node), that {what}, and that "
            f"this machine can reach {host} (firewall, VPN, security group); "
            f"or leave out --address to run on a local cluster")


def _bounded(fn: Callable, timeout_s: float) -> tuple[bool, object, BaseException | None]:
    """fn() in a daemon thread, waited for at most `timeout_s`: (finished, value, error).
    A call still running is left behind (daemon: it never keeps the process alive)."""
    box: dict = {}

    def go():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=go, daemon=True, name="sdrun-ray-connect")
    t.start()
    t.join(max(0.0, timeout_s))
    return not t.is_alive(), box.get("value"), box.get("error")


def check_reachable(address: str, kind: str, host: str, port: int, timeout_s: float) -> None:
    """A TCP connection to host:port (name lookup included) within `timeout_s`, else
    `RayConnectError`: a closed port fails at once, a host that does not answer when the
    time is up."""
    wait = min(timeout_s, TCP_TIMEOUT_S)

    def connect():
        with socket.create_connection((host, port), timeout=wait):
            pass

    done, _, err = _bounded(connect, wait)
    if done and err is None:
        return
    if not done or isinstance(err, socket.timeout):
        why = f"{host}:{port} did not answer within {wait:g} s"
    elif isinstance(err, socket.gaierror):
        why = f"cannot resolve host {host!r} ({err.strerror or err})"
    elif isinstance(err, ConnectionRefusedError):
        why = f"{host}:{port} refused the connection (nothing listens on port {port})"
    else:
        why = f"cannot connect to {host}:{port} ({err})"
    raise RayConnectError(f"cannot reach the Ray cluster at {address}: {why}; "
                          f"{_what_to_check(kind, host, port)}")


def probe_gcs(address: str, host: str, port: int, timeout_s: float) -> None:
    """That a Ray GCS answers at host:port within `timeout_s` (ray.init would retry a port
    that accepts connections but is no GCS, or a GCS that hangs, for minutes)."""
    try:
        # private API, absent from ray's _raylet.pyi (unused-ignore: a Ray whose stub has it, or no Ray)
        from ray._raylet import GcsClient  # type: ignore[attr-defined, unused-ignore]
    except ImportError:  # a Ray without it: ray.init's own timeouts apply
        return
    done, _, err = _bounded(lambda: GcsClient(address=f"{host}:{port}").cluster_id, timeout_s)
    if done and err is None:
        return
    why = (f"no Ray GCS answered within {timeout_s:.0f} s" if not done else f"no Ray GCS answered ({err})")
    raise RayConnectError(f"cannot join the Ray cluster at {address}: {host}:{port} accepts connections "
                          f"but {why} (a GCS of Ray {import_ray().__version__}, as here, is needed); "
                          f"{_what_to_check('gcs', host, port)}")


def require_ray_client(address: str) -> None:
    """ray:// needs Ray Client (grpcio), which `pip install ray` leaves out."""
    try:
        import grpc  # noqa: F401  (what Ray itself checks for Ray Client)
    except ImportError as e:
        raise RayError(f"--address {address}: a ray:// address needs Ray Client, which is not installed "
                       f"({e}): pip install 'ray[client]' (the cluster's Ray version; here "
                       f"{import_ray().__version__})") from None


def find_auto_address() -> str:
    """What "auto" means: RAY_ADDRESS, else the cluster `ray start` left on this machine,
    else `RayConnectError` (Ray's own lookup: quick, it reads a file and the process list)."""
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:
        return "auto"
    try:
        return get_ray_address_from_environment("auto", None) or "auto"
    except ConnectionError:
        raise RayConnectError(
            "--address auto: no Ray cluster runs on this machine (none started with `ray start` "
            "and RAY_ADDRESS is not set); start one (`ray start --head`), give its address "
            f"(--address host:{GCS_DEFAULT_PORT}, ray://host:{CLIENT_DEFAULT_PORT}), or leave out "
            "--address to run on a local cluster") from None


def init_ray(address: str | None = None, num_cpus: int | None = None,
             timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """Connect to `address` ("auto", "host:6379", "ray://host:10001"; None: RAY_ADDRESS if set)
    or start a local cluster. An address that is not there fails within `timeout_s`
    (at once when its port is closed) with `RayConnectError`."""
    ray = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return ray
    # ray.init(address=None) joins RAY_ADDRESS: checked here like a given address (and never
    # with num_cpus, which Ray refuses for a cluster it joins)
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    kind, host, port = parse_address(address)
    if kind == "local":
        ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=OBJECT_STORE_BYTES,
                 include_dashboard=False, log_to_driver=False)
        _cluster["local"] = True
        return ray
    deadline = time.monotonic() + timeout_s
    if kind == "auto":
        address = find_auto_address()
        kind, host, port = parse_address(address) if address != "auto" else (kind, None, None)
    if kind == "client":
        require_ray_client(address)
    if host is not None and port is not None:  # (parse_address gives both or neither)
        check_reachable(address, kind, host, port, timeout_s)
        if kind == "gcs":
            probe_gcs(address, host, port, max(1.0, deadline - time.monotonic()))
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise RayConnectError(f"cannot join the Ray cluster at {address}: {e}") from None
    _cluster["local"] = False
    return ray


# ---- the pool of actors ---------------------------------------------------------------------
def actor_memory(bundle: Bundle | str | Path, memory_budget: int | str | None = None) -> int:
    """Bytes one actor needs: the graph files a Pipeline opens (onnxruntime holds their
    weights, about their size), plus its working memory: the largest single-input call of
    those graphs (the manifest's measured costs, else `FALLBACK_COSTS`; a call never runs
    smaller) or the memory budget its calls may share, if larger, plus the process itself
    (`ACTOR_OVERHEAD_BYTES`). For the tiny-random bundle with fallback costs, about 1.3 GiB
    (8 actors of it were measured at 9.6 GB)."""
    from ..bundle.bundle import Bundle

    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, verify=False)
    files, calls = 0, [0]
    for model, graph in PIPELINE_GRAPHS:
        entry = b.models.get(model, {}).get("graphs", {}).get(graph)
        if isinstance(entry, dict) and "file" in entry:
            files += b.path(entry["file"]).stat().st_size
            calls.append(GraphCost.of(model, entry).bytes_for(1))
    budget = parse_size(memory_budget) if memory_budget is not None else 0
    return ACTOR_OVERHEAD_BYTES + files + max(max(calls), budget)


def actors_that_fit(requested: int, cpus_per_actor: float, cluster_cpus: float,
                    per_actor_bytes: int | None = None, cluster_bytes: float | None = None,
                    gpus_per_actor: float = 0.0, cluster_gpus: float = 0.0) -> tuple[int, str]:
    """(actors to start, message): `requested`, or fewer with a warning when the cluster
    cannot hold them all (Ray would wait forever for the rest, or they would share CPUs
    and memory until the machine swaps), or (0, the reason) when not one fits.
    CPUs never refuse the first actor: it asks for what there is (`actor_cpus`) and runs
    its threads on it. `per_actor_bytes`/`cluster_bytes` None: memory is not counted."""
    eps = 1e-9
    limits = [(max(1, math.floor(cluster_cpus / cpus_per_actor + eps)),
               f"{cluster_cpus:g} CPU(s), {cpus_per_actor:g} per actor (--cpus-per-actor)")]
    if gpus_per_actor > 0:
        limits.append((math.floor(cluster_gpus / gpus_per_actor + eps),
                       f"{cluster_gpus:g} GPU(s), {gpus_per_actor:g} per actor (--gpus-per-actor)"))
    if per_actor_bytes and cluster_bytes is not None:
        limits.append((int(cluster_bytes // per_actor_bytes),
                       (f"{format_size(cluster_bytes)} of memory free, about {format_size(per_actor_bytes)} "
                        f"per actor (each loads the whole bundle)")))
    n, why = min(limits, key=lambda lim: lim[0])
    if n >= requested:
        return requested, ""
    if n < 1:
        return 0, (f"--actors {requested}: not even one actor fits the Ray cluster: it has {why}; "
                   f"use a larger cluster, fewer resources per actor or a smaller --memory-budget")
    return n, (f"warning: --actors {requested} capped to {n}: the Ray cluster has {why}; "
               f"more would wait forever for resources or overload the machine")


def actor_cpus(cluster_cpus: float, actors: int, cpus_per_actor: float) -> float:
    """What each actor asks for: `cpus_per_actor`, lowered so that the pool leaves one CPU
    of the cluster (at least half of one) for the tasks that read rows."""
    free = max(0.5, cluster_cpus - 1.0) if cluster_cpus > 1 else cluster_cpus / 2
    return min(cpus_per_actor, free / actors)


@dataclass(frozen=True)
class Pool:
    """What `map_batches` is given for the actors."""

    size: int
    num_cpus: float
    num_gpus: float | None
    memory: int | None  # bytes each actor asks Ray for (None: the cluster reports no memory)
    threads: int  # each actor's onnxruntime threads

    def remote_args(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                **({"memory": self.memory} if self.memory else {})}


def cluster_memory(ray: Any) -> float | None:
    """Bytes of memory the cluster can still give actors: Ray's unreserved "memory"
    resource, and on a cluster started here no more than this machine has available
    (Ray counts its total, not what other processes left)."""
    free = ray.available_resources().get("memory")
    if free is None:
        return None
    return min(float(free), available_memory("cpu")[0]) if _cluster["local"] else float(free)


def plan_pool(ray: Any, bundle: Bundle | str | Path, actors: int, cpus_per_actor: float, gpus_per_actor: float,
              memory_budget: int | str | None, warn: Callable[[str], None]) -> Pool:
    """The pool the cluster can hold (`actors_that_fit`), warnings to `warn`; `RayError`
    when not one actor fits."""
    res = ray.cluster_resources()
    cpus = float(res.get("CPU", 1.0))
    per_actor = actor_memory(bundle, memory_budget)
    free = cluster_memory(ray)
    n, message = actors_that_fit(actors, cpus_per_actor, cpus, per_actor, free,
                                 gpus_per_actor, float(res.get("GPU", 0.0)))
    if n < 1:
        raise RayError(message)
    if message:
        warn(message)
    ask = actor_cpus(cpus, n, cpus_per_actor)
    if ask < cpus_per_actor:
        warn(f"warning: {n} actor(s) x {cpus_per_actor} CPU would take all {cpus:g} CPUs of "
             f"the cluster and starve the tasks that read the rows; each actor asks for {ask:.2f}")
    return Pool(n, ask, gpus_per_actor or None, per_actor if free is not None else None,
                max(1, int(cpus_per_actor)))


def bound_actor_start(ds: Any, timeout_s: float) -> Any:
    """Make the actors of `ds`'s map_batches start within `timeout_s` (else Ray Data raises
    GetTimeoutError; `_started_or_fail` turns it into `RayError`). A bound already set on
    the dataset's context is kept."""
    ctx = ds.context
    if not ctx.wait_for_min_actors_s or ctx.wait_for_min_actors_s <= 0:
        ctx.wait_for_min_actors_s = max(1, math.ceil(timeout_s))
    return ds


def _started_or_fail(ray, rows: Iterator, pool: Pool, timeout_s: float) -> Iterator:
    try:
        yield from rows
    except ray.exceptions.GetTimeoutError:
        raise RayError(
            f"the {pool.size} Ray actor(s) did not start within {timeout_s:g} s: the cluster lacks "
            f"the resources they ask for (each {pool.num_cpus:g} CPU"
            + (f", {pool.num_gpus:g} GPU" if pool.num_gpus else "")
            + (f", {format_size(pool.memory)} of memory" if pool.memory else "")
            + ") on one node, or loading the bundle takes longer; see `ray status`") from None


class PairBatchActor:
    """Loads the bundle once; each call runs rows of pair batches (`run_batch`)."""

    def __init__(self, bundle: str, provider: str, threads: int, params: dict,
                 memory_budget: int | None = None):
        from ..pipeline import Pipeline

        self.pipe = Pipeline.load(bundle, provider=provider, threads=threads, params=params,
                                  memory_budget=memory_budget).open_sessions()

    def __call__(self, rows: dict) -> dict:
        from .runner import run_batch

        out = []
        for spec in rows["batch"]:
            batch = [PairSource(d["pair_id"], Path(d["a"]) if d["a"] else None,
                                Path(d["b"]) if d["b"] else None, d["problem"]) for d in json.loads(spec)]
            out.append(json.dumps([r.to_json() for r in run_batch(self.pipe, batch)]))
        return {"start": np.asarray(rows["start"]), "results": np.array(out, dtype=object)}


def ray_executor(bundle: str | Path, params: dict, actors: int = 1, cpus_per_actor: float = 1.0,
                 gpus_per_actor: float = 0.0, provider: str = "cpu", memory_budget: int | None = None,
                 warn: Callable[[str], None] = log.warning,
                 start_timeout_s: float = ACTOR_START_TIMEOUT_S) -> Callable:
    """A `run_dataset` executor running the batches on the Ray cluster `init_ray` joined.
    `memory_budget` (bytes) applies to each actor; None: each takes its share of what its
    machine has free when it loads. The pool is capped to what the cluster holds
    (`plan_pool`, with a warning) and must start within `start_timeout_s`."""
    ray = import_ray()

    def execute(todo) -> Iterator[tuple[int, list]]:
        if not todo:
            return
        pool = plan_pool(ray, bundle, actors, cpus_per_actor, gpus_per_actor, memory_budget, warn)
        rows = [{"start": start, "batch": json.dumps([{**asdict(p), "a": str(p.a) if p.a else None,
                                                       "b": str(p.b) if p.b else None} for p in batch])}
                for start, batch in todo]
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(1, 4 * pool.size)))
        ds = bound_actor_start(ds, start_timeout_s).map_batches(
            PairBatchActor, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"bundle": str(bundle), "provider": provider,
                                   "threads": pool.threads, "params": params,
                                   "memory_budget": memory_budget},
            compute=ray.data.ActorPoolStrategy(size=pool.size), **pool.remote_args())
        for row in _started_or_fail(ray, ds.iter_rows(), pool, start_timeout_s):
            yield int(row["start"]), json.loads(row["results"])

    return execute


def run_on_ray(ray_dataset: Any, bundle: str | Path, params: dict | None = None, actors: int = 1,
               cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, provider: str = "cpu",
               memory_budget: int | None = None, warn: Callable[[str], None] = log.warning,
               start_timeout_s: float = ACTOR_START_TIMEOUT_S) -> Any:
    """For a Ray Dataset of pairs you already have (columns `pair_id`, `a`, `b`: image
    paths): the same Dataset with one more column, `result`, each pair's JSON as `sdrun run`
    writes it (errors recorded, never raised). The pool is capped to what the cluster
    holds (a warning to `warn`); its actors must start within `start_timeout_s` (set on the
    dataset's context unless it has a bound: a timeout then raises Ray's GetTimeoutError)."""
    ray = import_ray()

    class _Rows(PairBatchActor):
        def __call__(self, rows: dict) -> dict:
            from .runner import run_batch

            batch = [PairSource(str(i), Path(a), Path(b)) for i, a, b in zip(rows["pair_id"], rows["a"], rows["b"])]
            return {**rows, "result": np.array([json.dumps(r.to_json(), sort_keys=True)
                                                for r in run_batch(self.pipe, batch)], dtype=object)}

    pool = plan_pool(ray, bundle, actors, cpus_per_actor, gpus_per_actor, memory_budget, warn)
    return bound_actor_start(ray_dataset, start_timeout_s).map_batches(
        _Rows, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pool.size),
        fn_constructor_kwargs={"bundle": str(bundle), "provider": provider,
                               "threads": pool.threads, "params": params or {},
                               "memory_budget": memory_budget},
        **pool.remote_args())
