"""`advtune info`: what a run folder recorded (config, seed, versions, metrics, cost, summary, evaluations), read back
and told for a terminal (`format_info`); the run report prints the same account."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .. import filenames as files
from ..errors import AdvtuneError
from ..records import model_label
from ..storage import file_sha256, read_json
from .record import RunDir, open_run

log = logging.getLogger(__name__)


def run_info(path: str | os.PathLike) -> dict:
    """What a run recorded: config, seed, versions, per-epoch metrics, cost, summary, evaluations."""
    rd = open_run(path)
    info: dict[str, Any] = {"run": str(rd.path), "config": rd.read_json(files.CONFIG), "metrics": rd.read_metrics()}
    for name, key in ((files.COST, "cost"), (files.SUMMARY, "summary"), (files.MODEL_META, "model")):
        if rd.file(name).is_file():
            info[key] = rd.read_json(name)
    evals = sorted(rd.path.glob("eval-*.json"))
    if evals:
        info["evaluations"] = {}
        for p in evals:  # one damaged evaluation record does not hide the run (its model is fine)
            try:
                info["evaluations"][p.name] = read_json(p, p.name)
            except AdvtuneError as e:
                log.warning("%s; left out", e)
        info["stale_evaluations"] = _stale(rd, info["evaluations"])
    info["files"] = sorted(p.name for p in rd.path.iterdir() if not p.name.startswith("."))
    if info["config"].get("command") == "harden" and "summary" not in info:  # where an unfinished harden got to
        recipe = (info["config"].get("run") or {}).get("recipe") or {}
        info["stages"] = _stages(rd.path, probe=recipe.get("granularity", "probe") == "probe")
    sizes = {
        k: rd.file(n).stat().st_size
        for k, n in (("model", files.WEIGHTS), ("patch", files.PATCH))
        if rd.file(n).is_file()
    }
    if sizes:
        info["bytes"] = sizes
    return info


def _stale(rd: RunDir, evaluations: dict[str, Any]) -> list[str]:
    """The evaluations of this folder's model file that measured other bytes than it holds now (it trained on, or
    was replaced); a record of another run's model (harden's, an experiment's) is not judged."""
    weights = rd.file(files.WEIGHTS)
    now = file_sha256(weights)
    return [
        name
        for name, e in evaluations.items()
        if isinstance(e, dict)
        and isinstance(e.get("model_file"), str)
        and Path(e["model_file"]) == weights.resolve()
        and e.get("model_file_sha256") != now
    ]


def format_info(info: dict) -> str:
    """A human-readable account of a run for the terminal; a record of another shape (edited by hand, from
    another tool) is a one-line error, not a traceback."""
    try:
        return _info_lines(info)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise AdvtuneError(
            f"{info.get('run')}: a record has an unexpected shape ({type(e).__name__}: {e}); "
            "`advtune info --json` shows the raw records"
        ) from None


def _stages(path, probe: bool = True) -> str:
    """harden's stages in the order they run (the probe only for the probe rule), each finished, with its epochs so
    far, or not started; the analysis writes its folder when it ends, so the first stage without one may be running."""
    said = []
    names = [n for n in (files.ANALYSIS, files.PROBE, files.FINETUNE) if probe or n != files.PROBE]
    for i, name in enumerate(names):
        stage = path / name
        later = any((path / n).exists() for n in names[i + 1 :])
        if (stage / files.SUMMARY).is_file():
            said.append(f"{name} finished")
        elif (stage / files.METRICS).is_file():
            epochs = sum(1 for line in (stage / files.METRICS).read_text().splitlines() if line.strip())
            said.append(f"{name} unfinished ({epochs} epoch{'s' * (epochs != 1)} recorded)")
        elif stage.is_dir():
            said.append(f"{name} started")
        elif not later and (i == 0 or (path / names[i - 1] / files.SUMMARY).is_file()):
            said.append(f"{name} running or not started")
        else:
            said.append(f"{name} not started")
    last = (path / files.FINETUNE / files.SUMMARY).is_file()
    return ", ".join(said) + ("; then the evaluation before and after" if last else "")


def _info_lines(info: dict) -> str:
    cfg = info["config"]
    run = cfg.get("run", {})
    lines = [f"run        {info['run']}", f"command    {cfg.get('command')}   created {cfg.get('created', '?')}"]
    if not info.get("summary") and cfg.get("command") in ("train", "finetune", "harden"):  # read as a finished run
        lines.append("status     unfinished (no summary.json: interrupted or running): rerun its command with --resume")
        if info.get("stages"):
            lines.append(f"stages     {info['stages']}")
    if run:
        arch = run.get("model") or model_label(info.get("model")) or "?"
        data = run.get("dataset") or (cfg.get("dataset") or {}).get("name") or "?"
        base = f"   from {cfg['base']}" if cfg.get("base") else ""
        where = "".join(f"   {k} {cfg[k]}" for k in ("seed", "device") if cfg.get(k) is not None)  # apply has neither
        lines.append(f"model      {arch} on {data}{where}{base}")
    if cfg.get("objective"):
        lines.append(f"objective  {json.dumps(cfg['objective'])}")
    if run.get("train"):
        t = run["train"]
        keys = ("epochs", "batch_size", "optimizer", "lr", "schedule", "weight_decay")
        length = []
        if cfg.get("steps"):  # a --budget's steps decide the length: its epochs said nothing (finetune showed 1)
            budget = f" (--budget {run['budget']:,} gradient evaluations)" if run.get("budget") else ""
            keys, length = keys[1:], [f"steps={cfg['steps']}{budget}"]
        ran, s = (info.get("summary") or {}).get("epochs"), info.get("summary") or {}  # a resume may change the length
        if "epochs" in keys and isinstance(ran, int) and ran != t.get("epochs") and not s.get("stopped"):
            t = {**t, "epochs": f"{ran} (config.json: {t.get('epochs')}; resumed with another length)"}
        lines.append("training   " + ", ".join(length + [f"{k}={t[k]}" for k in keys if k in t]))
    sel = cfg.get("selection")
    if isinstance(sel, dict) and sel.get("trainable_params") is not None:  # a fine-tuning: what it trained
        what = sel.get("kind") or run.get("granularity") or "units"
        lines.append(
            f"selection  --select {run.get('select')} ({what}): {sel['trainable_params']:,} trainable parameters "
            f"({100 * (sel.get('param_share') or 0):.2f}% of the model)"
        )
    size = info.get("bytes", {})
    if "model" in size:
        patch = (
            f"   patch {size['patch']:,} bytes ({100 * size['patch'] / max(size['model'], 1):.1f}% of the model: "
            "advtune apply BASE patch.safetensors)"
            if "patch" in size
            else ""
        )
        lines.append(f"files      model {size['model']:,} bytes{patch}")
    v = cfg.get("versions", {})
    dirty = " (+ uncommitted changes)" if v.get("git_dirty") else ""
    named = ", ".join(f"{k} {v[k]}" for k in ("advtune", "torch", "python", "git_sha") if k in v)
    lines.append(f"versions   {named}{dirty}")
    for row in info.get("metrics", []):
        lines.append(
            "epoch "
            + "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch"
            ).join([f"{row.get('epoch')}: ", ""])
        )
    s = info.get("summary", {})
    if "test_acc" in s:
        lines.append(
            f"test acc   {100 * s['test_acc']:.2f}% on {s['test_examples']} examples"
            + (f"   ({s['stopped']})" if s.get("stopped") else "")
        )
    if s.get("pgd10_acc_quick") is not None:  # a fine-tuning's quick monitor: shown at its end, lost here before
        lines.append(
            f"quick PGD  {100 * s['pgd10_acc_quick']:.2f}% under PGD-10 on {s.get('pgd10_examples')} test examples "
            "(a monitor, not the claim: advtune evaluate --suite standard)"
        )
    if isinstance(s.get("checkpoints"), dict) and "before" not in s:  # --keep-best: the epoch lines show the last
        c = s["checkpoints"]
        lines.append(
            f"kept       step {c.get('chosen_step') or 'last'} of {len(c.get('curve') or [])} held-out points (best "
            f"{c.get('attack')} on {c.get('examples')} held-out images), choosing cost {c.get('grad_evals', 0):,} "
            "gradient evaluations"
        )
    if "before" in s and "after" in s:  # a harden run
        lines.append(
            f"harden     {s.get('norm')} eps={s.get('eps')}: robust {100 * s['before']['robust_acc']:.2f}% -> "
            f"{100 * s['after']['robust_acc']:.2f}%, clean {100 * s['before']['clean_acc']:.2f}% -> "
            f"{100 * s['after']['clean_acc']:.2f}% on {s.get('test_examples')} test examples; trained "
            f"{s.get('trainable_params') or 0:,} parameters ({100 * (s.get('param_share') or 0):.2f}%)"
            + (f"; !! masking gate SUSPECT: {'; '.join(s['after']['suspect'])}" if s["after"].get("suspect") else "")
        )
        hc = s.get("cost") if isinstance(s.get("cost"), dict) else {}
        if hc.get("harden_grad_evals") is not None:  # the whole run's cost; cost.json is its fine-tuning stage's
            base = hc.get("base_training_grad_evals")
            wall = sum(hc.get(k) or 0 for k in ("analysis_wall_s", "finetune_wall_s", "checkpoint_wall_s"))
            lines.append(
                f"harden cost {hc['harden_grad_evals']:,} grad evals (analysis {hc.get('analysis_grad_evals', 0):,}, "
                f"fine-tuning {hc.get('finetune_grad_evals', 0):,}, checkpoint choice "
                f"{hc.get('checkpoint_grad_evals') or 0:,}), wall {wall:.1f}s; the base's training "
                + (f"{base:,} more" if base is not None else "unrecorded")
            )
    if "adv_acc" in s:  # an analysis run
        lines.append(
            f"analysis   {s['examples_scored']} training examples: clean {100 * s['clean_acc']:.2f}%, "
            f"under {s['attack']} {100 * s['adv_acc']:.2f}%; criteria: {', '.join(s.get('criteria', {}))}"
        )
    if info.get("cost", {}).get("wall_s") is not None:
        c = info["cost"]
        gpe = c.get("grad_evals_per_example")
        stage = "fine-tuning stage: " if "before" in s and "after" in s else ""
        lines.append(
            f"cost       {stage}wall {c['wall_s']:.1f}s, grad evals {c['grad_evals']:,}"
            + (f" ({gpe:.2f}/example)" if gpe else "")
            + f", FLOPs {c['flops']:.3g}, trainable params {c['trainable_params']:,}/{c['total_params']:,}, "
            f"peak memory {c['peak_memory_bytes'] / 2**20:.0f} MiB"
        )
    stale = info.get("stale_evaluations", [])
    for name, ev in info.get("evaluations", {}).items():
        earlier = f" (measured on earlier weights: {files.WEIGHTS} changed since; evaluate again)"
        lines.append(f"eval       {name}: " + _eval_line(ev) + (earlier if name in stale else ""))
    lines.append("files      " + ", ".join(info.get("files", [])))
    return "\n".join(lines)


def _eval_line(ev: dict) -> str:
    parts = []
    threat = next((t for t in (ev.get("threat"), ev.get("config")) if isinstance(t, dict)), {})
    eps = threat.get("eps")
    if threat.get("norm") and isinstance(eps, (int, float)) and not isinstance(eps, bool):  # a single evaluation
        parts.append(f"{threat['norm']} eps={threat['eps']:.4g}")
    elif threat.get("norm"):  # a curve: its eps come with each point
        parts.append(str(threat["norm"]))
    if "clean_accuracy" in ev:
        parts.append(f"clean {100 * ev['clean_accuracy']:.2f}%")
    if "worst_case_accuracy" in ev:
        parts.append(f"worst case {100 * ev['worst_case_accuracy']:.2f}% over {', '.join(ev.get('attacks', []))}")
        n = ev.get("examples") or ev.get("n")  # 100 and 1000 images looked alike
        parts[-1] += f" on {n} test images" if n else ""
    elif "eps" in ev and "accuracy" in ev:
        parts.append("curve " + ", ".join(f"eps {e:g}: {100 * a:.1f}%" for e, a in zip(ev["eps"], ev["accuracy"])))
    if ev.get("suspect"):
        parts.append("SUSPECT: " + "; ".join(ev["suspect"]))
    elif ev.get("gated") is False:  # no word is no pass where the gate did not run
        parts.append("masking gate not run")
    return ", ".join(parts) or "(see file)"
