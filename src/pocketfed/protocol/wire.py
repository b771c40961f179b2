"""Typed, versioned HTTP wire messages (pydantic), with limits on every field a peer controls.

Paths carry the version (`/v1/...`); a message carries `wire_version` where a device sends
state about itself. Tensors never travel as JSON: adapters and updates are safetensors bodies,
described here by name, shape and dtype.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pocketfed.config import Codec, DPMode

if TYPE_CHECKING:  # the pipeline imports torch; the light commands (`status`, `ledger`) read these messages
    from pocketfed.privacy.pipeline import PrivacyPlan

WIRE_VERSION = 1
PREFIX = "/v1"
CHUNK_MAX_BYTES = 4 * 2**20  # one upload request's body
JSON_MAX_BYTES = 64 * 1024  # any other request's body

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Hex128 = Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DeviceName = Annotated[str, Field(pattern=DEVICE_NAME.pattern)]
ENROLLMENT_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")  # `pocketfed enroll` prints 43 of these characters
EnrollmentToken = Annotated[str, Field(pattern=ENROLLMENT_TOKEN.pattern)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
MetricName = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(Strict):
    error: str  # a stable code, e.g. "replayed_request"
    detail: str  # one sentence saying what was wrong
    received: int | None = None  # for upload errors: the bytes the server holds


class RegisterRequest(Strict):
    name: DeviceName
    public_key: Hex64  # the device's Ed25519 public key, raw, hex
    enrollment_token: EnrollmentToken | None = None  # one-time; needed unless deploy.open_registration
    wire_version: Literal[1] = WIRE_VERSION


class RegisterResponse(Strict):
    device_id: str


PROFILE_LABEL = r"^[A-Za-z0-9_.-]*$"


def profile_label(name: str | None) -> str:
    """The profile name a check-in carries: the name when it is a plain label of at most 64
    characters, else "" (a user's profile named in free text stays on the device)."""
    return name if name and len(name) <= 64 and re.fullmatch(PROFILE_LABEL, name) else ""


class Eligibility(Strict):
    charging: bool
    idle: bool
    unmetered: bool
    free_memory_mb: int = Field(ge=0, le=10**7)
    # the memory profile the device trains under (watch, phone, car, a user's; "" for none): a device
    # class, not personal data; the operator's console shows it
    profile: str = Field("", max_length=64, pattern=PROFILE_LABEL)  # a name, not free text


class CheckinRequest(Strict):
    eligibility: Eligibility
    wire_version: Literal[1] = WIRE_VERSION


class TensorSpec(Strict):
    name: str = Field(max_length=512)
    shape: list[Annotated[int, Field(ge=0, le=2**31)]] = Field(max_length=8)
    dtype: Literal["float32"]


class LoraSpec(Strict):
    rank: int = Field(ge=1, le=4096)
    alpha: Finite
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: list[Annotated[str, Field(max_length=128)]] = Field(max_length=64)
    layers: int = Field(default=0, ge=0, le=4096)  # LoRA on the top `layers` decoder layers (0 = all)


class DataSpec(Strict):
    seq_len: int = Field(ge=8, le=2**16)
    test_fraction: float = Field(gt=0.0, lt=1.0)
    min_train_tokens: int = Field(ge=0)


class TrainSpec(Strict):
    steps: int = Field(ge=0, le=10**6)
    epochs: float = Field(ge=0.0, le=10**4)
    batch_size: int = Field(ge=1, le=4096)
    lr: Finite
    weight_decay: Finite
    max_grad_norm: Finite
    prox_mu: Finite
    micro_tokens: int = Field(default=0, ge=0, le=2**20)  # absent (an older coordinator): the whole batch at once


class SignedManifest(Strict):
    manifest: dict[str, int | float | str]  # pocketfed.signing.Manifest fields
    signature: Hex128


class PrivacySpec(Strict):
    """The round's `pocketfed.privacy.pipeline.PrivacyPlan`, field for field (the codec rides in
    `TaskSpec.codec`): the device builds the same plan and runs `device_privatize(update, plan)`."""

    dp: Literal["none", "central", "distributed"]
    clip_norm: float = Field(gt=0.0, allow_inf_nan=False)  # C, this round's (adaptive clipping moves it)
    noise_multiplier: float = Field(ge=0.0, allow_inf_nan=False)  # z, this round's
    expected_devices: int = Field(ge=1, le=10**9)  # n: under distributed DP the device's share is z C / sqrt(n)
    secagg: bool  # then the update goes through the five stages of /v1/rounds/{id}/secagg
    frac_bits: int = Field(ge=0, le=52)  # secure aggregation's fixed point
    secagg_degree: int = Field(ge=0, le=100_000)  # SecAgg+ neighbours (0 = all)
    adaptive_clip: bool = False  # release the centred clip bit (in the secure vector under secagg)
    count_noise_std: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)  # sigma_b; a device adds sigma_b / sqrt(n)

    @staticmethod
    def from_plan(plan: PrivacyPlan) -> "PrivacySpec":
        return PrivacySpec(dp=plan.dp.value, clip_norm=plan.clip_norm, noise_multiplier=plan.noise_multiplier,
                           expected_devices=plan.expected_devices, secagg=plan.secagg, frac_bits=plan.frac_bits,
                           secagg_degree=plan.secagg_degree, adaptive_clip=plan.adaptive_clip,
                           count_noise_std=plan.count_noise_std)

    def to_plan(self, codec: str) -> PrivacyPlan:
        from pocketfed.privacy.pipeline import PrivacyPlan  # noqa: PLC0415 (torch)

        return PrivacyPlan(DPMode(self.dp), self.clip_norm, self.noise_multiplier, self.expected_devices, self.secagg,
                           Codec(codec), self.frac_bits, self.secagg_degree, self.adaptive_clip, self.count_noise_std)


class EvalSpec(Strict):
    """A federated evaluation task (`pocketfed.server.evaluations`): score the release on the
    device's test split, at most `max_tokens` predicted tokens, and report `fedeval.Sums` (in the
    clear to /v1/evaluations/{round_id}/report, or under `privacy.secagg` as r / max_tokens through
    the round's secure-aggregation stages, whose bound the device checks against its own
    `fedeval.BOUND`)."""

    max_tokens: int = Field(ge=1, le=2**20)


class EvalReport(Strict):
    """Device -> server: one device's evaluation sums (`pocketfed.protocol.fedeval.Sums`), in the clear."""

    loss_sum: float = Field(ge=0.0, allow_inf_nan=False)
    tokens: int = Field(ge=0, le=2**20)
    top1_hits: int = Field(ge=0, le=2**20)
    top3_hits: int = Field(ge=0, le=2**20)
    wire_version: Literal[1] = WIRE_VERSION


class TaskSpec(Strict):
    round_id: int
    round_index: int  # training round index (what the seed is derived from)
    seed: int = Field(ge=0, lt=2**63)
    deadline: float
    model: str = Field(max_length=512)  # base model id (zoo name)
    release: SignedManifest  # of the global adapter to start from
    lora: LoraSpec
    data: DataSpec
    train: TrainSpec
    codec: Literal["float32", "float16", "int8"]
    adapter_schema: list[TensorSpec] = Field(max_length=10_000)
    max_upload_bytes: int
    chunk_bytes: int
    privacy: PrivacySpec | None = None  # None: upload the update as it is (no DP, no secagg)
    evaluate: EvalSpec | None = None  # set: evaluate the release instead of training (round_id names the evaluation)


class CheckinResponse(Strict):
    task: TaskSpec | None = None
    retry_at: float  # come back at this time (unix seconds) when there is no task
    reason: str = ""
    done: bool = False  # training is finished; the device can stop


class UploadStatus(Strict):
    received: int  # bytes the server holds of this device's upload for the round


class CommitRequest(Strict):
    size: int = Field(ge=1, le=2**31)
    sha256: Hex64
    num_tokens: int = Field(ge=0, le=10**10)  # 0 under secure aggregation: nothing per device in the clear
    metrics: dict[MetricName, Finite] = Field(default_factory=dict, max_length=16)


class CommitResponse(Strict):
    accepted: bool
    round_closed: bool


class ReleaseKey(Strict):
    public_key: Hex64


class OpenRound(Strict):
    round_id: int
    idx: int
    assigned: int
    updates: int
    goal: int
    target: int
    quorum: int
    deadline_in_s: float
    stage: str = ""  # under secure aggregation: advertise | share | masked | consistency | unmask


class RoundInfo(Strict):
    round_id: int
    idx: int
    status: str
    reason: str
    devices: int
    metrics: dict[str, Any]


class StatusResponse(Strict):
    model: str
    strategy: str
    version: int
    rounds_applied: int
    rounds_planned: int
    done: bool
    devices: int
    stopped: str = ""  # why no further round opens (finished, privacy budget spent), else ""
    privacy: dict[str, Any] | None = None  # epsilon spent, delta, noise multiplier, clip norm, ...
    open_round: OpenRound | None
    rounds: list[RoundInfo]
    # federated evaluations, oldest first (`Store.evaluations` rows: version, status, devices, loss,
    # perplexity, top1, top3, tokens, secure, ...): totals over the sampled devices, nothing per device
    evaluations: list[dict[str, Any]] = Field(default_factory=list)


# ---- secure aggregation (Bonawitz et al. 2017): server -> device views of a round's stage ---------
class SecAggParams(Strict):
    """`pocketfed.privacy.secagg.SecAggConfig`: fixed when the key-advertising stage ends."""

    round_id: int
    cohort_size: int = Field(ge=2, le=100_000)
    dimension: int = Field(ge=1, le=2**31)
    threshold: int = Field(ge=2)
    clip_norm: float = Field(gt=0.0, allow_inf_nan=False)
    frac_bits: int = Field(ge=0, le=52)
    degree: int = Field(default=0, ge=0, le=100_000)  # the SecAgg+ graph's 2h (0: everyone neighbours everyone)


class SignedKeys(Strict):
    """One cohort member's step-0 advert: its identity key (registered) and its signed round keys."""

    identity_public: Hex64  # Ed25519
    enc_public: Hex64  # C_v, X25519
    mask_public: Hex64  # S_v, X25519
    signature: Hex128  # Ed25519 over (round, identity, C_v, S_v)


class SealedShare(Strict):
    sender: int = Field(ge=0)
    nonce: str = Field(pattern=r"^[0-9a-f]{24}$")
    ciphertext: str = Field(pattern=r"^[0-9a-f]{312}$")  # AES-GCM of 140 bytes + 16-byte tag


class SecAggState(Strict):
    """GET /v1/rounds/{id}/secagg: the round's stage and what this device needs for it."""

    round_id: int
    stage: Literal["advertise", "share", "masked", "consistency", "unmask", "committed", "failed", "aborted", "empty"]
    reason: str = ""
    deadline: float
    index: int | None = None  # this device's u in the cohort (None: not in it)
    params: SecAggParams | None = None
    cohort: list[SignedKeys] | None = Field(default=None, max_length=100_000)  # stage share: U1 in index order
    graph_seed: Hex64 | None = None  # stage share: the hash of `cohort` the server used
    neighbours: list[int] | None = Field(default=None, max_length=100_000)  # stage share: N(u), as the server says
    shares: list[SealedShare] | None = None  # stage masked: ciphertexts addressed to u
    survivors: list[int] | None = None  # stages consistency and unmask: U3
    dropped: list[int] | None = None  # stage unmask: U2 minus U3
    signatures: dict[int, Hex128] | None = None  # stage unmask: N(u) + u's signatures over U3


class Accepted(Strict):
    accepted: bool
