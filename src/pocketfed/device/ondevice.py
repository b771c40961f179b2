"""The on-device model: the installed release (+ the personal adapter) -> the runtime model in <home>/model.

    read     <home>/current -> releases/<version>/ (signed manifest, adapter, task.json), and the
             personal adapter when it was trained on that release
    stage    a run folder as `pocketfed simulate --out` writes one (config.yaml, adapter/ as a PEFT
             folder, summary.json with the signed epsilon), in a temp folder inside the home
    export   onnx-int4 (by default) with the operator's export code (`pocketfed.release`: merge,
             onnx_build, int4_lora, manifest), its steps each in their own process (memory, below);
             other formats through `pocketfed.release.export.export`
    record   model/pocketfed.json: release version, the signed manifest's sha256, the sha256 of
             every file, the personal adapter (date, gain, sha256), format, host id
    swap     the finished folder replaces <home>/model in one rename (`export._replace`)

`python -m pocketfed.device.ondevice --home H` runs it in its own process (the device agent does,
so the conversion's peak memory is that process's, not added to the training process's) and prints
one JSON line: {"model": folder, "format", "release", "personal", "peak_rss_mb" (the largest of its
processes'), "peaks_mb" (each process's)}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pocketfed.errors import UserError
from pocketfed.runtime import home as device_home

DEFAULT_FORMAT = "onnx-int4"


def personal_for(home: Path, version: int) -> tuple[Path, dict[str, Any]] | None:
    """The personal adapter folder and its record, when it was trained on release `version`."""
    record = device_home.personal_record(home)
    folder = home / device_home.PERSONAL_DIR
    if record is None or record.get("release") != version or not (folder / "adapter_model.safetensors").is_file():
        return None
    return folder, record


def _stage_run(home: Path, work: Path) -> tuple[dict[str, Any], int, tuple[Path, dict[str, Any]] | None]:
    """The installed release as a run folder in work/run; -> (signed manifest, version, personal)."""
    import yaml  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    from pocketfed.config import LoraConfig, RunConfig, to_dict  # noqa: PLC0415
    from pocketfed.device.personal import write_adapter_folder  # noqa: PLC0415

    found = device_home.read_release(home)
    if found is None:
        raise UserError(f"device home {str(home)!r} has no installed release; run `pocketfed release pull --home {home}`")
    manifest, _, folder = found
    task = device_home.read_json(folder / device_home.TASK) or {}
    if "model" not in task or "lora" not in task:
        raise UserError(f"{str(folder / device_home.TASK)!r} lacks the task's model and lora settings; "
                        f"run `pocketfed release pull --home {home}` to install the release again")
    version = int(manifest["version"])
    run = work / "run"
    cfg = RunConfig()
    cfg.model.name = task["model"]
    cfg.lora = LoraConfig(**task["lora"])
    write_adapter_folder(run / "adapter", load_file(folder / device_home.ADAPTER), cfg.lora)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    summary: dict[str, Any] = {"release": version}
    if manifest.get("epsilon") is not None:
        summary["privacy"] = {"epsilon": manifest["epsilon"], "delta": manifest.get("delta") or 0.0}
    (run / "summary.json").write_text(json.dumps(summary))
    return manifest, version, personal_for(home, version)


# ---- onnx-int4 in three processes, one after the other --------------------------------------------
# In one process the int4 export of smollm2-135m peaked at 2,327 MB (the base loaded for the merge
# step, then the onnxruntime-genai builder loading it again and holding the graph's weights), over
# the phone profile's 1,536 MB. Split into three processes, each exits before the next starts:
#   stage    load the base, write it as an HF folder, read the adapters' LoRA factors -> files
#   builder  the builder on that folder, told to load it in float16 (its linears and embedding are
#            replaced by the rewrite, from the fp32 weights; its norms are rounded to float16)
#   rewrite  release.int4_lora.rewrite from the fp32 HF weights and the factors, then manifest.json
# The figures, measured, are in docs/BENCHMARKS.md.
def _int4_stage(work: Path, personal: Path | None) -> None:
    from pocketfed.release.merge import load_base_for, lora_factors, read_run  # noqa: PLC0415

    run = read_run(work / "run", personal)
    base = load_base_for(run)
    hf = work / "hf"
    base.model.save_pretrained(hf, safe_serialization=True)
    base.tokenizer.save_pretrained(hf)
    factors = lora_factors(base.model, run.applied)
    import numpy as np  # noqa: PLC0415

    np.savez(work / "factors.npz", **{f"a{i}": f.a for i, f in enumerate(factors)},
             **{f"b{i}": f.b for i, f in enumerate(factors)})
    (work / "factors.json").write_text(json.dumps({"model_id": base.model_id, "factors": [
        {"role": f.role, "module": f.module, "scale": f.scale} for f in factors]}))


def _int4_builder(work: Path) -> None:
    from pocketfed.release.formats import Format  # noqa: PLC0415
    from pocketfed.release.onnx_build import build_onnx  # noqa: PLC0415

    config = json.loads((work / "hf" / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "float16"  # half the builder's copy of the base (see above)
    (work / "hf" / "config.json").write_text(json.dumps(config))
    (work / "onnx").mkdir()
    options = build_onnx(work / "hf", work / "onnx", Format.onnx_int4, cache_dir=work / "cache")
    (work / "options.json").write_text(json.dumps(options))


def _int4_rewrite(work: Path, personal: Path | None) -> None:
    import numpy as np  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    from pocketfed.release.formats import Format  # noqa: PLC0415
    from pocketfed.release.int4_lora import SCHEME, LoraFactor, rewrite  # noqa: PLC0415
    from pocketfed.release.manifest import build_manifest, write_manifest  # noqa: PLC0415
    from pocketfed.release.merge import read_run  # noqa: PLC0415

    meta = json.loads((work / "factors.json").read_text())
    arrays = np.load(work / "factors.npz")
    factors = [LoraFactor(role=f["role"], module=f["module"], a=arrays[f"a{i}"], b=arrays[f"b{i}"], scale=f["scale"])
               for i, f in enumerate(meta["factors"])]
    weights = {k: v.astype(np.float32, copy=False) for k, v in load_file(work / "hf" / "model.safetensors").items()}
    out = work / "onnx"
    branch = rewrite(out, weights, factors)
    del weights
    options = json.loads((work / "options.json").read_text())
    quantization = {"bits": 4, "scheme": SCHEME, **branch} | options
    run = read_run(work / "run", personal)
    write_manifest(out, build_manifest(run, meta["model_id"], Format.onnx_int4, quantization, out))


_STEPS = {"stage": _int4_stage, "builder": lambda work, personal: _int4_builder(work), "rewrite": _int4_rewrite}


def _child(step: str, work: Path, personal: Path | None) -> float:
    """Run one step in a child process; -> its peak RSS (MB)."""
    import subprocess  # noqa: PLC0415

    args = [sys.executable, "-m", "pocketfed.device.ondevice", "--step", step, "--work", str(work)]
    if personal is not None:
        args += ["--personal", str(personal)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"building the on-device model failed at its {step} step: {last.removeprefix('error: ')}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def build_model(home: str | Path, fmt: str = DEFAULT_FORMAT, processes: bool = True) -> tuple[Path, dict[str, float]]:
    """Build <home>/model from the current release and the personal adapter (module docstring);
    -> (the folder, peak RSS in MB of each child process: onnx-int4 runs its three steps in their
    own; `processes=False` runs them in this one, for tests on `tiny`)."""
    from pocketfed import signing  # noqa: PLC0415
    from pocketfed.release.export import _replace  # noqa: PLC0415
    from pocketfed.runtime.privacy_lock import host_id  # noqa: PLC0415

    home = Path(home).expanduser()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=home))
    peaks: dict[str, float] = {}
    try:
        manifest, version, personal = _stage_run(home, work)
        personal_dir = personal[0] if personal else None
        if fmt == DEFAULT_FORMAT:
            for step in ("stage", "builder", "rewrite"):
                if processes:
                    peaks[step] = _child(step, work, personal_dir)
                else:
                    _STEPS[step](work, personal_dir)
            out = work / "onnx"
        else:
            from pocketfed.release.export import export  # noqa: PLC0415

            out = export(work / "run", fmt, work / "model", personal=personal_dir)
        files = {str(p.relative_to(out)): device_home.sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
        record = {
            "release": version,
            "manifest_sha256": signing.sha256_hex(signing.canonical_json(manifest)),
            "adapter_sha256": manifest["sha256"],
            "format": fmt,
            "files": files,
            "personal": ({k: personal[1].get(k) for k in ("date", "gain", "sha256", "release")} if personal else None),
            "made_on": host_id(),
            "built_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (out / device_home.MODEL_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        target = home / device_home.MODEL_DIR
        _replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target, peaks


def main(argv: list[str] | None = None) -> int:
    from pocketfed.memory import peak_rss_mb  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m pocketfed.device.ondevice", description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path)
    parser.add_argument("--format", default=DEFAULT_FORMAT)
    parser.add_argument("--step", choices=("stage", "builder", "rewrite"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--personal", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.step is not None:
            _STEPS[args.step](args.work, args.personal)
            print(json.dumps({"step": args.step, "peak_rss_mb": round(peak_rss_mb(), 1)}))
            return 0
        if args.home is None:
            parser.error("--home is required")
        folder, peaks = build_model(args.home, args.format)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = device_home.read_json(folder / device_home.MODEL_RECORD) or {}
    peaks["orchestrator"] = round(peak_rss_mb(), 1)
    print(json.dumps({"model": str(folder), "format": record.get("format"), "release": record.get("release"),
                      "personal": record.get("personal"), "peak_rss_mb": max(peaks.values()), "peaks_mb": peaks}))
    return 0


# ---- what the device agent calls after installing a release ---------------------------------------
PERSONAL_MAX_STEPS = 32  # local steps at most; early stopping usually ends sooner
PERSONAL_EVAL_EVERY = 4
PERSONAL_PATIENCE = 2


def personalize_home(home: Path, model: Any, rows: Any, force: bool = False) -> dict[str, Any]:
    """Train the personal adapter for the installed release on `rows` (this device's train split)
    with `model` (the session's DeviceModel), keep it only if it beats the global adapter on the
    local validation split; -> what happened, for the device's event. Once per release unless
    `force`. Imports torch."""
    from safetensors.torch import load_file  # noqa: PLC0415

    from pocketfed.config import LoraConfig, TrainConfig  # noqa: PLC0415
    from pocketfed.device import personal  # noqa: PLC0415
    from pocketfed.model import rank  # noqa: PLC0415

    found = device_home.read_release(home)
    if found is None:
        return {"personalized": False, "reason": "no installed release"}
    manifest, _, folder = found
    version = int(manifest["version"])
    task = device_home.read_json(folder / device_home.TASK) or {}
    record = device_home.personal_record(home)
    if record is not None and record.get("release") == version and not force:
        return {"personalized": True, "release": version, "gain": record.get("gain"), "reason": "already trained"}
    global_state = load_file(folder / device_home.ADAPTER)
    shapes = {k: tuple(p.shape) for k, p in model.params.items()}
    # A device whose plan trains at a lower rank r (HetLoRA) personalizes the release's first r slots,
    # and is compared with them: the model it can run. Its scaling alpha_r / r equals the global
    # alpha / R (agent: rank.alpha_for_rank), so the kept adapter, zero-padded to R, is the same model
    # at the release's rank and alpha.
    release_rank, own_rank = rank.rank_of(global_state), rank.rank_of(model.get_state())
    start = rank.truncate(global_state, own_rank) if own_rank < release_rank else global_state
    if "lora" not in task or "train" not in task or {k: tuple(v.shape) for k, v in start.items()} != shapes:
        return {"personalized": False, "release": version,
                "reason": "this device's adapter has other modules or layers than the release's"}
    try:
        result = personal.personalize(model, start, rows, TrainConfig(**task["train"]), seed=version,
                                      max_steps=PERSONAL_MAX_STEPS, eval_every=PERSONAL_EVAL_EVERY,
                                      patience=PERSONAL_PATIENCE)
    except ValueError as e:  # too little text for a validation split
        return {"personalized": False, "release": version, "reason": str(e)}
    info = {"release": version, "val_loss_global": round(result.val_loss_global, 4),
            "val_loss_personal": round(result.val_loss_personal, 4), "gain": round(result.gain, 4), "steps": result.steps}
    if result.state is None:
        # a personal adapter of an older release would now be built on a global one it was not trained from
        old = home / device_home.PERSONAL_DIR
        if old.exists():
            shutil.rmtree(old)
        return {"personalized": False, **info, "reason": "it did not beat the global model on the validation split"}
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if own_rank < release_rank:
        info["rank"] = own_rank
    personal.write_personal(home, rank.pad(result.state, release_rank), LoraConfig(**task["lora"]), {"date": date, **info})
    return {"personalized": True, **info}


def convert(home: Path, fmt: str = DEFAULT_FORMAT) -> dict[str, Any]:
    """Build <home>/model in a child process (its own peak memory, measured there); -> its JSON line."""
    import subprocess  # noqa: PLC0415

    proc = subprocess.run([sys.executable, "-m", "pocketfed.device.ondevice", "--home", str(home), "--format", fmt],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"building the on-device model in {str(home / device_home.MODEL_DIR)!r} failed: "
                        f"{last.removeprefix('error: ')}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def model_is_current(home: Path) -> bool:
    """Whether <home>/model was built from the installed release and the personal adapter now kept."""
    record = device_home.read_json(home / device_home.MODEL_DIR / device_home.MODEL_RECORD)
    version = device_home.current_release(home)
    if record is None or version is None or str(record.get("release")) != version:
        return False
    personal = personal_for(home, int(version))
    built = record.get("personal") or {}
    return (personal[1].get("sha256") if personal else None) == built.get("sha256")


if __name__ == "__main__":
    sys.exit(main())
