"""The efficiency benchmark's quick mode: every point measured in its own process, CSV,
markdown with the 22k-style comparison and targets, and a log-log plot with slopes."""

from __future__ import annotations

import csv

import pytest

from ssamba.bench import efficiency


@pytest.fixture
def tiny_sweep(monkeypatch):
    """Two shallow models over 16 and 32 tokens at batch 1: 8 processes of a few seconds."""
    monkeypatch.setattr(
        efficiency,
        "MODELS",
        {
            "ssamba-tiny": ("ssamba", {"depth": 2}),
            "ssast-tiny-naive": ("ssast", {"attention": "naive", "depth": 1}),
        },
    )
    monkeypatch.setattr(efficiency, "QUICK_TOKENS", [16, 32])
    monkeypatch.setattr(efficiency, "BATCHES", (1,))
    monkeypatch.setattr(efficiency, "QUICK_SLOPE_RANGE", (16, 32))
    monkeypatch.delenv("SSAMBA_BENCH_BUDGET_S", raising=False)
    monkeypatch.setenv("SSAMBA_BENCH_DEVICE", "cpu")


def test_quick_run_writes_csv_table_slopes_and_plot(tiny_sweep, tmp_path):
    rows = efficiency.run(tmp_path, quick=True)

    assert len(rows) == 2 * 2 * 2  # modes x tokens x models
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    assert {r["frames"] for r in rows} == {32, 64}  # tokens = frames / 2
    with (tmp_path / "efficiency.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with (tmp_path / "efficiency_slopes.csv").open() as f:
        slopes = list(csv.DictReader(f))
    assert len(slopes) == 2 * 2
    assert all(s["points"] == "2" and float(s["time_slope"]) for s in slopes)
    table = (tmp_path / "efficiency.md").read_text()
    assert "ssamba-tiny vs ssast-tiny, inference at 32 tokens" in table
    assert "time slope" in table and "## targets" in table
    assert (tmp_path / "efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_points_over_the_memory_cap_are_skipped_with_the_reason(tiny_sweep, tmp_path, monkeypatch):
    # The naive attention's (tokens x tokens) matrices alone exceed a 1 kB cap.
    monkeypatch.setattr(efficiency, "MODES", ("inference",))
    monkeypatch.setattr(
        efficiency, "MODELS", {"ssast-tiny-naive": ("ssast", {"attention": "naive"})}
    )
    monkeypatch.setattr(efficiency, "QUICK_TOKENS", [16])
    monkeypatch.setenv("SSAMBA_BENCH_MEM_GB", str(1e-6))

    rows = efficiency.run(tmp_path, quick=True)

    naive = next(r for r in rows if r["model"] == "ssast-tiny-naive")
    assert naive["status"].startswith("skipped: predicted") and "> cap" in naive["status"]
    assert naive["ms"] is None


def test_slopes_fit_power_laws():
    rows = [
        {"model": "m", "mode": "inference", "batch": 1, "tokens": t, "status": "ok",
         "ms": 3.0 * t, "peak_mb": 0.5 * t**2}
        for t in (1024, 2048, 4096, 8192)
    ]  # fmt: skip

    (slope,) = efficiency.fit_slopes(rows, (2048, 32768))

    assert slope["points"] == 3
    assert slope["time_slope"] == pytest.approx(1.0)
    assert slope["memory_slope"] == pytest.approx(2.0)


def test_environment_keeps_a_subset_and_names_an_unknown_model(tiny_sweep, tmp_path, monkeypatch):
    monkeypatch.setattr(efficiency, "BATCHES", (1, 4))
    monkeypatch.setenv("SSAMBA_BENCH_MODELS", "ssamba-tiny")
    monkeypatch.setenv("SSAMBA_BENCH_MODES", "inference")
    monkeypatch.setenv("SSAMBA_BENCH_BATCHES", "4")

    rows = efficiency.run(tmp_path, quick=True)

    assert {(r["model"], r["mode"], r["batch"]) for r in rows} == {("ssamba-tiny", "inference", 4)}
    assert len(rows) == 2  # the two quick token counts
    monkeypatch.setenv("SSAMBA_BENCH_MODELS", "ssamba-tiny,ssast-huge")
    with pytest.raises(SystemExit, match="SSAMBA_BENCH_MODELS: unknown ssast-huge"):
        efficiency.run(tmp_path, quick=True)
