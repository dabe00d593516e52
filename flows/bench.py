"""``unlearn bench`` as a Prefect flow whose tasks run on a Dask cluster (``prefect-dask``).

The sweep is cut into units of work: one (k, seed) group when a retrain is measured (the
retrain and the forget set are shared by every method and objective of the group), else one
run (method, objective, k, seed); in continual mode, one chain of rounds (method, objective,
k, seed). A unit is a small JSON-able dict; each worker loads the dataset and the pre-trained
checkpoint from disk once per process (nothing large is pickled per task) and returns rows.

``run_serial`` calls the same unit function in this process, without Prefect or Dask. Every
row field except ``unlearn.benchmark.TIMING_KEYS`` is a deterministic function of the unit
(seeds are set per run, one torch thread per worker), so both give the same rows.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Spec = dict[str, Any]  # dataset, data_dir, checkpoint, variants, objectives, ks, seeds, ...
Unit = dict[str, Any]

# Set before distributed is imported: its INFO lines (worker start/stop) drown the output.
QUIET_DASK_ENV = {"DASK_LOGGING__DISTRIBUTED": "warning", "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "warning"}

_LOADED: dict[tuple, tuple] = {}  # per process: (dataset, checkpoint) -> (ds, model, spec)


def plan_units(spec: Spec) -> list[Unit]:
    """The units of ``spec`` in the order their rows are reported."""
    variants = [v["label"] for v in spec["variants"]]
    pairs = [(o, v) for o in spec["objectives"] for v in variants]
    units: list[Unit] = []
    for k in spec["ks"]:
        for seed in spec["seeds"]:
            if spec.get("rounds"):
                units += [{"kind": "continual", "k": k, "seed": seed, "pairs": [p]} for p in pairs]
            elif spec["retrain"]:
                units.append({"kind": "group", "k": k, "seed": seed, "pairs": pairs})
            else:
                units += [{"kind": "group", "k": k, "seed": seed, "pairs": [p]} for p in pairs]
    return units


def _load(spec: Spec):
    """Dataset and pre-trained model (on the spec's device), read from disk once per process."""
    from unlearning.datasets import load_dataset
    from unlearning.devices import resolve_device
    from unlearning.models import load_checkpoint

    ckpt = Path(spec["checkpoint"])
    key = (spec["dataset"], spec.get("data_dir"), str(ckpt), ckpt.stat().st_mtime_ns,
           spec.get("device", "cpu"))
    if key not in _LOADED:
        _LOADED.clear()
        ds = load_dataset(spec["dataset"], spec.get("data_dir"))
        model, model_spec = load_checkpoint(ckpt, device=resolve_device(spec.get("device", "cpu")))
        model.eval()
        _LOADED[key] = (ds, model, model_spec)
    return _LOADED[key]


def run_unit(spec: Spec, unit: Unit, log: Callable[[dict], None] | None = None) -> list[dict]:
    """The rows of one unit (plain function: the Prefect task wraps it, serial mode calls it
    with ``log``, which sees each row as soon as it exists: a continual unit takes minutes)."""
    import torch

    from unlearning import benchmark as B
    from unlearning.devices import describe_device, model_device
    from unlearning.models import build_model
    from unlearning.train import TrainConfig

    torch.set_num_threads(int(spec.get("threads") or 1))
    ds, model, model_spec = _load(spec)
    device = model_device(model)
    variants = {v["label"]: B.Variant(v["label"], v["method"], v["params"]) for v in spec["variants"]}
    pairs = [(objective, variants[label]) for objective, label in unit["pairs"]]

    def tagged(row: dict) -> None:
        row.update(dataset=ds.name, model=model_spec.arch, device=describe_device(device))
        if log:
            log(row)

    if unit["kind"] == "continual":
        (objective, variant), = pairs
        rows = B.run_continual(ds, model, variant, objective, unit["k"], spec["rounds"],
                               unit["seed"], bool(spec.get("include_earlier")), log=tagged)
    else:
        config = B.BenchConfig(
            variants=tuple(variants.values()), objectives=tuple(spec["objectives"]),
            ks=tuple(spec["ks"]), seeds=tuple(spec["seeds"]), retrain=spec["retrain"],
            retain_fraction=spec["retain_fraction"], train=TrainConfig(**spec["train"]))
        # fresh weights are drawn on the CPU (the same on every device), then moved
        rows = B.run_group(ds, model, lambda: build_model(model_spec).to(device), config, unit["k"],
                           unit["seed"], pairs, log=tagged)
    return rows


def print_row(row: dict) -> None:
    """One line per run on stderr (tables go to stdout)."""
    where = f"round {row['round']:<3d}" if "round" in row else f"seed={row['seed']}"
    drop = row.get("cumulative_test_drop", row.get("test_drop", 0.0))
    extra = ""
    if row.get("earlier_objective_rate") is not None:
        extra = f" earlier {row['earlier_objective_rate']:6.2f}%"
    print(f"  {row['method']:22s} {row['objective']:11s} k={row['k']:<4d} {where} "
          f"reached={row['reached']!s:5s} test drop {drop:6.2f} pp{extra} "
          f"steps {row['steps']:5d} {row['unlearn_seconds']:7.2f}s", file=sys.stderr, flush=True)


def run_serial(spec: Spec, log: Callable[[dict], None] | None = print_row) -> list[dict]:
    """Every unit in this process, in order (no Prefect, no Dask)."""
    rows: list[dict] = []
    for unit in plan_units(spec):
        rows += run_unit(spec, unit, log)
    return rows


def _flow():
    """The Prefect flow and task, built on first use (importing this module stays cheap)."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import as_completed

    unit_task = task(name="bench-unit", cache_policy=NO_CACHE,
                     task_run_name="{unit[kind]}-k{unit[k]}-seed{unit[seed]}")(run_unit)

    @flow(name="bench", validate_parameters=False)
    def bench_flow(spec: Spec, units: list[Unit], quiet: bool = False) -> list[list[dict]]:
        """Fan the units out on the flow's task runner; rows come back per unit, in order."""
        # Largest first (cost grows with k and with rounds), so no big unit starts last and
        # leaves the other workers idle; the rows are put back in plan order below.
        order = sorted(range(len(units)), key=lambda i: -units[i]["k"])
        futures = {i: unit_task.submit(spec, units[i]) for i in order}
        for done in as_completed(list(futures.values())):
            for row in done.result():
                if not quiet:
                    print_row(row)
        return [futures[i].result() for i in range(len(units))]

    return bench_flow


def scheduler_problem(address: str, timeout: float = 5.0) -> str | None:
    """Why the Dask scheduler at ``address`` cannot take work (None if it can)."""
    for key, value in QUIET_DASK_ENV.items():
        os.environ.setdefault(key, value)
    from distributed import Client

    try:
        with Client(address, timeout=timeout) as client:
            workers = len(client.scheduler_info().get("workers", {}))
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        detail = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        return f"cannot reach the Dask scheduler at {address!r}: {detail}"
    if workers == 0:
        return f"the Dask scheduler at {address!r} has no workers"
    return None


def run_dask(spec: Spec, workers: int = 2, address: str | None = None,
             quiet: bool = False) -> list[dict]:
    """Run the bench flow with a ``DaskTaskRunner``: a new local cluster of ``workers``
    processes (one thread each), or the existing scheduler at ``address``.

    Prefect must already point at its home (``tasks.paths.configure_environment``); without
    ``PREFECT_API_URL`` it starts its temporary local server.
    """
    for key, value in QUIET_DASK_ENV.items():
        os.environ.setdefault(key, value)
    import logging

    from prefect_dask import DaskTaskRunner

    # A worker that has imported torch does not exit within the nanny's 4 s on close and is
    # killed (harmless: its results are in); the nanny's warning about it is noise.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster",
                                cluster_kwargs=local_cluster_kwargs(workers))
    units = plan_units(spec)
    with prefect_api(), untrimmed_workers():
        per_unit = _flow().with_options(task_runner=runner)(spec=spec, units=units, quiet=quiet)
    return [row for rows in per_unit for row in rows]


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """``distributed.LocalCluster`` arguments of the bench's own cluster."""
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True,
            "dashboard_address": None}


@contextlib.contextmanager
def untrimmed_workers() -> Iterator[None]:
    """Dask starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``: glibc then hands freed
    memory back to the system at once, so every step's tensors are mapped and faulted in
    again. Torch runs about 2.7 times slower so (one process on this 2-core machine: 100
    ``l2ul`` steps of a k = 32 Fashion-MNIST batch 30.7 s against 10.9 s; a training epoch
    14.6 s against 5.5 s), which would inflate every timing of the bench. Workers started in
    this context keep glibc's default (an existing cluster, ``--dask-address``, keeps its own)."""
    import dask

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        yield


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API every process of the run talks to: ``PREFECT_API_URL`` if set, else
    Prefect's temporary local server, started here so that its address travels to the Dask
    workers with the settings (without it each worker would start a server of its own)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    server = SubprocessASGIServer()  # the same instance Prefect's own client would start
    server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server.api_url


def run_bench(spec: Spec, serial: bool, workers: int = 2, address: str | None = None,
              quiet: bool = False) -> tuple[list[dict], float]:
    """Rows and wall seconds (Dask: cluster and Prefect server start included)."""
    start = time.perf_counter()
    if serial:
        rows = run_serial(spec, None if quiet else print_row)
    else:
        rows = run_dask(spec, workers, address, quiet)
    return rows, time.perf_counter() - start
