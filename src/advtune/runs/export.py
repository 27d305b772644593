"""`advtune export RUN --format onnx|safetensors|pt --out FILE`: the model of a run for serving.

safetensors and pt hold exactly the state_dict of the model's own module (the keys its strict
`load_state_dict` expects; for a zoo model the `Normalize` first layer is part of it), loadable without
advtune. ONNX (the `onnx` extra) is checked before it is called good: onnxruntime runs the exported
file on the run's test images, clean and under the run's attack, and its logits are compared with
PyTorch's (max abs difference, agreement of the predicted classes); the check is written next to the
file (`FILE.check.json`), and an export that disagrees is refused and not written. The model takes
pixels in [0, 1], as the evaluation did: the normalisation travels inside it."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save

from .. import filenames as files
from ..attacks import build_attack
from ..devices import model_device, resolve_device
from ..errors import AdvtuneError
from ..metrics import adversarial_examples
from ..provenance import versions
from ..registry import parse_spec
from ..settings import default
from ..storage import atomic_write_bytes, atomic_write_json
from ..threat import ThreatModel
from ..train.objectives import OBJECTIVES
from ..weights import storable_state
from .common import dataset_of, load_base
from .configs import SUFFIX_FORMATS, ExportRun
from .record import is_advtune_run

log = logging.getLogger(__name__)

CHECK_SUFFIX = ".check.json"  # FILE.check.json: the ONNX check of FILE
# a run folder's own records: an export never replaces them
RUN_RECORDS = (files.CONFIG, files.METRICS, files.COST, files.SUMMARY, files.WEIGHTS, files.MODEL_META)
RUN_RECORDS += (files.CHECKPOINT, files.SELECTION, files.PATCH, files.REPORT_HTML, files.REPORT_MD, files.CONCENTRATION)
CHECK_SETTINGS = ("eps", "attack", "norm", "limit_test", "batch_size", "data_dir", "seed")  # the ONNX check's
TOLERANCE = 1e-4  # max |logit difference| allowed, relative to the logits' scale (float32 kernels differ)


def run(run: ExportRun) -> dict:
    """Export the model of `run.run` to `run.out`; returns the export record (with the check for ONNX)."""
    out = Path(run.out)
    if out.is_dir():
        raise AdvtuneError(f"--out {out} is a folder; name the file to write, e.g. {out / 'model.onnx'}")
    folder = out.resolve().parent  # this run's, or any run's (--overwrite replaced another run's model.safetensors)
    if (folder == Path(run.run).resolve() or is_advtune_run(folder)) and (
        out.name in RUN_RECORDS or out.name.startswith("eval-")
    ):
        raise AdvtuneError(f"--out {out} is one of the run's own records; write the export to another file")
    run = replace(run, format=export_format(run.format, out))
    if out.exists() and not run.overwrite:
        raise AdvtuneError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    bs = run.batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise AdvtuneError(f"--batch-size must be a positive number of examples per batch, got {bs!r}")
    if run.format == "onnx":
        onnx_runtime()  # the extra is installed: checked before any work
        if run.attack and parse_spec(run.attack, "attack")[0] in OBJECTIVES:  # it was replaced by PGD without a word
            raise AdvtuneError(
                f"--attack {run.attack}: a training objective, not an attack; give an attack (e.g. pgd:steps=10) or "
                "leave --attack out"
            )
    else:  # the check's settings: only ONNX is checked against the run; elsewhere they were dropped without a word
        given = [f for f in CHECK_SETTINGS if getattr(run, f) != default(ExportRun, f)]
        if given:
            flags = " ".join("--" + f.replace("_", "-") for f in given)
            raise AdvtuneError(f"{flags}: settings of the ONNX check, which a {run.format} export has not; drop them")
    device = resolve_device(run.device)
    model, meta, base_cfg = load_base(run.run, device)
    model.eval()
    state = storable_state(model.state_dict())  # tied weights each stored on their own, as save_model stores them
    record = {"run": str(run.run), "format": run.format, "file": str(out), "tensors": len(state)}
    if run.format == "safetensors":
        atomic_write_bytes(out, save(state, metadata={"format": "pt"}))
    elif run.format == "pt":
        buf = io.BytesIO()
        torch.save(state, buf)  # plain tensors: torch.load(..., weights_only=True) reads it
        atomic_write_bytes(out, buf.getvalue())
    else:
        record["check"] = _export_onnx(model, meta, base_cfg, run, out)
    stale = [out.with_name(out.name + ".check-failed.json")]  # a refusal's numbers: this file passed, or is no ONNX
    stale += [out.with_name(out.name + CHECK_SUFFIX)] if run.format != "onnx" else []  # would vouch for this file
    for path in stale:
        if path.is_file():
            path.unlink()
    record["bytes"] = out.stat().st_size
    return record


def export_format(fmt: str | None, out: Path) -> str:
    """--format, or the one --out's suffix names (onnx for any other suffix); a format another suffix contradicts is
    refused (a pickle named .safetensors fails every reader that trusts the name)."""
    named = SUFFIX_FORMATS.get(out.suffix.lower())
    if fmt is None:
        return named or "onnx"
    if named is not None and named != fmt:
        raise AdvtuneError(
            f"--format {fmt} and --out {out.name} disagree (its suffix says {named}): name the file {out.stem}"
            f"{'.pt' if fmt == 'pt' else '.' + fmt}, or drop --format to write {named}"
        )
    return fmt


def onnx_runtime():
    """onnxruntime (and onnx), or a one-line error naming the extra to install."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise AdvtuneError(
            "ONNX export needs the onnx extra: pip install 'advtune[onnx]' (onnx, onnxruntime)"
        ) from None
    return onnxruntime


def _threat_and_attack(run: ExportRun, base_cfg: dict) -> tuple[ThreatModel, str]:
    """The check's adversarial inputs: the flags, else what the run recorded (its eps, norm, attack)."""
    saved = base_cfg.get("run", {})
    if saved.get("eps") is None and isinstance(base_cfg.get("patch_info"), dict):
        saved = base_cfg["patch_info"]  # a folder `advtune apply` wrote: the hardening run's own, from its patch
    recipe = saved.get("recipe") or {}
    recipe = recipe if isinstance(recipe, dict) else {}
    eps = run.eps if run.eps is not None else saved.get("eps")
    if eps is None:
        raise AdvtuneError(f"{run.run} records no eps (a standard run?); give --eps for the check's adversarial inputs")
    attack = run.attack or recipe.get("attack") or saved.get("attack") or saved.get("adversarial") or "pgd:steps=10"
    if parse_spec(attack, "attack")[0] in OBJECTIVES:
        attack = "pgd:steps=10"  # a training objective (trades, distill, awp, local), not an attack: the check uses PGD
    return ThreatModel(run.norm or saved.get("norm") or "linf", float(eps)), attack


def _export_onnx(model, meta: dict, base_cfg: dict, run: ExportRun, out: Path) -> dict:
    ort = onnx_runtime()
    threat, spec = _threat_and_attack(run, base_cfg)
    attack = build_attack(spec, threat)
    ds = dataset_of(base_cfg, meta, run.data_dir, limit=1, limit_test=run.limit_test)
    x, y = ds.test.tensors(model_device(model))
    # exported and checked in a private folder: --out is written (atomically, with the usual permissions) only
    # once the check passed, and a refusal leaves nothing behind
    with tempfile.TemporaryDirectory(prefix="advtune-export-") as scratch:
        tmp = Path(scratch) / "model.onnx"
        _to_onnx(model.cpu(), x[:2].cpu(), tmp)
        model.to(x.device)
        try:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime's errors derive from Exception only)
            raise AdvtuneError(
                f"onnxruntime cannot load the exported model ({type(e).__name__}: {_first_line(e)}); export --format "
                "safetensors and convert it with your serving stack's tools"
            ) from None
        t0 = time.perf_counter()
        x_adv = adversarial_examples(model, attack, x, y, run.batch_size, run.seed)
        try:
            clean, adversarial = (
                _compare(model, session, x, run.batch_size),
                _compare(model, session, x_adv, run.batch_size),
            )
        except Exception as e:  # noqa: BLE001
            raise AdvtuneError(
                f"the check could not compare PyTorch and onnxruntime on the exported model ({type(e).__name__}: "
                f"{_first_line(e)}); export --format safetensors and convert it with your serving stack's tools"
            ) from None
        check = {
            "examples": len(x),
            "attack": attack.spec,
            "threat": threat.to_json(),
            "seed": run.seed,
            "batch_size": run.batch_size,
            "dataset": base_cfg.get("dataset"),
            "clean": clean,
            "adversarial": adversarial,
            "tolerance": TOLERANCE,
            "versions": {**versions(), "onnxruntime": ort.__version__},
        }
        check["check_wall_s"] = time.perf_counter() - t0
        check["ok"] = clean["ok"] and adversarial["ok"]
        if not check["ok"]:  # the numbers are kept for the report; the model file is not written
            bad = clean if not clean["ok"] else adversarial
            failed = out.with_name(out.name + ".check-failed.json")
            atomic_write_json(failed, {"run": str(Path(run.run).resolve()), "file": None, **check})
            raise AdvtuneError(
                f"the ONNX export disagrees with PyTorch (max |logit difference| {bad['max_abs_diff']:.2e}, "
                f"{bad['disagreements']} predictions differ); not written: report this model with its run and "
                f"{failed}"
            )
        data = tmp.read_bytes()
    atomic_write_bytes(out, data)
    record = {
        "run": str(Path(run.run).resolve()),
        "file": str(out.resolve()),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write_json(out.with_name(out.name + CHECK_SUFFIX), {**record, **check})
    return check


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _to_onnx(model, example: torch.Tensor, path: Path) -> None:
    """torch's TorchScript exporter (fast, no extra packages), then its dynamo exporter; one line when
    neither can export the model. The batch dimension stays dynamic."""
    errors = []
    takes_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters  # torch >= 2.5
    for dynamo in (False, True) if takes_dynamo else (None,):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                kw = (
                    {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
                    if dynamo
                    else {"dynamic_axes": {"pixels": {0: "batch"}, "logits": {0: "batch"}}}
                )
                if dynamo is not None:
                    kw["dynamo"] = dynamo
                torch.onnx.export(model, (example,), str(path), input_names=["pixels"], output_names=["logits"], **kw)
            return
        except OSError as e:  # the scratch folder's disk, not the model
            raise AdvtuneError(
                f"cannot write the ONNX file ({e.strerror or e}); free disk space in the temp folder"
            ) from None
        except Exception as e:  # noqa: BLE001  (an exporter's failure is a message for the user)
            errors.append(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}")
    raise AdvtuneError(
        f"ONNX cannot export this model ({errors[-1]}); export --format safetensors and convert it with your "
        "serving stack's tools"
    )


@torch.no_grad()
def _compare(model, session, x: torch.Tensor, batch_size: int) -> dict:
    """PyTorch's and onnxruntime's logits on x: the largest difference and the predicted classes.
    A prediction whose top-2 margin is within the difference is a tie, not a disagreement."""
    diffs, disagree, ties, scale = [], 0, 0, 1.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        ref = model(xb).float().cpu()
        got = torch.from_numpy(session.run(None, {"pixels": xb.cpu().numpy()})[0]).float()
        d = (ref - got).abs().max(dim=1).values
        top2 = ref.topk(2, dim=1).values
        tie = (top2[:, 0] - top2[:, 1]) <= 2 * d
        differ = ref.argmax(1) != got.argmax(1)
        disagree += int((differ & ~tie).sum())
        ties += int((differ & tie).sum())
        diffs.append(d)
        scale = max(scale, float(ref.abs().max()))
    max_diff = float(torch.cat(diffs).max()) if diffs else 0.0
    agreement = 1 - (disagree + ties) / max(len(x), 1)
    return {
        "max_abs_diff": max_diff,
        "agreement": agreement,
        "disagreements": disagree,
        "ties": ties,
        "ok": max_diff <= TOLERANCE * scale and disagree == 0,
    }
