"""Privacy commands: `pocketfed privacy calibrate|epsilon` and `pocketfed ledger --home DIR`.

`privacy epsilon` prints two epsilons (`pocketfed.privacy.accountant`): against the model's
recipients (amplified by sampling) and against the coordinator (it knows who took part: no
amplification, over the most rounds one device takes part in; inf under central DP).

`register(app)` adds them to the main typer app. Bad values raise `UserError` with one sentence.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pocketfed.errors import UserError


class Method(str, enum.Enum):
    rdp = "rdp"
    pld = "pld"


class Mode(str, enum.Enum):
    central = "central"
    distributed = "distributed"


def _check_common(delta: float, rounds: int, sample_rate: float) -> None:
    if not 0 < delta < 1:
        raise UserError(f"--delta must be between 0 and 1 (exclusive), got {delta}.")
    if rounds < 1:
        raise UserError(f"--rounds must be a whole number of at least 1, got {rounds}.")
    if not 0 < sample_rate <= 1:
        raise UserError(f"--sample-rate must be above 0 and at most 1, got {sample_rate}.")


def calibrate_command(
    epsilon: float = typer.Option(..., "--epsilon", help="Target epsilon (> 0)."),
    delta: float = typer.Option(..., "--delta", help="Target delta, in (0, 1)."),
    rounds: int = typer.Option(..., "--rounds", help="Federated rounds to cover."),
    sample_rate: float = typer.Option(..., "--sample-rate", help="Fraction of devices per round, in (0, 1]."),
    method: Method = typer.Option(Method.rdp, "--method", help="Accountant: rdp (fast) or pld (tighter)."),
) -> None:
    """Print the smallest noise multiplier that keeps the run within (epsilon, delta)."""
    from pocketfed.privacy.accountant import calibrate

    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise UserError(f"--epsilon must be a positive finite number, got {epsilon}.")
    _check_common(delta, rounds, sample_rate)
    z = calibrate(epsilon, delta, rounds, sample_rate, method=method.value)
    Console().print(f"noise multiplier {z:.6f} keeps epsilon (against the model's recipients) <= {epsilon:g} "
                    f"at delta {delta:g} over {rounds} rounds at sample rate {sample_rate:g} ({method.value})",
                    highlight=False)


def epsilon_command(
    noise_multiplier: float = typer.Option(..., "--noise-multiplier", help="Noise std / clip norm (> 0)."),
    delta: float = typer.Option(..., "--delta", help="Delta, in (0, 1)."),
    rounds: int = typer.Option(..., "--rounds", help="Federated rounds."),
    sample_rate: float = typer.Option(..., "--sample-rate", help="Fraction of devices per round, in (0, 1]."),
    method: Method = typer.Option(Method.rdp, "--method", help="Accountant: rdp (fast) or pld (tighter)."),
    dp: Mode = typer.Option(Mode.central, "--dp", help="Who adds the noise: central (the server) or distributed."),
    secagg: bool = typer.Option(False, "--secagg/--no-secagg", help="Secure aggregation hides each update."),
    devices: int = typer.Option(0, "--devices", help="Expected cohort n (distributed DP without secagg)."),
    max_participations: int = typer.Option(0, "--max-participations",
                                           help="Most rounds one device takes part in (0 = every round)."),
) -> None:
    """Print the epsilons a run spends: against the model's recipients and against the coordinator."""
    from pocketfed.privacy.accountant import coordinator_epsilon, coordinator_noise_multiplier, epsilon

    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise UserError(f"--noise-multiplier must be a positive finite number, got {noise_multiplier}.")
    _check_common(delta, rounds, sample_rate)
    if max_participations < 0:
        raise UserError(f"--max-participations must be 0 (every round) or a positive whole number, got {max_participations}.")
    distributed = dp is Mode.distributed
    if distributed and not secagg and devices < 1:
        raise UserError("--devices must be the expected cohort (1 or more) for --dp distributed without --secagg.")
    eps = epsilon(noise_multiplier, sample_rate, rounds, delta, method=method.value)
    z_coord = coordinator_noise_multiplier(noise_multiplier, distributed, secagg, max(devices, 1), max(devices, 1))
    eps_coord = coordinator_epsilon([(z_coord, rounds)], max_participations or None, delta, method.value)
    sees = ("each device's own noised update" if distributed and not secagg else "only the noised sum"
            if distributed else "each update (central DP)")
    Console().print(f"epsilon_recipients {eps:.6f} (the model's recipients, amplified by sampling at "
                    f"{sample_rate:g})\nepsilon_coordinator {eps_coord:.6f} (the coordinator knows who took part and "
                    f"sees {sees}; over {min(max_participations or rounds, rounds)} rounds)\nat delta {delta:g} after "
                    f"{rounds} rounds with noise multiplier {noise_multiplier:g} ({method.value})", highlight=False)


def ledger_command(
    home: Path = typer.Option(..., "--home", help="The device's home folder (holds ledger.jsonl)."),
) -> None:
    """Summarise what left this device, from its egress ledger."""
    from pocketfed.device.ledger import summarize

    if not home.is_dir():
        raise UserError(f"--home {home} is not a folder; give the device's home folder.")
    summary = summarize(home)
    table = Table(title=f"egress ledger of {home}")
    for column in ("kind", "messages", "bytes"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, (count, nbytes) in sorted(summary.by_kind.items()):
        table.add_row(kind, str(count), f"{nbytes:,}")
    if summary.refusals:
        table.add_row("refused", str(summary.refusals), "0")
    console = Console()
    console.print(table)
    console.print(summary.sentence, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `privacy calibrate`, `privacy epsilon` and `ledger` to the main app."""
    privacy_app = typer.Typer(no_args_is_help=True, help="Differential-privacy budget arithmetic.")
    privacy_app.command("calibrate")(calibrate_command)
    privacy_app.command("epsilon")(epsilon_command)
    app.add_typer(privacy_app, name="privacy")
    app.command("ledger")(ledger_command)
