"""What a device checks so that one bad round does not end it: a release must be finite before it is
installed, and a round whose training went non-finite is skipped, not sent.

A coordinator that aggregated a poisoned update (values near float32's maximum, an inflated token
count) can release an adapter holding Inf; training from it gives a NaN loss and a NaN update,
and the ledger refuses to send a non-finite metric. Before these checks the device process
exited there with a traceback, in every later round, so one malicious device stopped every
honest one for good (the hostile-input audit of issue 16, finding 1). Now the device refuses
the release (`release_problem`, raised as `signing.ReleaseRejected` so it is never installed)
or skips the round (`round_problem`: nothing is sent, the ledger says why), and checks in again:
a later, finite release trains as usual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load

from pocketfed.protocol.messages import TrainResult


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an Inf, sorted."""
    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def release_problem(adapter: Mapping[str, torch.Tensor], version: int) -> str | None:
    """Why this release's adapter must not be installed or trained from (None: it may)."""
    bad = nonfinite(adapter)
    if bad:
        return (f"release version {version} holds NaN or Inf in {len(bad)} of its {len(adapter)} tensors "
                f"(first: {bad[0]!r}); it is not installed and this device waits for a finite one")
    return None


def round_problem(result: TrainResult) -> str | None:
    """Why this round's result must not be sent (None: it may): a non-finite training loss, or a
    NaN / Inf anywhere in what would leave the device (the encoded update or the vector that
    secure aggregation would mask)."""
    loss = result.metrics.get("train_loss")
    if loss is not None and not math.isfinite(float(loss)):
        return f"the training loss is {loss} (not finite): the update is not sent"
    upload: Any = result.upload
    if upload is not None and upload.payload is not None:
        bad = nonfinite(st_load(upload.payload))
        if bad:
            return f"the encoded update holds NaN or Inf in {bad[0]!r}: it is not sent"
    if upload is not None and upload.vector is not None:
        vector = torch.as_tensor(upload.vector)
        if not bool(torch.isfinite(vector).all()):
            return "the update vector for secure aggregation holds NaN or Inf: it is not sent"
    return None
