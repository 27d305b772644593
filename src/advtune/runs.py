"""Runs are records: `runs/<name>/` holds config.json (resolved config, seed, versions), metrics.jsonl,
cost.json, summary.json and artifacts (model.safetensors + model.json, checkpoint.pt), all written
atomically. `train_run` is the one recipe behind `advtune train` (and, later, finetune/experiment)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .cost import CostMeter
from .errors import AdvtuneError
from .utils import atomic_write_json, atomic_write_text, read_json, resolve_device, seed_everything, to_jsonable, versions

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

# ---------------------------------------------------------------- the train recipe


@dataclass(frozen=True)
class TrainRun:
    """Everything `advtune train` needs; recorded verbatim in config.json."""

    dataset: str
    model: str
    out: str
    train: "Any" = None                  # TrainConfig (default: TrainConfig())
    data_dir: str | None = None
    limit: int | None = None
    limit_test: int | None = None
    val: float = 0
    device: str = "auto"
    adversarial: str | None = None      # attack spec for adversarial training, e.g. "pgd:steps=10"
    norm: str = "linf"
    eps: float | None = None
    attack_mode: str = "eval"
    resume: bool = False
    overwrite: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_json()
        return d


def train_run(run: TrainRun) -> dict:
    """Train a model by name on a dataset by name into `run.out`; returns the summary record."""
    from .data import load_dataset
    from .models import describe_meta, model_for, save_model
    from .train import TrainConfig, accuracy, adversarial, clean, fit

    run = replace(run, train=run.train or TrainConfig())
    cfg = run.train
    rd = RunDir.create(run.out, resume=run.resume, overwrite=run.overwrite)
    if run.resume and rd.file(CONFIG).is_file():
        _check_same_run(rd.read_json(CONFIG).get("run", {}), run.to_json())
    device = resolve_device(run.device)
    seed_everything(cfg.seed)
    ds = load_dataset(run.dataset, run.data_dir, limit=run.limit, limit_test=run.limit_test, val=run.val,
                      seed=cfg.seed or 0)
    model = model_for(ds, run.model).to(device)
    objective, val_attack = clean(), None
    if run.adversarial:
        attack = _attack(run.adversarial, run.norm, run.eps)
        objective, val_attack = adversarial(attack, run.attack_mode), attack
    rd.write_config({"command": "train", "run": run.to_json(), "seed": cfg.seed, "dataset": ds.describe(),
                     "objective": objective.describe(), "device": str(device)})
    meter = CostMeter()
    history = fit(model, ds.train, objective, cfg, val=ds.val, val_attack=val_attack, meter=meter,
                  checkpoint_dir=rd.path, resume=run.resume,
                  on_record=lambda h: (rd.write_metrics(h.epochs), rd.write_cost(meter)),
                  desc=f"{run.model}/{ds.name}")
    test_acc = accuracy(model, ds.test, cfg.eval_batch_size, meter)
    summary = {"test_acc": test_acc, "test_examples": len(ds.test), "epochs": len(history.epochs),
               "stopped": history.stopped, "final": history.last, "cost": meter.to_json()}
    meta = describe_meta(run.model, ds)
    meta["training"] = {"objective": objective.describe(), "config": cfg.to_json(), "test_acc": test_acc,
                        "run": str(rd.path)}
    save_model(rd.path, model, meta)
    rd.write_metrics(history.epochs)
    rd.write_cost(meter)
    rd.write_json(SUMMARY, summary)
    return summary


def _attack(spec: str, norm: str, eps: float | None):
    from .attacks import build_attack
    from .threat import ThreatModel

    if eps is None:
        raise AdvtuneError("adversarial training needs --eps (e.g. --eps 0.3 for MNIST, --eps 8/255 for CIFAR-10)")
    return build_attack(spec, ThreatModel(norm, eps))


def _check_same_run(saved: dict, now: dict) -> None:
    ignore = {"resume", "overwrite", "device"}
    changed = [k for k in now if k not in ignore and k != "train" and saved.get(k) != now[k]]
    if changed:
        raise AdvtuneError(f"--resume with different settings ({', '.join(f'{k}: {saved.get(k)!r} -> {now[k]!r}' for k in changed)}); "
                           "use the original flags or a new --out")

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
        lines.append(f"model      {run.get('model')} on {run.get('dataset')}   seed {cfg.get('seed')}   device {cfg.get('device')}")
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
    if "summary" in info:
        s = info["summary"]
        lines.append(f"test acc   {100 * s['test_acc']:.2f}% on {s['test_examples']} examples" + (f"   ({s['stopped']})" if s.get("stopped") else ""))
    if "cost" in info:
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
    if "clean_acc" in ev:
        parts.append(f"clean {100 * ev['clean_acc']:.2f}%")
    if "robust_acc" in ev:
        parts.append(f"robust {100 * ev['robust_acc']:.2f}%")
    if ev.get("suspect"):
        parts.append("SUSPECT: " + "; ".join(ev["suspect"]))
    return ", ".join(parts) or "(see file)"
