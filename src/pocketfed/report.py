"""report.png: held-out perplexity per round, and the five variants side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pocketfed.config import VARIANTS  # noqa: E402


def _eps(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3g}"  # None: unbounded (the coordinator sees each update)


def privacy_line(summary: dict[str, Any]) -> str:
    """The run's two epsilons for the title: against the model's recipients and against the coordinator."""
    p = summary.get("privacy")
    if not p:
        return ""
    return (f"\nDP (delta {p['delta']:.0e}): epsilon {_eps(p.get('epsilon_recipients'))} against the model's "
            f"recipients, {_eps(p.get('epsilon_coordinator'))} against the coordinator")


def plot_report(history: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    rounds = [r["round"] + 1 for r in history if r.get("heldout")]
    ppl = [r["heldout"]["perplexity"] for r in history if r.get("heldout")]
    if rounds and summary.get("base", {}).get("heldout"):  # round 0 is the base model
        rounds, ppl = [0] + rounds, [summary["base"]["heldout"]["perplexity"]] + ppl
    if rounds:
        ax1.plot(rounds, ppl, marker="o", label="federated (global adapter)")
    if summary.get("base", {}).get("heldout"):
        ax1.axhline(summary["base"]["heldout"]["perplexity"], color="grey", ls="--", label="base")
    if summary.get("centralized", {}).get("heldout"):
        ax1.axhline(summary["centralized"]["heldout"]["perplexity"], color="green", ls=":", label="centralized")
    ax1.set_xlabel("round")
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax1.set_ylabel("held-out perplexity")
    ax1.set_title("Held-out devices (never trained on)")
    if ax1.get_legend_handles_labels()[0]:  # nothing to label when per-round evaluation was off
        ax1.legend()

    names = [v for v in VARIANTS if v in summary]
    vals = [summary[v]["perplexity"] for v in names]
    bars = ax2.bar(names, vals, color=["grey", "tab:blue", "tab:orange", "tab:red", "tab:green"][: len(names)])
    ax2.bar_label(bars, fmt="%.1f")
    if vals:  # zoom on the differences: perplexities of the variants are close
        lo, hi = min(vals), max(vals)
        ax2.set_ylim(max(0.0, lo - 0.6 * (hi - lo) - 0.02 * lo), hi + 0.15 * (hi - lo) + 0.02 * hi)
    ax2.set_ylabel("perplexity on own test splits")
    ax2.set_title("Trained devices, their own later lines")
    fig.suptitle(f"pocketfed: {summary.get('model', '')} on {summary.get('dataset', '')}{privacy_line(summary)}")
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
