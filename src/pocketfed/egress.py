"""What may leave a device: the kinds of message in the egress ledger, in one place.

The device's ledger (`pocketfed.device.ledger`) lets a message out only if its kind is in
`ALLOWED_KINDS`, and records it in `<home>/LEDGER_FILE` first; the on-device runtime's privacy
lock (`pocketfed.runtime.privacy_lock`) reads that file back and warns about any other kind.
Both read this module, so the list the lock trusts is the list the ledger enforces.

A foundation module: it imports nothing from pocketfed, so the runtime, which ships without
training code, may import it.

Kinds that may leave (their payloads are checked by the ledger, not here):
    update          a model update: tensors exactly of the task's adapter schema
    metrics         scalar metrics from an allow-list, finite numbers
    secagg_keys     secure aggregation: two X25519 public keys
    secagg_shares   secure aggregation: one sealed Shamir-share pair per neighbour
    masked_update   secure aggregation: the update clipped, fixed-point and masked mod 2^k
    secagg_signature  secure aggregation: a signature over the round's survivor set (consistency)
    unmask_shares   secure aggregation: the shares the server may see
    eval_report     federated evaluation: four sums (loss, tokens, top-1 and top-3 hits) over the
                    device's test split, checked by `pocketfed.protocol.fedeval.check` (in the clear)
    masked_eval_report  federated evaluation under secure aggregation: those sums / T, fixed-point
                    and masked mod 2^k (4 words)
    registration    the device's name and Ed25519 public key, and its one-time enrollment token
                    (the ledger keeps the token's sha256, never the token)
    checkin         the eligibility fields (charging, idle, unmetered, free memory, profile name) of a check-in
Recorded but never sent: "refusal" (a request the ledger refused, with its reason). Never
allowed whatever asks: "personal_adapter" (a device's private personal adapter).
"""

from __future__ import annotations

from collections.abc import Iterable

LEDGER_FILE = "ledger.jsonl"

UPDATE, METRICS = "update", "metrics"
SECAGG_KEYS, SECAGG_SHARES = "secagg_keys", "secagg_shares"
MASKED_UPDATE, UNMASK_SHARES = "masked_update", "unmask_shares"
SECAGG_SIGNATURE = "secagg_signature"
EVAL_REPORT, MASKED_EVAL_REPORT = "eval_report", "masked_eval_report"
SECAGG_KINDS = (SECAGG_KEYS, SECAGG_SHARES, MASKED_UPDATE, SECAGG_SIGNATURE, UNMASK_SHARES, MASKED_EVAL_REPORT)
REGISTRATION, CHECKIN = "registration", "checkin"
ALLOWED_KINDS = (UPDATE, METRICS, EVAL_REPORT, *SECAGG_KINDS, REGISTRATION, CHECKIN)

REFUSAL = "refusal"  # a ledger line for a refused request: nothing was sent
PERSONAL_ADAPTER = "personal_adapter"  # never leaves, whoever asks

# What each allowed kind is, for a person reading the ledger; in the order a sentence lists them.
DESCRIPTIONS: dict[str, str] = {
    UPDATE: "model updates",
    MASKED_UPDATE: "model updates (masked)",
    SECAGG_KEYS: "key-agreement messages",
    SECAGG_SHARES: "key-agreement messages",
    SECAGG_SIGNATURE: "key-agreement messages",
    UNMASK_SHARES: "key-agreement messages",
    METRICS: "metrics",
    EVAL_REPORT: "evaluation reports",
    MASKED_EVAL_REPORT: "evaluation reports (masked)",
    REGISTRATION: "registration",
    CHECKIN: "check-ins",
}


def describe(kinds: Iterable[str]) -> list[str]:
    """The distinct descriptions of the allowed kinds among `kinds`, in `DESCRIPTIONS` order.

    describe(["metrics", "masked_update", "secagg_keys", "unmask_shares"])
        -> ["model updates (masked)", "key-agreement messages", "metrics"]
    Kinds outside `ALLOWED_KINDS` are left out: the caller reports them (`unexpected`).
    """
    present = set(kinds)
    return list(dict.fromkeys(text for kind, text in DESCRIPTIONS.items() if kind in present))


def unexpected(kinds: Iterable[str]) -> list[str]:
    """The kinds among `kinds` that may not leave a device (sorted): a ledger showing one is a warning."""
    return sorted(set(kinds) - set(ALLOWED_KINDS))
