"""The HTML report renders in a real headless browser (Debian's chromium), when one is installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from advtune.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def fake_experiment(folder):
    """A results.json as `advtune experiment` writes it (two variants), without training anything."""
    import json

    rows = [
        {
            "variant": "standard",
            "kind": "standard",
            "eps": 0.3,
            "clean_acc": 0.99,
            "robust_acc": 0.0,
            "acc[pgd]": 0.0,
            "suspect": "",
            "grad_evals": 120000,
            "analysis_grad_evals": 0,
            "wall_s": 40.0,
            "flops": 1e12,
            "trainable_params": 421642,
            "total_params": 421642,
            "stopped": None,
            "eval_examples": 100,
        },
        {
            "variant": "selective-10",
            "kind": "finetune",
            "select": "top",
            "share": 0.1,
            "eps": 0.3,
            "clean_acc": 0.97,
            "robust_acc": 0.61,
            "acc[pgd]": 0.61,
            "suspect": "",
            "grad_evals": 66000,
            "analysis_grad_evals": 5000,
            "wall_s": 30.0,
            "flops": 2e12,
            "trainable_params": 40000,
            "total_params": 421642,
            "stopped": None,
            "eval_examples": 100,
        },
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"rows": rows}))
    return rows


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    fake_experiment(tmp_path / "exp")
    paths = write_report(tmp_path / "exp")
    url = paths["html"].resolve().as_uri()
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-500:]
    assert "<td>selective-10</td>" in dom.stdout and "<td>61.00%</td>" in dom.stdout
    shot = tmp_path / "shot.png"
    r = subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and shot.stat().st_size > 20_000  # a page with a table and plots, not a blank one
