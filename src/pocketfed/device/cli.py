"""Device budget commands: `pocketfed budget plan --profile watch --model smollm2-135m`.

`register(app)` adds the `budget` sub-app to the main typer app. Bad values raise `UserError`.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

budget_app = typer.Typer(no_args_is_help=True, help="Device memory/energy budgets and training plans.")
console = Console()


@budget_app.command("plan")
def plan_command(
    profile: str = typer.Option(..., "--profile", help="watch, phone, car, or one from --profiles-file."),
    model: str = typer.Option("smollm2-135m", "--model", help="Zoo name (smollm2-135m, tiny) or a local HF folder."),
    profiles_file: str = typer.Option("", "--profiles-file", help="YAML file of user-defined profiles."),
    rank: int = typer.Option(8, "--rank", help="The global LoRA rank (the device may train less)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Rows per optimizer step."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per row, before the planner shortens it."),
    steps: int = typer.Option(4, "--steps", help="Local steps per round (for the energy estimate)."),
) -> None:
    """Print the training plan that fits the profile, its predicted peak memory and its energy."""
    from pocketfed.config import LoraConfig, TrainConfig
    from pocketfed.device import energy
    from pocketfed.device.planner import make_plan, shape_of
    from pocketfed.device.profiles import get_profile
    from pocketfed.errors import UserError

    if rank < 1 or batch_size < 1 or seq_len < 8 or steps < 1:
        raise UserError("--rank, --batch-size and --steps must be at least 1 and --seq-len at least 8")
    prof = get_profile(profile, profiles_file)
    shape, _ = shape_of(model)
    plan = make_plan(shape, prof, LoraConfig(rank=rank), TrainConfig(steps=steps, batch_size=batch_size), seq_len, model)
    positions = steps * plan.batch_size * plan.seq_len
    cost = energy.round_cost(prof, shape.flops_per_token(plan.checkpointing, plan.layers) * positions,
                             2 * 4 * shape.lora_params(plan.rank, list(plan.target_modules), plan.layers))
    table = Table(title=f"plan: {model} on {prof.name} ({prof.train_memory_mb:.0f} MB for training)")
    table.add_column("", justify="left")
    table.add_column("", justify="right")
    rows = [
        ("frozen base", plan.precision.value), ("LoRA rank", str(plan.rank)),
        ("target modules", ", ".join(plan.target_modules)),
        ("micro-batch x accumulation", f"{plan.micro_batch} x {plan.grad_accum}"),
        ("sequence length", str(plan.seq_len)), ("activation checkpointing", "on" if plan.checkpointing else "off"),
        *[(f"  {k}", f"{v:.1f} MB") for k, v in plan.memory_mb.items() if k != "predicted_peak"],
        ("predicted peak", f"{plan.predicted_peak_mb:.1f} MB"),
        (f"energy of {steps} steps", f"{cost.joules:.1f} J = {cost.mah:.3f} mAh = {cost.battery_pct:.3f} % battery"),
        ("device time (est.)", f"{cost.device_seconds:.1f} s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    console.print(f"The peak is the whole device process's, on a runtime of {plan.memory_mb['runtime']:.0f} MB (a stand-in "
                  "here; `pocketfed device --profile` plans on the runtime it measures).")


def register(app: typer.Typer) -> None:
    app.add_typer(budget_app, name="budget")
