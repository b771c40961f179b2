"""The Ray backend: virtual devices run on a pool of Ray actors, locally or on a cluster.

The seam is the in-process backend's (`run(tasks) -> results` in task order, `close()`); only
where the device code runs changes. Each worker runs exactly `pocketfed.device.task.run_task`.

Memory: the frozen base model is `ray.put` once, as a list of numpy arrays. Ray reads numpy arrays
out of its shared-memory object store without copying, so every worker wraps the same physical
pages in read-only tensors (`torch.from_numpy`) and builds its model around them on the meta
device: N workers hold one copy of the base weights, plus each its own LoRA adapter, optimizer
state and activations. A worker is otherwise as lean as a device process: where the lean Llama
supports the model (`pocketfed.device.leanmodel`; SmolLM2, `tiny`) it trains that, so it never
imports transformers, PEFT or what they pull in (scipy, ...), about 130 MB of private memory a
worker, and its loss keeps one [N, V] log-softmax instead of transformers' logits, shifted copy
and log-softmax; other models fall back to transformers + PEFT. The updates are the in-process
backend's to float32 rounding (the two models agree to ~1e-8, tests/unit/device/test_task.py).
Workers allocate with jemalloc where the machine has it (`worker_env`): glibc's heap keeps nearly
as much again as a step's live activations in holes; and between devices a worker hands its free
pages back (`release_free_memory`), so a waiting worker holds only its live memory.
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

import ctypes
import ctypes.util
import dataclasses
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pocketfed.config import LoraConfig
from pocketfed.data.federated import Blocks, FederatedDataset
from pocketfed.device import leanmodel
from pocketfed.device.leanmodel import LeanConfig
from pocketfed.device.planner import Backend, backend_for
from pocketfed.device.task import DeviceModel, run_task, wrap_peft
from pocketfed.errors import UserError
from pocketfed.protocol.messages import Dropout, TrainResult, TrainTask

MB = 1 << 20
WATCHDOG_SECONDS = 0.05
MEMORY_EXIT_CODE = 77


def worker_env() -> dict[str, str]:
    """Environment variables for the workers' processes: jemalloc (J. Evans, "A Scalable Concurrent
    malloc(3) Implementation for FreeBSD", BSDCan 2006) where the machine has it (Debian:
    libjemalloc2). A training step frees and reallocates hundreds of activation blocks of every
    size; glibc's malloc serves the ~0.6 MB ones from its heap, between small long-lived blocks, so a
    worker's resident memory grows to nearly twice its live peak (holes it cannot hand back).
    jemalloc's size classes reuse them, at the same speed. Under glibc, making it mmap those blocks
    instead costs a third of a step's speed (page faults), so glibc is left as it is."""
    jemalloc = ctypes.util.find_library("jemalloc")
    return {"LD_PRELOAD": jemalloc} if jemalloc else {}


# ---- the base model, shared -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SharedWeights:
    """A base model as plain data for the object store: each distinct tensor once, as numpy.

    arrays[i] is one tensor; names[i] every module path it is registered under (tied weights,
    e.g. embed_tokens and lm_head, share one array). Buffers (rotary inv_freq) travel alike."""

    config: dict[str, Any]  # the transformers config as a dict (no transformers import to unpickle it)
    arrays: list[np.ndarray]
    param_names: list[list[str]]
    buffer_names: list[list[str]]  # aligned with arrays after the parameters
    lean: LeanConfig | None = None  # set when the lean Llama can train this model (float32 weights)


def share_base(model: torch.nn.Module, folder: Path | None = None) -> SharedWeights:
    """The frozen base weights of `model` (a plain or PEFT-wrapped causal LM), deduplicated.

    PEFT wraps target layers in place ("q_proj" -> "q_proj.base_layer"); the original names are
    restored and the LoRA tensors left out, so a worker builds the plain model and attaches LoRA
    itself. `folder`, the model's folder, lets workers train the lean Llama if it supports it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model

    def groups(named) -> tuple[list[np.ndarray], list[list[str]]]:
        by_ptr: dict[int, int] = {}
        arrays: list[np.ndarray] = []
        names: list[list[str]] = []
        for name, t in named:
            if "lora_" in name:
                continue
            name = name.replace(".base_layer", "")
            key = t.data_ptr()
            if key not in by_ptr:
                by_ptr[key] = len(arrays)
                arrays.append(t.detach().cpu().numpy())
                names.append([])
            names[by_ptr[key]].append(name)
        return arrays, names

    p_arrays, p_names = groups(inner.named_parameters(remove_duplicate=False))
    b_arrays, b_names = groups(inner.named_buffers(remove_duplicate=False))
    lean = None
    if folder is not None and backend_for(folder) is Backend.lean and all(a.dtype == np.float32 for a in p_arrays):
        lean = LeanConfig.from_folder(folder)
    return SharedWeights(inner.config.to_dict(), p_arrays + b_arrays, p_names, b_names, lean)


def _views(shared: SharedWeights) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": frozen weights are never written
        return [torch.from_numpy(a) for a in shared.arrays]


def build_lean(shared: SharedWeights) -> leanmodel.LeanLlama:
    """The lean Llama (torch only) whose frozen weights are views of `shared`'s arrays (no copy); eval mode.

    Its parameter names are transformers' (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`);
    tied weights stay one tensor. The rotary buffers are not needed: the lean model computes them."""
    assert shared.lean is not None
    with torch.device("meta"):
        model = leanmodel.LeanLlama(shared.lean)
    for t, names in zip(_views(shared), shared.param_names):
        value = torch.nn.Parameter(t, requires_grad=False)
        for name in names:
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent)._parameters[leaf] = value  # type: ignore[assignment]
    still_meta = [n for n, t in model.named_parameters() if t.is_meta]
    if still_meta:
        raise RuntimeError(f"shared base model lacks tensors: {still_meta[:3]}")
    return model.eval().requires_grad_(False)


def build_base(shared: SharedWeights) -> torch.nn.Module:
    """A frozen eval-mode transformers model whose weights are views of `shared`'s arrays (no copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(shared.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                                 dtype=torch.float32)
    tensors = _views(shared)
    n_params = len(shared.param_names)
    for i, names in enumerate(shared.param_names + shared.buffer_names):
        value: torch.Tensor = torch.nn.Parameter(tensors[i], requires_grad=False) if i < n_params else tensors[i]
        for name in names:
            parent, _, leaf = name.rpartition(".")
            module = model.get_submodule(parent)
            if i < n_params:
                module._parameters[leaf] = value  # type: ignore[assignment]
            else:
                module._buffers[leaf] = value
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"shared base model lacks tensors: {still_meta[:3]}")
    model.eval()
    return model


def device_model(shared: SharedWeights, lora_cfg: LoraConfig, seed: int) -> DeviceModel:
    """A worker's model: LoRA (A drawn under `seed`, as `lora.attach` draws it) on the shared base,
    in the lean Llama where `shared.lean` says it fits, else in transformers + PEFT."""
    if shared.lean is None:
        from pocketfed.model import lora

        return wrap_peft(lora.attach(build_base(shared), lora_cfg, seed=seed))
    model = build_lean(shared)
    leanmodel.attach_lora(model, lora_cfg.rank, lora_cfg.alpha, lora_cfg.target_modules, seed, lora_cfg.dropout,
                          lora_cfg.layers)
    params = {leanmodel.PEFT_PREFIX + n: p for n, p in model.named_parameters() if p.requires_grad}
    return DeviceModel(model, Backend.lean, params, model.loss)


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


def release_free_memory() -> None:
    """Hand the pages malloc holds free back to the OS, so a worker waiting for its next device holds
    its live memory only, not its last round's peak: jemalloc's purge of every arena where it is the
    allocator, else glibc's malloc_trim (elsewhere nothing)."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallctl"):  # jemalloc (preloaded): 4096 = MALLCTL_ARENAS_ALL
        libc.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
    elif hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


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
                "allocator": "jemalloc" if hasattr(ctypes.CDLL(None), "mallctl") else "libc",
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
    def __init__(self, cfg, base, dataset: FederatedDataset, on_done: Callable[[str], None] | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray: pip install 'pocketfed[ray]'") from None
        self.ray = ray
        self.dataset = dataset
        self.on_done = on_done
        model_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())
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
        self._weights = ray.put(share_base(base.model, base.path))  # the one copy of the base model
        adopt_shared(base.model, ray.get(self._weights))  # the driver reads it from the store too
        self._actor_cls = ray.remote(DeviceWorker).options(
            num_cpus=cpus, memory=memory, max_restarts=0, max_concurrency=1, runtime_env={"env_vars": worker_env()})
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
