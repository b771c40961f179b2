"""Checkpoints: the server state after a round, in one safetensors file written atomically.

Tensors are stored as `params/<key>`, `m/<key>`, `v/<key>`; the round number and anything else
JSON-serializable (e.g. the privacy accountant's state) ride in the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from safetensors import safe_open

from pocketfed.files import write_atomic
from pocketfed.server.strategies import ServerState


def save(path: Path, state: ServerState, extra: dict[str, Any]) -> None:
    tensors = {f"params/{k}": v.contiguous() for k, v in state.params.items()}
    for name, part in (("m", state.m), ("v", state.v)):
        if part is not None:
            tensors.update({f"{name}/{k}": v.contiguous() for k, v in part.items()})
    meta = {"round": str(state.round), "extra": json.dumps(extra)}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))  # the old checkpoint or the new one


def load(path: Path) -> tuple[ServerState, dict[str, Any]]:
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    parts: dict[str, dict] = {"params": {}, "m": {}, "v": {}}
    for k, v in tensors.items():
        head, key = k.split("/", 1)
        parts[head][key] = v
    state = ServerState(parts["params"], parts["m"] or None, parts["v"] or None, int(meta["round"]))
    return state, json.loads(meta["extra"])
