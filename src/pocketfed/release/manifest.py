"""manifest.json: what an exported model folder holds and where it came from.

Written last into the export folder; the runtime reads it (as plain JSON, with no pocketfed import).

    {
      "schema": 1,
      "format": "onnx-int4",                       # Format value
      "runtime": "onnxruntime-genai" | "llama.cpp",
      "model_file": "model.onnx" | "model.gguf",
      "base_model": "smollm2-135m",               # model id the adapters were trained on
      "adapters": [{"role": "global", "sha256": "..."}, {"role": "personal", "sha256": "..."}],
      "quantization": {"bits": 4, "block_size": 32, ...},
      "files": {"model.onnx": 12345, ...},         # bytes
      "total_bytes": 123456,
      "privacy": {"epsilon": 3.1, "delta": 1e-5} | null,
      "personalized": true,
      "made_on": "<sha256 of the host id>"[:16],   # lets the privacy lock say "made on this device"
      "created_at": "2026-01-01T00:00:00Z",
      "pocketfed_version": "0.1.0"
    }
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from pocketfed.release.formats import Format
from pocketfed.release.merge import RunInputs
from pocketfed.runtime.privacy_lock import host_id

SCHEMA = 1


def file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def build_manifest(
    run: RunInputs, base_model: str, fmt: Format, quantization: dict[str, Any], folder: Path
) -> dict[str, Any]:
    from pocketfed import __version__ as version  # noqa: PLC0415

    files = file_sizes(folder)
    return {
        "schema": SCHEMA,
        "format": fmt.value,
        "runtime": "onnxruntime-genai" if fmt.family == "onnx" else "llama.cpp",
        "model_file": "model.onnx" if fmt.family == "onnx" else "model.gguf",
        "base_model": base_model,
        "adapters": [{"role": a.role, "sha256": a.sha256} for a in run.adapters],
        "quantization": quantization,
        "files": files,
        "total_bytes": sum(files.values()),
        "privacy": run.privacy,
        "personalized": any(a.role == "personal" for a in run.adapters),
        "made_on": host_id(),
        "created_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "pocketfed_version": version,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
