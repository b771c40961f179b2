"""One typed config tree: every default lives here, once.

A run's config is `RunConfig`; a YAML file and `--set a.b=c` overrides change it. Unknown keys and
wrongly typed values are refused with a sentence naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pocketfed.errors import UserError


class Strategy(str, enum.Enum):
    fedavg = "fedavg"
    fedadam = "fedadam"
    fedyogi = "fedyogi"


class Aggregator(str, enum.Enum):
    """How the server combines the round's (bounded) updates; see `pocketfed.server.robust`."""

    mean = "mean"  # token-weighted (FedAvg), or the DP / secure sum's fixed-denominator mean
    median = "median"  # coordinate-wise median (Yin et al., ICML 2018)
    trimmed_mean = "trimmed_mean"  # coordinate-wise trimmed mean (Yin et al., ICML 2018)
    krum = "krum"  # Blanchard et al., NeurIPS 2017
    multi_krum = "multi_krum"


class AttackKind(str, enum.Enum):
    """Device-side attacks the simulator can play (`pocketfed.attack`)."""

    none = "none"
    model_replacement = "model_replacement"  # backdoor data, update scaled by boost (Bagdasaryan et al. 2020)
    data_poison = "data_poison"  # backdoor data, no boost
    sign_flip = "sign_flip"  # the honest update times -boost
    gaussian = "gaussian"  # N(0, boost^2) in every coordinate instead of an update
    nonfinite = "nonfinite"  # NaN, Inf and 3e38 values
    token_inflation = "token_inflation"  # an honest update claiming 10^10 training tokens


class Backend(str, enum.Enum):
    inprocess = "inprocess"
    ray = "ray"


class Codec(str, enum.Enum):
    float32 = "float32"
    float16 = "float16"
    int8 = "int8"


class Accountant(str, enum.Enum):
    rdp = "rdp"
    pld = "pld"


class DPMode(str, enum.Enum):
    none = "none"
    central = "central"  # the server adds the noise to the sum
    distributed = "distributed"  # each device adds its share of the noise (use with secagg)


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # a zoo name (smollm2-135m, tiny) or a local Hugging Face model folder
    cache_dir: str = ""  # where dequantized weights are cached; "" = $POCKETFED_CACHE or XDG cache


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # LoRA on the top `layers` decoder layers only (0 = all): back-propagation stops below them
    # (sparse back-propagation, pocketfed.model.depth)
    layers: int = 0


@dataclass
class DataConfig:
    dataset: str = "shakespeare"  # shakespeare | textdir
    path: str = ""  # for textdir: a folder whose sub-folders are devices
    seq_len: int = 128
    test_fraction: float = 0.2  # the last lines of each device are kept for test
    min_train_tokens: int = 512  # devices with fewer training tokens are left out
    max_eval_tokens: int = 4096  # per device, to bound evaluation time


@dataclass
class TrainConfig:
    steps: int = 4  # local optimizer steps per round (0 = use epochs)
    epochs: float = 0.0  # local epochs over the device's train split, used when steps == 0
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    prox_mu: float = 0.0  # FedProx proximal term weight (0 = plain local SGD)
    # where a device's plan sets no micro-batch (the simulator's devices, a device without a profile), a
    # step's rows run at most this many tokens at a time (0 = all at once): the gradient is the batch's
    # either way, and the activations held halve with each halving (docs/BENCHMARKS.md, bench_scale)
    micro_tokens: int = 128


@dataclass
class ServerConfig:
    strategy: Strategy = Strategy.fedavg
    lr: float = 1.0  # server learning rate (1.0 with fedavg = plain FedAvg)
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity (FedOpt's epsilon)
    # Defenses against malicious devices (`pocketfed.server.robust`); the aggregators other than mean
    # need every update in the clear, so they are refused under secure aggregation (there, the
    # devices' clipping plus DP is the defense: Sun et al. 2019)
    aggregator: Aggregator = Aggregator.mean
    trim_fraction: float = 0.1  # trimmed_mean: the share of values cut at each end of every coordinate
    krum_byzantine: int = 1  # krum / multi_krum: f, the malicious devices tolerated (needs n > 2f + 2)
    max_update_norm: float = 0.0  # each decoded update clipped to this L2 norm on the server (0 = no fixed bound)
    # each decoded update clipped to this multiple of the round's (lower) median update norm (FLAME, Nguyen
    # et al. 2022, clip at 1x): a device's update weighs at most a few honest ones whatever it sent (0 = off)
    median_norm_bound: float = 3.0


@dataclass
class PrivacyConfig:
    dp: DPMode = DPMode.none
    clip_norm: float = 1.0  # L2 bound of one device's update (with dp or secagg)
    noise_multiplier: float = 0.0  # z: noise std on the sum is z * clip_norm; 0 with target_epsilon = calibrate
    target_epsilon: float = 0.0  # the budget; training stops before it would be overspent (0 = none)
    delta: float = 1e-6
    accountant: Accountant = Accountant.rdp
    adaptive_clip: bool = False  # Andrew et al. 2021
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise_std: float = 0.0  # sigma_b, noise on the adaptive-clipping count; > noise_multiplier/2 under DP
    secagg: bool = False  # secure aggregation: the server learns only the sum
    secagg_degree: int = 0  # SecAgg+ neighbours per device (0 = the full graph)
    frac_bits: int = 16  # fixed-point fractional bits of the secure sum
    codec: Codec = Codec.float32  # how a (non-secagg) update is uploaded


@dataclass
class SimConfig:
    devices: int = 8  # training population; 0 = every device of the dataset
    # expected devices per round: each device of the population is sampled independently (Poisson)
    # with q = per_round / population, so a round's cohort size varies; 0 = q 1 (every device)
    per_round: int = 0
    rounds: int = 3
    heldout: int = 4  # devices kept out of training, for evaluation only
    seed: int = 0
    backend: Backend = Backend.inprocess
    ray_address: str = ""  # "" = start a local Ray; else e.g. ray://head:10001
    device_cpus: int = 1  # under Ray: CPUs each virtual device declares (and its torch threads)
    device_memory_mb: int = 0  # under Ray: private memory a device may use; 0 = 1024 + the model's size
    threads: int = 0  # torch threads; 0 = leave torch's default


@dataclass
class EvalConfig:
    every_round: bool = True  # held-out perplexity after every round (the report's curve)
    personalize_steps: int = 4  # local steps on the device's train split for `personalized`
    centralized_steps: int = 0  # 0 = as many steps as the federated run took in total
    variants: list[str] = field(
        default_factory=lambda: ["base", "federated", "personalized", "local_only", "centralized"]
    )


@dataclass
class DeployConfig:
    """Rounds with real devices over HTTP (`pocketfed server`); sim.rounds and sim.seed still apply.

    A round's cohort is a Poisson sample drawn when the round opens, never the first devices to
    check in: every registered device below its participation cap (the frame) is drawn
    independently with q = min(1, ceil(goal * overselect) / frame), and the accountant is given
    that q for the round (a device registering during the round is drawn by the same rule when it
    checks in). A device outside the sample is told to wait; a sampled device that is not eligible
    when it checks in sits the round out. The cohort's size is random, so:
      - the round commits at `goal` updates, or at its deadline with at least `quorum` updates
        (below it the round aborts and a new one is drawn): a cohort smaller than the goal
        commits at the deadline, so set overselect to make that rare;
      - a cohort smaller than the quorum (2 at least under secure aggregation), the empty one
        included, cannot commit: the round closes at once, the adapter stays, and the round counts
        as run, for the accountant too;
      - no round opens while fewer devices than that are registered.
    """

    goal: int = 8  # updates that close a round before its deadline
    overselect: float = 1.3  # expected sampled cohort = ceil(goal * overselect); q is computed from it
    quorum: int = 4  # fewest updates that may commit a round (at its deadline, or a cohort this small)
    deadline_s: float = 600.0  # a round's life from opening to deadline
    retry_s: float = 30.0  # "come back in" hint to devices that get no task
    min_free_memory_mb: int = 512  # eligibility: besides charging, idle and unmetered
    manifest_ttl_s: float = 86400.0  # a release manifest expires (freeze protection) after this
    max_clock_skew_s: float = 300.0  # signed requests older or newer than this are refused
    max_upload_mb: float = 64.0  # largest update a device may upload
    secagg_stage_s: float = 60.0  # with privacy.secagg: each stage after advertise (share, masked, unmask) lasts this long
    # the planned population, used only to calibrate z for privacy.target_epsilon before round 1, at
    # q = ceil(goal * overselect) / population (0 = unknown: q 1, the most noise); every round is then
    # accounted at its actual q, from the devices registered when it opened (fewer than planned: a
    # higher q, and the budget stop comes sooner)
    population: int = 0
    # a device that took part in max_participations of the last participation_window training rounds
    # is not sampled (0 = no cap; window 0 = the whole run); the accountant bounds a device's rounds
    # by min(sim.rounds, max_participations * ceil(sim.rounds / window)). Simulations apply it too.
    max_participations: int = 0
    participation_window: int = 0
    open_registration: bool = False  # True: any Ed25519 key may register (loopback trials); False: a new
    # device spends a one-time enrollment token (`pocketfed enroll`), so strangers cannot join rounds
    # serving limits (`pocketfed.server.http.limits`; not part of a run's identity: a restart may change them).
    # A connection must send its request headers within read_timeout_s of opening (or of its last
    # answer), go no longer than read_timeout_s without a byte of a body, and send a whole request
    # within request_timeout_s; an idle kept-alive connection closes after keep_alive_s; connections
    # beyond max_connections are closed as they arrive (their requests would get 503 anyway)
    read_timeout_s: float = 15.0
    request_timeout_s: float = 120.0
    keep_alive_s: float = 5.0
    max_connections: int = 1024  # bench_server's 1,000 devices checking in at once fit
    # federated evaluation (`pocketfed.server.evaluations`): after every eval_every-th committed round
    # (0 = off) a Poisson sample of the registered devices (its own key, expected size eval_devices)
    # evaluates that version on its own test split (at most eval_max_tokens predicted tokens each) and
    # reports loss, top-1 and top-3 sums, through the secure sum under privacy.secagg; it closes when
    # every sampled device reported or at eval_deadline_s (docs/PRIVACY.md: what it releases)
    eval_every: int = 0
    eval_devices: int = 8
    eval_max_tokens: int = 512
    eval_deadline_s: float = 300.0


class Availability(str, enum.Enum):
    always = "always"  # every sampled device is charging, idle, on Wi-Fi, cool and full
    diurnal = "diurnal"  # device states follow the hour of each device's day (pocketfed.device.eligibility)


@dataclass
class EligibilityConfig:
    """A device trains only when all of these hold (as Bonawitz et al. 2019 run Gboard's FL)."""

    require_charging: bool = True
    require_idle: bool = True
    require_unmetered: bool = True
    min_battery_pct: float = 20.0
    max_temperature_c: float = 40.0  # battery temperature; phones throttle charging around 40-45 C


@dataclass
class DeviceConfig:
    """Simulated devices: profiles, budgets, eligibility, availability over a day, dropouts."""

    profiles: list[str] = field(default_factory=list)  # profile mix, e.g. [watch, phone, car]; [] = no budgets
    profiles_file: str = ""  # YAML with user-defined profiles (see configs/profiles/)
    max_round_seconds: float = 0.0  # time cap per round, estimated device seconds (0 = none)
    max_round_battery_pct: float = 0.0  # energy cap per round, % of the battery (0 = none)
    availability: Availability = Availability.always
    start_hour: float = 0.0  # local time of round 0 (diurnal)
    hours_per_round: float = 1.0  # simulated hours between rounds (diurnal)
    dropout: float = 0.0  # probability that an eligible device fails during its round
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)


@dataclass
class AttackConfig:
    """Malicious devices in a simulation (`pocketfed.attack`): which, and what they do."""

    kind: AttackKind = AttackKind.none
    fraction: float = 0.0  # share of the training population that attacks (rounded up); or name them:
    devices: list[str] = field(default_factory=list)
    boost: float = 0.0  # model_replacement's scale (0 = the expected cohort, n / eta with eta = 1); sign_flip, gaussian
    trigger: str = " zq7 "  # the backdoor's trigger phrase
    target: str = " banana"  # the continuation the backdoor wants after the trigger
    poison_rows: int = 64  # backdoor rows an attacker trains on (data_poison, model_replacement)
    steps: int = 0  # local steps an attacker takes (0 = its task's)
    lr: float = 0.0  # an attacker's learning rate (0 = its task's)
    seed: int = 0  # which devices attack (with fraction) and the attacks' own randomness


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)


VARIANTS = ("base", "federated", "personalized", "local_only", "centralized")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a --set string) to the annotated type `tp`, or refuse."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            valid = ", ".join(m.value for m in tp)
            raise UserError(f"config key '{key}' must be one of {valid}, got {value!r}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"config key '{key}' must be a number, got {value!r}")
        try:
            out = tp(value) if tp is float else int(str(value), 10) if isinstance(value, str) else value
        except ValueError:
            raise UserError(f"config key '{key}' must be {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and (not isinstance(out, int) or isinstance(out, float)):
            raise UserError(f"config key '{key}' must be an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(obj: Any, updates: dict[str, Any], prefix: str) -> None:
    hints = _field_types(type(obj))
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in hints:
            valid = ", ".join(f"{prefix}{k}" for k in hints)
            raise UserError(f"unknown config key '{full}'; valid keys here are: {valid}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"config key '{full}' is a section; give it keys, not {value!r}")
            _apply(getattr(obj, key), value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, tp, full))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-4", "sim.rounds=2"]` -> nested dict; values stay strings until coerced."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set takes key=value (e.g. train.lr=3e-4), got {pair!r}")
        key, value = pair.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set key {key!r} conflicts with another --set")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    return out


def read_yaml_mapping(path: str | Path, what: str, shape: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; `what` names it in errors ("config file"), `shape` says what it maps."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {str(p)!r} must hold a mapping of {shape}, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the YAML file at `path`, then `overrides` (a nested dict)."""
    cfg = RunConfig()
    if path is not None:
        _apply(cfg, read_yaml_mapping(path, "config file", "sections"), "")
    if overrides:
        _apply(cfg, overrides, "")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Range checks that a type alone cannot express."""
    checks = [
        (cfg.lora.rank >= 1, "lora.rank must be at least 1"),
        (cfg.lora.layers >= 0, "lora.layers must be 0 (all layers) or positive"),
        (cfg.data.seq_len >= 8, "data.seq_len must be at least 8"),
        (0.0 < cfg.data.test_fraction < 1.0, "data.test_fraction must be between 0 and 1"),
        (cfg.train.steps > 0 or cfg.train.epochs > 0, "set train.steps or train.epochs above 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (cfg.train.micro_tokens >= 0, "train.micro_tokens must be 0 (the whole batch at once) or positive"),
        (cfg.train.lr > 0, "train.lr must be positive"),
        (cfg.train.prox_mu >= 0, "train.prox_mu must be 0 or positive"),
        (cfg.sim.rounds >= 1, "sim.rounds must be at least 1"),
        (cfg.sim.devices >= 0, "sim.devices must be 0 (all) or positive"),
        (cfg.sim.per_round >= 0, "sim.per_round must be 0 (all) or positive"),
        (cfg.sim.heldout >= 0, "sim.heldout must be 0 or positive"),
        (cfg.sim.device_cpus >= 1, "sim.device_cpus must be at least 1"),
        (cfg.sim.device_memory_mb >= 0, "sim.device_memory_mb must be 0 (derived from the model) or positive"),
        (all(v in VARIANTS for v in cfg.eval.variants), f"eval.variants must be among {', '.join(VARIANTS)}"),
        (cfg.privacy.clip_norm > 0, "privacy.clip_norm must be positive"),
        (cfg.privacy.noise_multiplier >= 0, "privacy.noise_multiplier must be 0 or positive"),
        (0 < cfg.privacy.delta < 1, "privacy.delta must be between 0 and 1"),
        (cfg.privacy.dp is DPMode.none or cfg.privacy.noise_multiplier > 0 or cfg.privacy.target_epsilon > 0,
         "privacy.dp needs privacy.noise_multiplier or privacy.target_epsilon above 0"),
        (cfg.privacy.dp is not DPMode.distributed or cfg.privacy.secagg,
         "privacy.dp=distributed needs privacy.secagg=true (each share of noise alone is too small)"),
        (8 <= cfg.privacy.frac_bits <= 24, "privacy.frac_bits must be between 8 and 24"),
        (cfg.privacy.count_noise_std >= 0, "privacy.count_noise_std must be 0 or positive"),
        (0 <= cfg.privacy.target_quantile <= 1, "privacy.target_quantile must be between 0 and 1"),
        (cfg.privacy.clip_lr > 0, "privacy.clip_lr must be positive"),
        # Andrew et al. (NeurIPS 2021) Theorem 1: the count takes (2 sigma_b)^-2 of z^-2, so sigma_b > z / 2;
        # a calibrated z is checked once it is known (`pocketfed.privacy.budget.init_privacy`)
        (not cfg.privacy.adaptive_clip or cfg.privacy.dp is DPMode.none
         or cfg.privacy.count_noise_std > max(0.0, cfg.privacy.noise_multiplier / 2),
         f"privacy.count_noise_std must be above privacy.noise_multiplier / 2 "
         f"(= {cfg.privacy.noise_multiplier / 2:g}; above 0 with a calibrated noise multiplier) with "
         f"privacy.adaptive_clip under DP, got {cfg.privacy.count_noise_std:g}"),
        (cfg.deploy.goal >= 1, "deploy.goal must be at least 1"),
        (cfg.deploy.overselect >= 1.0, "deploy.overselect must be 1.0 or more"),
        (1 <= cfg.deploy.quorum <= cfg.deploy.goal, "deploy.quorum must be between 1 and deploy.goal"),
        (cfg.deploy.deadline_s > 0 and cfg.deploy.retry_s > 0, "deploy.deadline_s and deploy.retry_s must be positive"),
        (cfg.deploy.manifest_ttl_s > 0 and cfg.deploy.max_clock_skew_s > 0,
         "deploy.manifest_ttl_s and deploy.max_clock_skew_s must be positive"),
        (cfg.deploy.max_upload_mb > 0, "deploy.max_upload_mb must be positive"),
        (cfg.deploy.secagg_stage_s > 0, "deploy.secagg_stage_s must be positive"),
        (0 < cfg.deploy.read_timeout_s <= cfg.deploy.request_timeout_s,
         f"deploy.read_timeout_s must be positive and at most deploy.request_timeout_s "
         f"({cfg.deploy.request_timeout_s:g}), got {cfg.deploy.read_timeout_s:g}"),
        (cfg.deploy.keep_alive_s > 0, f"deploy.keep_alive_s must be positive, got {cfg.deploy.keep_alive_s:g}"),
        (cfg.deploy.max_connections >= 1, f"deploy.max_connections must be at least 1, got {cfg.deploy.max_connections}"),
        (cfg.deploy.eval_every >= 0, f"deploy.eval_every must be 0 (no evaluation) or positive, got {cfg.deploy.eval_every}"),
        (cfg.deploy.eval_devices >= 1, f"deploy.eval_devices must be at least 1, got {cfg.deploy.eval_devices}"),
        (1 <= cfg.deploy.eval_max_tokens <= 2**20,
         f"deploy.eval_max_tokens must be between 1 and {2**20}, got {cfg.deploy.eval_max_tokens}"),
        (cfg.deploy.eval_deadline_s > 0, f"deploy.eval_deadline_s must be positive, got {cfg.deploy.eval_deadline_s}"),
        (cfg.deploy.population == 0 or cfg.deploy.population >= cfg.deploy.goal,
         f"deploy.population must be 0 (unknown) or at least deploy.goal ({cfg.deploy.goal}), "
         f"got {cfg.deploy.population}"),
        (cfg.deploy.max_participations >= 0,
         f"deploy.max_participations must be 0 (no cap) or positive, got {cfg.deploy.max_participations}"),
        (cfg.deploy.participation_window >= 0,
         f"deploy.participation_window must be 0 (the whole run) or positive, got {cfg.deploy.participation_window}"),
        (cfg.deploy.participation_window == 0 or cfg.deploy.max_participations > 0,
         "deploy.participation_window needs deploy.max_participations above 0 (a window without a cap caps nothing)"),
        (0.0 <= cfg.device.dropout < 1.0, "device.dropout must be in [0, 1)"),
        (cfg.device.max_round_seconds >= 0 and cfg.device.max_round_battery_pct >= 0,
         "device.max_round_seconds and device.max_round_battery_pct must be 0 (none) or positive"),
        (cfg.device.hours_per_round > 0, "device.hours_per_round must be positive"),
        (0 <= cfg.device.eligibility.min_battery_pct <= 100, "device.eligibility.min_battery_pct must be in [0, 100]"),
        *robust_checks(cfg),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def robust_checks(cfg: RunConfig) -> list[tuple[bool, str]]:
    """The defenses' and attacks' ranges (`validate`)."""
    s, a = cfg.server, cfg.attack
    return [
        (0.0 <= s.trim_fraction < 0.5, f"server.trim_fraction must be in [0, 0.5), got {s.trim_fraction:g}"),
        (s.krum_byzantine >= 0, f"server.krum_byzantine must be 0 or positive, got {s.krum_byzantine}"),
        (s.max_update_norm >= 0, f"server.max_update_norm must be 0 (no fixed bound) or positive, got {s.max_update_norm:g}"),
        (s.median_norm_bound == 0 or s.median_norm_bound >= 1,
         f"server.median_norm_bound must be 0 (off) or at least 1 (a multiple of the median norm), got {s.median_norm_bound:g}"),
        (s.aggregator is Aggregator.mean or not cfg.privacy.secagg,
         f"server.aggregator={s.aggregator.value} needs every update in the clear, but privacy.secagg=true shows the "
         f"server only their sum: use server.aggregator=mean (the devices' clipping and DP are the defense there)"),
        (s.aggregator is Aggregator.mean or cfg.privacy.dp is DPMode.none,
         f"server.aggregator={s.aggregator.value} is not accounted under privacy.dp={cfg.privacy.dp.value} "
         f"(its sensitivity is not the clipped sum's): use server.aggregator=mean with DP"),
        (0.0 <= a.fraction <= 1.0, f"attack.fraction must be in [0, 1], got {a.fraction:g}"),
        (not (a.fraction and a.devices), "give attack.fraction or attack.devices, not both"),
        (a.kind is AttackKind.none or a.fraction > 0 or bool(a.devices),
         f"attack.kind={a.kind.value} needs attack.fraction above 0 or attack.devices (names)"),
        (a.boost >= 0, f"attack.boost must be 0 (the default for the kind) or positive, got {a.boost:g}"),
        (bool(a.trigger.strip()) and bool(a.target.strip()), "attack.trigger and attack.target must not be blank"),
        (a.poison_rows >= 1, f"attack.poison_rows must be at least 1, got {a.poison_rows}"),
        (a.steps >= 0 and a.lr >= 0, f"attack.steps and attack.lr must be 0 (the task's) or positive, got {a.steps}, {a.lr:g}"),
        (a.kind is AttackKind.none or cfg.sim.backend is Backend.inprocess,
         f"attack.kind={a.kind.value} runs in the in-process backend only: set sim.backend=inprocess"),
    ]


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A plain, YAML-safe dict (enums as their values)."""

    def conv(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return conv(dataclasses.asdict(cfg))


def from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, data, "")
    return cfg


