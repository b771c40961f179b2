"""report.png: held-out perplexity per round, and the five variants side by side; when an attack
ran (summary `attack`), a panel of backdoor success and clean held-out perplexity per round; with
per-device results (summary `per_device`), a panel of every trained device's base / federated /
personalized perplexity, the devices personalization made worse marked in red."""

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


def plot_attack(ax, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Backdoor success (left axis) and clean held-out perplexity (right axis) per round."""
    rows = [r for r in history if r.get("attack")]
    ax.plot([r["round"] + 1 for r in rows], [100 * r["attack"]["backdoor_success"] for r in rows], marker="o",
            color="tab:red", label="backdoor success")
    ax.set_ylim(-5, 105)
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("backdoor success (% of trigger prompts)", color="tab:red")
    clean = [r for r in rows if r.get("heldout")]
    if clean:
        twin = ax.twinx()
        twin.plot([r["round"] + 1 for r in clean], [r["heldout"]["perplexity"] for r in clean], marker="s",
                  color="tab:blue", label="clean held-out perplexity")
        twin.set_ylabel("clean held-out perplexity", color="tab:blue")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="center right")
    a = summary["attack"]
    ax.set_title(f"Attack: {a['kind']} by {len(a['devices'])} device(s)")


def plot_per_device(ax, summary: dict[str, Any]) -> None:
    """Each trained device's own-test perplexity: base, federated, personalized (devices ordered by
    their federated perplexity); the title counts the devices personalization made worse."""
    rows = sorted(summary["per_device"].items(), key=lambda kv: kv[1].get("federated", {}).get("perplexity", 0.0))
    x = list(range(1, len(rows) + 1))
    for name, color, marker in (("base", "grey", "x"), ("federated", "tab:blue", "o"), ("personalized", "tab:orange", "^")):
        pts = [(i, r[name]["perplexity"]) for i, (_, r) in zip(x, rows) if name in r]
        if pts:
            ax.scatter([i for i, _ in pts], [v for _, v in pts], color=color, marker=marker, s=22, label=name, zorder=3)
    p = summary.get("personalization")
    for i, (d, r) in zip(x, rows):
        if p and d in p["worse"]:  # a device personalization made worse: a red line from federated up
            ax.plot([i, i], [r["federated"]["perplexity"], r["personalized"]["perplexity"]], color="tab:red", lw=2, zorder=2)
    ax.set_xlabel("trained device (ordered by federated perplexity)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("perplexity on its own test split")
    ax.set_title("Each trained device, its own later lines" + (
        f"\npersonalization kept by {p['kept']} of {p['devices']}, made {len(p['worse'])} worse" if p else ""))
    ax.legend()


def plot_report(history: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    attacked = bool(summary.get("attack"))
    devices = any((summary.get("per_device") or {}).values())  # no variant evaluated (eval.variants=[]): no panel
    n = 2 + devices + attacked
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2))
    ax1, ax2 = axes[0], axes[1]
    if devices:
        plot_per_device(axes[2], summary)
    if attacked:
        plot_attack(axes[-1], history, summary)
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
