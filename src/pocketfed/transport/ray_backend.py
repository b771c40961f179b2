"""The Ray backend: virtual devices run on a pool of Ray actors, locally or on a cluster.

The seam is the in-process backend's (`run(tasks) -> results` in task order, `close()`); only
where the device code runs changes. Each worker runs exactly `pocketfed.device.task.run_task`.

Memory: the frozen base model is `ray.put` once, as a list of numpy arrays (`shared.SharedWeights`).
Ray reads numpy arrays out of its shared-memory object store without copying, so every worker wraps
the same physical pages in read-only tensors (`torch.from_numpy`) and builds its model around them
on the meta device: N workers hold one copy of the base weights, plus each its own LoRA adapter,
optimizer state and activations. A worker trains what the in-process backend trains
(`shared.device_model`: the lean Llama where it supports the model), so it never imports
transformers, PEFT or what they pull in (scipy, ...), about 130 MB of private memory a worker.
Workers allocate with jemalloc where the machine has it (`pocketfed.memory.jemalloc_env`),
and between devices a worker hands its free pages back (`release_free_memory`), so a waiting worker
holds only its live memory.
docs/BENCHMARKS.md (bench_scale) has the measured figures.

Resources: each worker is an actor declaring `sim.device_cpus` CPUs (its torch threads) and
`sim.device_memory_mb` of memory; Ray's scheduler starts only as many as the cluster can hold
(on a 2-core machine with 1 CPU per device: two at a time). A watchdog thread in each worker
ends it when its private memory (RSS less shared pages, i.e. not counting the shared base model)
passes what it declared. A device whose worker fails, dies or is killed (by the watchdog or by
Ray's own out-of-memory monitor) comes back as a `Dropout`; the worker is replaced and the round
goes on.

A cluster (`sim.ray_address`, e.g. ray://head:10001) must have pocketfed and its model cache
installed on its nodes; the training data travel with each task (one device's token rows).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import warnings
from typing import Any, Callable

import torch

from pocketfed.config import LoraConfig
from pocketfed.data.federated import Blocks, FederatedDataset
from pocketfed.device.task import run_task
from pocketfed.errors import UserError
from pocketfed.memory import allocator, jemalloc_env, release_free_memory
from pocketfed.protocol.messages import Dropout, TrainResult, TrainTask
from pocketfed.transport.shared import SharedWeights, SimulatorModel, device_model, share_base

MB = 1 << 20
WATCHDOG_SECONDS = 0.05
MEMORY_EXIT_CODE = 77


def in_shared_memory(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor's data lies in a shared mapping of this process (the object store's
    pages, mapped MAP_SHARED), i.e. none was copied into private memory."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            addresses, perms = line.split()[:2]
            if perms[3] == "s":
                lo, hi = (int(x, 16) for x in addresses.split("-"))
                spans.append((lo, hi))
    return all(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in tensors)


def private_bytes(pid: int | None = None) -> int:
    """Resident memory a process does not share: RSS less shared pages (so the base model,
    mapped from the object store, is not counted)."""
    import psutil

    mem = psutil.Process(pid).memory_info()
    return int(mem.rss - getattr(mem, "shared", 0))


# ---- the worker -------------------------------------------------------------------------------


class DeviceWorker:
    """One Ray actor: a model built on the shared base, running device rounds one after another.

    Plain class; `RayBackend` makes it remote with the declared resources."""

    def __init__(self, shared: SharedWeights, lora_cfg: LoraConfig, lora_seed: int, cpus: int, memory_limit: int):
        torch.set_num_threads(cpus)
        self.model = device_model(shared, lora_cfg, lora_seed)
        self.memory_limit = memory_limit
        self.peak_private = private_bytes()
        if memory_limit:
            threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self) -> None:
        """Ends this worker when its private memory passes the declared limit (the device dropped)."""
        import time

        while True:
            used = private_bytes()
            self.peak_private = max(self.peak_private, used)
            if used > self.memory_limit:
                logging.getLogger(__name__).error(
                    "device worker %d: private memory %d MB exceeds its %d MB", os.getpid(), used // MB, self.memory_limit // MB)
                os._exit(MEMORY_EXIT_CODE)
            time.sleep(WATCHDOG_SECONDS)

    def run(self, task: TrainTask, global_adapter: dict[str, torch.Tensor], data: Blocks) -> TrainResult:
        try:
            return run_task(self.model, data, dataclasses.replace(task, global_adapter=global_adapter))
        finally:
            release_free_memory()

    def stats(self) -> dict[str, Any]:
        """pid, memory, and what guards the worker's leanness: which libraries it imported, and whether
        its frozen base weights are still the object store's pages."""
        frozen = [p for p in self.model.module.parameters() if not p.requires_grad]
        return {"pid": os.getpid(), "peak_private_bytes": self.peak_private, "private_bytes": private_bytes(),
                "backend": self.model.backend.value, "base_in_object_store": in_shared_memory(frozen),
                "allocator": allocator(),
                "imported": sorted(m for m in ("transformers", "peft", "scipy") if m in sys.modules)}


# ---- the backend ------------------------------------------------------------------------------


def device_memory_bytes(sim_cfg, model_bytes: int) -> int:
    """What a device declares: sim.device_memory_mb, or 1 GB (interpreter, torch, activations) + the
    model's size (a safe bound on a LoRA round's private memory: gradients flow through every layer)."""
    return sim_cfg.device_memory_mb * MB if sim_cfg.device_memory_mb else 1024 * MB + model_bytes


def adopt_shared(model: torch.nn.Module, shared: SharedWeights) -> None:
    """Point `model`'s frozen base weights at `shared`'s arrays (object-store views), in place.

    After `ray.put`, the driver's own copy would be a second one in memory; rebinding its
    parameters to the zero-copy views read back from the store frees it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    index = {name: i for i, names in enumerate(shared.param_names) for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": frozen weights are never written
        tensors = [torch.from_numpy(a) for a in shared.arrays[: len(shared.param_names)]]
    params = {i: torch.nn.Parameter(t, requires_grad=False) for i, t in enumerate(tensors)}
    for name, _ in list(inner.named_parameters(remove_duplicate=False)):
        i = index.get(name.replace(".base_layer", ""))
        if i is None or "lora_" in name:
            continue
        parent, _, leaf = name.rpartition(".")
        inner.get_submodule(parent)._parameters[leaf] = params[i]


class RayBackend:
    def __init__(self, cfg, sim: SimulatorModel, dataset: FederatedDataset, on_done: Callable[[str], None] | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray: pip install 'pocketfed[ray]'") from None
        self.ray = ray
        self.dataset = dataset
        self.on_done = on_done
        model = sim.model.module
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._started_ray = False
        if not ray.is_initialized():
            self._started_ray = True
            init: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            if cfg.sim.ray_address:
                ray.init(address=cfg.sim.ray_address, **init)
            else:
                ray.init(num_cpus=len(os.sched_getaffinity(0)), object_store_memory=max(128 * MB, 2 * model_bytes), **init)
        cpus = cfg.sim.device_cpus
        self.memory = memory = device_memory_bytes(cfg.sim, model_bytes)
        cluster = ray.cluster_resources()
        if cluster.get("CPU", 0) < cpus or cluster.get("memory", 0) < memory:
            raise UserError(
                f"the Ray cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('memory', 0) / MB:.0f} MB of memory; "
                f"a device declares sim.device_cpus={cpus} and {memory // MB} MB (sim.device_memory_mb)")
        # As many workers as the cluster could run at once (Ray's scheduler holds the rest back).
        self.n_workers = max(1, min(int(cluster["CPU"] // cpus), int(cluster["memory"] // memory)))
        self._weights = ray.put(share_base(model, sim.path))  # the one copy of the base model
        adopt_shared(model, ray.get(self._weights))  # the driver reads it from the store too
        release_free_memory()  # its own copy's pages, now free, go back at once (not at the allocator's leisure)
        # jemalloc named for the workers, also on a cluster, where they do not inherit the driver's environment
        self._actor_cls = ray.remote(DeviceWorker).options(
            num_cpus=cpus, memory=memory, max_restarts=0, max_concurrency=1, runtime_env={"env_vars": jemalloc_env()})
        self._actor_args = (self._weights, cfg.lora, cfg.sim.seed, cpus, memory)
        self.workers = [self._new_worker() for _ in range(self.n_workers)]

    def _new_worker(self):
        return self._actor_cls.remote(*self._actor_args)

    def run(self, tasks: list[TrainTask]) -> list[TrainResult | Dropout]:
        """Each task on a free worker; results in task order. A failed device is a Dropout."""
        ray = self.ray
        adapters: dict[int, Any] = {}  # one object per distinct global adapter (usually one per round)
        for task in tasks:
            adapters.setdefault(id(task.global_adapter), ray.put(task.global_adapter))
        results: list[TrainResult | Dropout | None] = [None] * len(tasks)
        queue = list(range(len(tasks)))[::-1]
        free = list(range(len(self.workers)))
        running: dict[Any, tuple[int, int]] = {}  # ref -> (task index, worker index)
        while queue or running:
            while queue and free:
                i, w = queue.pop(), free.pop()
                task = tasks[i]
                light = dataclasses.replace(task, global_adapter={})
                data = self.dataset.device(task.device_id).train
                ref = self.workers[w].run.remote(light, adapters[id(task.global_adapter)], data)
                running[ref] = (i, w)
            [ref], _ = ray.wait(list(running), num_returns=1)
            i, w = running.pop(ref)
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.OutOfMemoryError:  # Ray's memory monitor killed it: the node is full
                results[i] = Dropout(tasks[i].round, tasks[i].device_id, "out of memory (killed by Ray's memory monitor)")
                self.workers[w] = self._new_worker()
            except ray.exceptions.RayActorError:  # the worker died: our watchdog, the OS's OOM killer, a crash
                results[i] = Dropout(tasks[i].round, tasks[i].device_id,
                                     f"worker died: over its {self.memory // MB} MB of memory, or crashed")
                self.workers[w] = self._new_worker()
            except ray.exceptions.RayError as e:  # the device code raised
                results[i] = Dropout(tasks[i].round, tasks[i].device_id, f"failed: {_reason(e)}")
            free.append(w)
            if self.on_done:
                self.on_done(tasks[i].device_id)
        return results  # type: ignore[return-value]

    def worker_stats(self) -> list[dict[str, int]]:
        """pid and memory of each live worker (for benchmarks)."""
        return self.ray.get([w.stats.remote() for w in self.workers])

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []
        if self._started_ray:
            self.ray.shutdown()


def _reason(e: Exception) -> str:
    """The most telling line of a Ray error: the device's own exception where there is one."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}".strip().splitlines()
        return text[0][:300]
    lines = [x for x in str(e).splitlines() if x.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]
