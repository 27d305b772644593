"""advtune installed as a wheel rather than run from its checkout: it never records another repository's commit as
its own nor searches the environment's folders for data, and the source distribution carries what the tests read."""

from __future__ import annotations

import subprocess
from pathlib import Path

from advtune import provenance
from advtune.data import loading

ROOT = Path(__file__).resolve().parents[1]


def _fake_module(monkeypatch, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    monkeypatch.setattr(provenance, "__file__", str(path))


def test_an_installed_copy_inside_another_repository_records_no_commit(tmp_path, monkeypatch):
    repo = tmp_path / "their-project"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "pyproject.toml").write_text('[project]\nname = "theirs"\n')
    # pip install --target vendor: advtune/ sits two levels under their repository's root, as src/advtune does here
    _fake_module(monkeypatch, repo / "vendor" / "advtune" / "provenance.py")
    assert provenance.checkout_root() is None and provenance.git_sha() is None
    assert "git_sha" not in provenance.versions()
    _fake_module(monkeypatch, repo / "src" / "advtune" / "provenance.py")  # a src layout, but not advtune's
    assert provenance.checkout_root() is None and provenance.git_sha() is None


def test_an_installed_copy_searches_for_data_only_where_it_is_run(tmp_path, monkeypatch):
    env = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (tmp_path / "venv" / "lib" / "shared" / "data").mkdir(parents=True)  # a neighbour of the environment's folders
    _fake_module(monkeypatch, env / "advtune" / "provenance.py")
    work = tmp_path / "work" / "job"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("ADVTUNE_DATA", raising=False)
    assert [r for r in loading.search_roots() if "shared" in r.parts] == []
    (tmp_path / "work" / "shared" / "data").mkdir(parents=True)  # ../shared/data beside where it runs: searched
    assert tmp_path / "work" / "shared" / "data" in loading.search_roots()


def test_the_checkout_is_recognised_as_advtunes():
    assert provenance.checkout_root() == ROOT


def test_the_source_distribution_carries_what_the_tests_read_and_the_license():
    lines = [line.split() for line in (ROOT / "MANIFEST.in").read_text().splitlines() if not line.startswith("#")]
    assert {("graft", folder) for folder in ("configs", "docs", "bench")} <= {tuple(w) for w in lines}
    assert {"constraints.txt", "LICENSE"} <= {w for line in lines if line[:1] == ["include"] for w in line}
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert 'license-files = ["LICENSE"]' in (ROOT / "pyproject.toml").read_text()
