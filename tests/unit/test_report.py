"""report.png's panels follow what the run measured."""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt

from pocketfed import report


def test_a_run_without_variants_draws_no_empty_device_panel(tmp_path, monkeypatch):
    """eval.variants=[] (bench_robust's runs) leaves each device's record empty: no per-device panel,
    no empty legend; the attack panel stays."""
    history = [{"round": r, "heldout": {"perplexity": 90.0 - r}, "attack": {"backdoor_success": 1.0}} for r in range(3)]
    summary = {"per_device": {"hamlet/HAM": {}, "lear/LEAR": {}}, "attack": {"kind": "model_replacement", "devices": ["x"]},
               "model": "tiny", "dataset": "shakespeare"}
    panels = []
    real = plt.subplots
    monkeypatch.setattr(report.plt, "subplots", lambda *a, **k: panels.append(a[1]) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found" would raise
        report.plot_report(history, summary, tmp_path / "report.png")
    assert panels == [3] and (tmp_path / "report.png").stat().st_size > 0
    summary["per_device"]["hamlet/HAM"] = {"federated": {"perplexity": 80.0}}
    report.plot_report(history, summary, tmp_path / "report.png")
    assert panels == [3, 4]
