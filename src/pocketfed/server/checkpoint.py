"""Checkpoints: the server state after a round, in one safetensors file written atomically.

Tensors are stored as `params/<key>`, `m/<key>`, `v/<key>`; the round number and anything else
JSON-serializable (e.g. the privacy accountant's state) ride in the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

from pocketfed.files import write_atomic
from pocketfed.server.strategies import ServerState


def _tensors(state: ServerState) -> dict[str, torch.Tensor]:
    tensors = {f"params/{k}": v.contiguous() for k, v in state.params.items()}
    for name, part in (("m", state.m), ("v", state.v)):
        if part is not None:
            tensors.update({f"{name}/{k}": v.contiguous() for k, v in part.items()})
    return tensors


def _state(tensors: dict[str, torch.Tensor], rounds: int) -> ServerState:
    parts: dict[str, dict] = {"params": {}, "m": {}, "v": {}}
    for k, v in tensors.items():
        head, key = k.split("/", 1)
        parts[head][key] = v
    return ServerState(parts["params"], parts["m"] or None, parts["v"] or None, rounds)


def save(path: Path, state: ServerState, extra: dict[str, Any]) -> None:
    meta = {"round": str(state.round), "extra": json.dumps(extra)}
    write_atomic(path, lambda tmp: save_file(_tensors(state), tmp, metadata=meta))  # the old checkpoint or the new one


def load(path: Path) -> tuple[ServerState, dict[str, Any]]:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    return _state(load_file(path), int(meta["round"])), json.loads(meta["extra"])


def state_to_bytes(state: ServerState) -> bytes:
    """The server state as one safetensors blob (the coordinator's store keeps it per version)."""
    return st_save(_tensors(state), metadata={"round": str(state.round)})


def state_from_bytes(data: bytes, rounds_applied: int) -> ServerState:
    return _state(st_load(data), rounds_applied)


def adapter_to_bytes(params: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.contiguous() for k, v in params.items()})
