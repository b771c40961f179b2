"""Shared fixtures and helpers: the `tiny` model, a small config for fast runs, and waits that
fail on a stall rather than on the clock."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import pytest

from pocketfed.config import RunConfig, load_config

# A wait fails when nothing it watches has moved for STALL_S: a stuck flow, not a slow machine.
# CAP_S is the last resort for a flow that keeps moving without ever getting there. A CI box
# shared with other jobs (load average 3-8 on 2 cores) slows every step several-fold; neither
# limit should be reached by a healthy run however loaded the machine is.
STALL_S = 300.0
CAP_S = 900.0
POLL_S = 0.05


def wait_for(what: str, cond: Callable[[], bool], progress: Callable[[], Hashable],
             stall_s: float = STALL_S, cap_s: float = CAP_S) -> None:
    """Poll `cond` until it is true.

    `progress()` returns a snapshot of how far the flow has got (round indices, update rows, log
    sizes...); any change resets the stall clock. AssertionError when the snapshot has not changed
    for `stall_s` seconds, or after `cap_s` seconds in all.
    """
    start = last_change = time.monotonic()
    seen = progress()
    while not cond():
        now = time.monotonic()
        snapshot = progress()
        if snapshot != seen:
            seen, last_change = snapshot, now
        if now - last_change > stall_s:
            raise AssertionError(f"waiting for {what}: nothing moved for {stall_s:.0f} s (last state: {seen!r})")
        if now - start > cap_s:
            raise AssertionError(f"waiting for {what}: not there after {cap_s:.0f} s although the flow kept moving")
        time.sleep(POLL_S)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process and its waited-for children have used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def sizes(paths: Sequence[Path]) -> tuple[int, ...]:
    """File sizes (0 for a missing file): a growing log is a flow that is moving."""
    return tuple(p.stat().st_size if p.exists() else 0 for p in paths)


def run_cli(args: Sequence[str], *, cwd: str | Path | None = None, env: dict[str, str] | None = None,
            stall_s: float = 120.0, cap_s: float = CAP_S) -> subprocess.CompletedProcess:
    """subprocess.run for a command that should finish by itself: it is killed only when its CPU time
    has not moved for `stall_s` (stuck: waiting on input or a lock), or after `cap_s`."""
    args = [str(a) for a in args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files: a pipe could fill
        p = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=err, text=True)

        def cpu() -> float:
            try:
                return cpu_seconds(p.pid)
            except (OSError, IndexError):  # it exited between poll() and the read
                return -1.0

        try:
            wait_for(f"`{' '.join(args)}` to exit", lambda: p.poll() is not None, cpu, stall_s, cap_s)
        except AssertionError as e:
            p.kill()
            p.wait()
            err.seek(0)
            raise AssertionError(f"{e}; its stderr ends:\n{err.read()[-2000:]}") from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, p.returncode, out.read(), err.read())


def tiny_config(**sections) -> RunConfig:
    """configs/tiny.yaml's shape, in code, with per-test overrides: tiny_config(sim={"rounds": 3})."""
    base = {
        "model": {"name": "tiny"},
        "data": {"seq_len": 32, "min_train_tokens": 512, "max_eval_tokens": 128},
        "train": {"steps": 2, "batch_size": 4, "lr": 5e-3},
        "sim": {"devices": 4, "rounds": 2, "heldout": 2, "seed": 0},
        "eval": {"personalize_steps": 1, "centralized_steps": 2},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return load_config(None, base)


@pytest.fixture
def tiny_base():
    """A fresh `tiny` base model per test (PEFT wraps models in place; ~0.3 s to load)."""
    from pocketfed.model.zoo import load_base

    return load_base("tiny")
