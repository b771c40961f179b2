"""A deployment's latest committed model as export input (`pocketfed export --server-db state/`).

The coordinator keeps its run config and model id in the store's meta table and each committed
version's global adapter as a content-addressed blob (`pocketfed.server.store`): the adapter is
PEFT's own state dict (`pocketfed.model.lora.get_state`), so its safetensors bytes are already an
`adapter_model.safetensors`; with an `adapter_config.json` built from the run's LoRA settings it is
the same adapter folder `pocketfed simulate` writes, and the export goes on exactly as for a run.

Only reads: the coordinator may keep running (SQLite in WAL mode lets a reader see the last commit).
"""

from __future__ import annotations

import json
from pathlib import Path

from pocketfed.config import load_config
from pocketfed.errors import UserError
from pocketfed.release.merge import AdapterRef, RunInputs
from pocketfed.server.store import DB_FILE, Store, Version, sha256_hex


def latest_committed(db: Path) -> tuple[Store, Version]:
    """The store of a coordinator state folder and its latest committed version, or one sentence
    saying why there is none."""
    db = Path(db).expanduser()
    if not db.is_dir():
        raise UserError(f"--server-db {str(db)!r} does not exist; give the --db folder of `pocketfed server`")
    if not (db / DB_FILE).is_file():
        raise UserError(f"--server-db {str(db)!r} is not a coordinator state folder (it has no {DB_FILE}); "
                        "give the --db folder of `pocketfed server`")
    store = Store(db)
    latest = store.latest_version()
    if latest is None or store.get_meta("config") is None or store.get_meta("model_id") is None:
        store.close()
        raise UserError(f"--server-db {str(db)!r} holds no started run; start `pocketfed server --db {db}` first")
    if latest.rounds_applied == 0:
        store.close()
        raise UserError(f"--server-db {str(db)!r} has no committed round yet (version 0 is the untrained adapter); "
                        "export once `pocketfed status` shows a committed round")
    return store, latest


def read_deployment(db: str | Path, adapter_dir: Path) -> tuple[RunInputs, Version]:
    """Check the state folder, write its latest committed adapter as a PEFT folder in `adapter_dir`
    (a scratch folder the caller removes) and return the export inputs with that version."""
    from safetensors import safe_open  # noqa: PLC0415

    from pocketfed.model.depth import layers_of  # noqa: PLC0415
    from pocketfed.model.lora import peft_config  # noqa: PLC0415 (PEFT, torch)
    from pocketfed.privacy.budget import PrivacyRun  # noqa: PLC0415

    store, latest = latest_committed(Path(db))
    try:
        cfg = load_config(None, json.loads(store.get_meta("config") or "{}"))
        model_id = store.get_meta("model_id") or ""
        blob = store.get_blob(latest.adapter_sha)
        raw_privacy = store.get_meta("privacy")
    finally:
        store.close()
    if sha256_hex(blob) != latest.adapter_sha:
        raise UserError(f"the adapter of version {latest.version} in {str(db)!r} does not match its sha256 "
                        f"(blobs/{latest.adapter_sha[:2]}/{latest.adapter_sha}); the state folder is damaged")
    adapter_dir.mkdir(parents=True, exist_ok=True)
    (adapter_dir / "adapter_model.safetensors").write_bytes(blob)
    lora_cfg = peft_config(cfg.lora, layers_of(safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt").keys()))
    lora_cfg.base_model_name_or_path = model_id  # export refuses an adapter made for another base
    lora_cfg.save_pretrained(str(adapter_dir))
    privacy = None
    if raw_privacy:
        eps = PrivacyRun.from_json(json.loads(raw_privacy)).epsilons()
        if eps.get("epsilon_recipients") is not None:  # the model's recipients' epsilon, as `simulate` reports it
            privacy = {"epsilon": float(eps["epsilon_recipients"]), "delta": float(eps.get("delta") or 0.0)}
    adapters = (AdapterRef("global", adapter_dir, latest.adapter_sha),)  # the blob is the weights file: same sha256
    return RunInputs(run_dir=Path(db), config=cfg, adapters=adapters, privacy=privacy), latest
