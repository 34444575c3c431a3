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
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import SpotdiffError
from .dataset import PairSource

OBJECT_STORE_BYTES = 256 * 2**20  # a local cluster's object store: rows here are small JSON


class RayError(SpotdiffError):
    """Ray is missing or the cluster cannot run the job."""


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise RayError(f"--engine ray needs the ray extra ({e}): pip install 'spotdiff[ray]'") from None
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to `address` ("auto", "ray://host:10001") or start a local cluster."""
    ray = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=OBJECT_STORE_BYTES,
                 include_dashboard=False, log_to_driver=False)
    return ray


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


def actor_cpus(cluster_cpus: float, actors: int, cpus_per_actor: float) -> float:
    """What each actor asks for: `cpus_per_actor`, lowered so that the pool leaves one CPU
    of the cluster (at least half of one) for the tasks that read rows."""
    free = max(0.5, cluster_cpus - 1.0) if cluster_cpus > 1 else cluster_cpus / 2
    return min(cpus_per_actor, free / actors)


def ray_executor(bundle: str | Path, params: dict, actors: int = 1, cpus_per_actor: float = 1.0,
                 gpus_per_actor: float = 0.0, provider: str = "cpu", memory_budget: int | None = None,
                 warn: Callable[[str], None] = print) -> Callable:
    """A `run_dataset` executor running the batches on the Ray cluster `init_ray` joined.
    `memory_budget` (bytes) applies to each actor; None: each takes its share of what its
    machine has free when it loads."""
    ray = import_ray()

    def execute(todo) -> Iterator[tuple[int, list]]:
        if not todo:
            return
        cluster = float(ray.cluster_resources().get("CPU", 1.0))
        ask = actor_cpus(cluster, actors, cpus_per_actor)
        if ask < cpus_per_actor:
            warn(f"warning: {actors} actor(s) x {cpus_per_actor} CPU would take all {cluster:g} CPUs of "
                 f"the cluster and starve the tasks that read the rows; each actor asks for {ask:.2f}")
        threads = max(1, int(cpus_per_actor))
        rows = [{"start": start, "batch": json.dumps([{**asdict(p), "a": str(p.a) if p.a else None,
                                                       "b": str(p.b) if p.b else None} for p in batch])}
                for start, batch in todo]
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(1, 4 * actors)))
        ds = ds.map_batches(PairBatchActor, batch_size=1, batch_format="numpy",
                            fn_constructor_kwargs={"bundle": str(bundle), "provider": provider,
                                                   "threads": threads, "params": params,
                                                   "memory_budget": memory_budget},
                            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=ask,
                            num_gpus=gpus_per_actor or None)
        for row in ds.iter_rows():
            yield int(row["start"]), json.loads(row["results"])

    return execute


def run_on_ray(ray_dataset, bundle: str | Path, params: dict | None = None, actors: int = 1,
               cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, provider: str = "cpu",
               memory_budget: int | None = None):
    """For a Ray Dataset of pairs you already have (columns `pair_id`, `a`, `b`: image
    paths): the same Dataset with one more column, `result`, each pair's JSON as `sdrun run`
    writes it (errors recorded, never raised)."""
    ray = import_ray()

    class _Rows(PairBatchActor):
        def __call__(self, rows: dict) -> dict:
            from .runner import run_batch

            batch = [PairSource(str(i), Path(a), Path(b)) for i, a, b in zip(rows["pair_id"], rows["a"], rows["b"])]
            return {**rows, "result": np.array([json.dumps(r.to_json(), sort_keys=True)
                                                for r in run_batch(self.pipe, batch)], dtype=object)}

    cluster = float(ray.cluster_resources().get("CPU", 1.0))
    return ray_dataset.map_batches(
        _Rows, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus(cluster, actors, cpus_per_actor), num_gpus=gpus_per_actor or None,
        fn_constructor_kwargs={"bundle": str(bundle), "provider": provider,
                               "threads": max(1, int(cpus_per_actor)), "params": params or {},
                               "memory_budget": memory_budget})
