"""Runs are records: `runs/<name>/` holds config.json (resolved config, seed, versions), metrics.jsonl,
cost.json, summary.json and artifacts (model.safetensors + model.json, checkpoint.pt), all written
atomically. The jobs that fill them live in jobs.py."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .cost import CostMeter
from .errors import AdvtuneError
from .utils import atomic_write_json, atomic_write_text, read_json, to_jsonable, versions

log = logging.getLogger(__name__)

CONFIG, METRICS, COST, SUMMARY = "config.json", "metrics.jsonl", "cost.json", "summary.json"


class RunDir:
    """A run's folder. Creating one refuses to clobber: an existing non-empty folder needs
    resume=True (continue it) or overwrite=True (replace it, only if it is an advtune run)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> "RunDir":
        run = cls(path)
        p = run.path
        if p.exists() and not p.is_dir():
            raise AdvtuneError(f"output path {p} exists and is a file; pick another --out")
        if p.is_dir() and any(p.iterdir()):
            if resume:
                if not (p / CONFIG).is_file():
                    raise AdvtuneError(f"--resume: {p} is not an advtune run (no {CONFIG}); pick the run folder")
            elif overwrite:
                if not (p / CONFIG).is_file():
                    raise AdvtuneError(f"--overwrite: {p} is not an advtune run (no {CONFIG}); refusing to delete it")
                shutil.rmtree(p)
            else:
                raise AdvtuneError(f"output folder {p} already exists; pass --resume to continue it or --overwrite to replace it")
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise AdvtuneError(f"cannot write to output folder {p} ({e.strerror}); pick a writable --out") from None
        return run

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return read_json(self.path / name, name)

    def write_config(self, config: dict) -> None:
        record = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **config, "versions": versions()}
        self.write_json(CONFIG, record)

    def write_metrics(self, rows: list[dict]) -> None:
        atomic_write_text(self.path / METRICS, "".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))

    def read_metrics(self) -> list[dict]:
        p = self.path / METRICS
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def write_cost(self, meter: CostMeter) -> None:
        self.write_json(COST, meter.to_json())


def open_run(path: str | os.PathLike) -> RunDir:
    """An existing run folder, or a one-line error saying what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise AdvtuneError(f"run folder {p} not found; pass the --out folder of an earlier `advtune train`")
    if not (p / CONFIG).is_file():
        raise AdvtuneError(f"{p} is not an advtune run (no {CONFIG})")
    return RunDir(p)

# ---------------------------------------------------------------- info


def run_info(path: str | os.PathLike) -> dict:
    """What a run recorded: config, seed, versions, per-epoch metrics, cost, summary, evaluations."""
    rd = open_run(path)
    info: dict[str, Any] = {"run": str(rd.path), "config": rd.read_json(CONFIG), "metrics": rd.read_metrics()}
    for name, key in ((COST, "cost"), (SUMMARY, "summary"), ("model.json", "model")):
        if rd.file(name).is_file():
            info[key] = rd.read_json(name)
    evals = sorted(rd.path.glob("eval-*.json"))
    if evals:
        info["evaluations"] = {p.name: read_json(p, p.name) for p in evals}
    info["files"] = sorted(p.name for p in rd.path.iterdir() if not p.name.startswith("."))
    return info


def format_info(info: dict) -> str:
    """A human-readable account of a run for the terminal."""
    cfg = info["config"]
    run = cfg.get("run", {})
    lines = [f"run        {info['run']}", f"command    {cfg.get('command')}   created {cfg.get('created', '?')}"]
    if run:
        arch = run.get("model") or info.get("model", {}).get("architecture") or "?"
        data = run.get("dataset") or (cfg.get("dataset") or {}).get("name") or "?"
        base = f"   from {cfg['base']}" if cfg.get("base") else ""
        lines.append(f"model      {arch} on {data}   seed {cfg.get('seed')}   device {cfg.get('device')}{base}")
    if cfg.get("objective"):
        lines.append(f"objective  {json.dumps(cfg['objective'])}")
    if run.get("train"):
        t = run["train"]
        lines.append("training   " + ", ".join(f"{k}={t[k]}" for k in ("epochs", "batch_size", "optimizer", "lr", "schedule", "weight_decay")))
    v = cfg.get("versions", {})
    lines.append("versions   " + ", ".join(f"{k} {v[k]}" for k in ("advtune", "torch", "python", "git_sha") if k in v))
    for row in info.get("metrics", []):
        lines.append("epoch " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch")
                     .join([f"{row.get('epoch')}: ", ""]))
    s = info.get("summary", {})
    if "test_acc" in s:
        lines.append(f"test acc   {100 * s['test_acc']:.2f}% on {s['test_examples']} examples" + (f"   ({s['stopped']})" if s.get("stopped") else ""))
    if "before" in s and "after" in s:  # a harden run
        lines.append(f"harden     {s.get('norm')} eps={s.get('eps')}: robust {100 * s['before']['robust_acc']:.2f}% -> "
                     f"{100 * s['after']['robust_acc']:.2f}%, clean {100 * s['before']['clean_acc']:.2f}% -> "
                     f"{100 * s['after']['clean_acc']:.2f}% on {s.get('test_examples')} test examples; trained "
                     f"{s.get('trainable_params') or 0:,} parameters ({100 * (s.get('param_share') or 0):.2f}%)")
    if "adv_acc" in s:  # an analysis run
        lines.append(f"analysis   {s['examples_scored']} training examples: clean {100 * s['clean_acc']:.2f}%, "
                     f"under {s['attack']} {100 * s['adv_acc']:.2f}%; criteria: {', '.join(s.get('criteria', {}))}")
    if info.get("cost", {}).get("wall_s") is not None:
        c = info["cost"]
        gpe = c.get("grad_evals_per_example")
        lines.append(f"cost       wall {c['wall_s']:.1f}s, grad evals {c['grad_evals']:,}" + (f" ({gpe:.2f}/example)" if gpe else "")
                     + f", FLOPs {c['flops']:.3g}, trainable params {c['trainable_params']:,}/{c['total_params']:,}, "
                     f"peak memory {c['peak_memory_bytes'] / 2**20:.0f} MiB")
    for name, ev in info.get("evaluations", {}).items():
        lines.append(f"eval       {name}: " + _eval_line(ev))
    lines.append("files      " + ", ".join(info.get("files", [])))
    return "\n".join(lines)


def _eval_line(ev: dict) -> str:
    parts = []
    if "clean_accuracy" in ev:
        parts.append(f"clean {100 * ev['clean_accuracy']:.2f}%")
    if "worst_case_accuracy" in ev:
        parts.append(f"worst case {100 * ev['worst_case_accuracy']:.2f}% over {', '.join(ev.get('attacks', []))}")
    elif "eps" in ev and "accuracy" in ev:
        parts.append("curve " + ", ".join(f"eps {e:g}: {100 * a:.1f}%" for e, a in zip(ev["eps"], ev["accuracy"])))
    if ev.get("suspect"):
        parts.append("SUSPECT: " + "; ".join(ev["suspect"]))
    return ", ".join(parts) or "(see file)"
