"""Every job's settings as a frozen dataclass: `TrainRun`, `FinetuneRun`, `AnalyzeRun`, `EvaluateRun`,
`HardenRun`, `DemoConfig` (the experiment's settings are its YAML). Their fields are the CLI's flags
and the keys a record stores; each job module (train.py, ...) holds the `run(config)` that carries
one out. This module imports no torch, so `advtune <command> --help` answers at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..recipe import EVALUATION, GRANULARITIES, HEAD_HELP, PROBE_SHARE, Recipe
from ..settings import budget_number, grad_evals_number, number, setting
from ..train.config import TrainConfig

# ---------------------------------------------------------------- settings several jobs share
# One declaration each (help, type, default); a job only says which help group shows it.


def eps_setting(group: str | None = None):
    return setting(None, help="perturbation budget in pixel units, e.g. 0.3 or 8/255", type=number, group=group)


def norm_setting(group: str | None = None):
    return setting("linf", help="threat model norm", choices=("linf", "l2"), group=group)


def device_setting():
    return setting("auto", help="auto | cpu | cuda | cuda:<i>", cli=False)  # the shared --device


def seed_setting():
    return setting(0, help="random seed", cli=False)  # the shared --seed


def data_dir_setting(group: str | None = None):
    """Where a new run's dataset is found."""
    return setting(
        None, help="folder holding <dataset>/ (default: $ADVTUNE_DATA, cache, ../shared/data, download)", group=group
    )


def base_data_dir_setting(group: str | None = None):
    """Where the dataset of the run a job starts from is found."""
    return setting(
        None,
        help="folder holding <dataset>/ (default: the base run's, $ADVTUNE_DATA, cache, ../shared/data)",
        group=group,
    )


def limit_setting(group: str | None = "data"):
    return setting(None, help="use only the first N training examples", group=group)


def limit_test_setting(group: str | None = "data"):
    return setting(None, help="use only the first N test examples", group=group)


def val_setting():
    return setting(
        0, help="hold out N training examples (or a fraction < 1) for validation", type=number, group="training"
    )


def budget_setting():
    return setting(
        None,
        help="train for this many gradient evaluations (attack steps + update, per example) instead of --epochs "
        "(whole optimizer steps: the last one may pass it by up to a batch's cost)",
        type=grad_evals_number,
        group="training",
    )


def points_setting():
    return setting(0, help="save this many snapshots along the run under snapshots/", group="training")


def keep_best_setting(default: int = 0, group: str | None = "training"):
    return setting(
        default,
        help="measure this many checkpoints after the eps ramp on the held-out split (PGD-10, robust accuracy) and "
        "keep the best, not the last (robust overfitting); 0: keep the last",
        group=group,
    )


def eps_warmup_setting(group: str, probe: bool = False):
    with_probe = "; with --granularity probe 0.15 for every attack, so the ramp ends inside the probe" if probe else ""
    return setting(
        None,
        help="share of training over which eps ramps up from 0 "
        f"(default: 0.3, the ramp every recipe here needed, TRADES: off{with_probe}; 0: off)",
        type=number,
        group=group,
    )


def out_setting():
    return setting(help="run folder to write (runs/<name>)", group="output")


def resume_setting(group: str | None = "output", help: str = "continue an interrupted run in --out"):
    return setting(False, help=help, group=group)


def overwrite_setting(group: str | None = "output", help: str = "replace an existing run in --out"):
    return setting(False, help=help, group=group)


# ---------------------------------------------------------------- the jobs' configs


def _json_with(config, nested: str) -> dict:
    """`asdict(config)`, with its field `nested` (a config of its own, or None) written by its own `to_json`."""
    d = asdict(config)
    value = getattr(config, nested)
    d[nested] = value.to_json() if value is not None else None
    return d


@dataclass(frozen=True)
class TrainRun:
    """Everything `advtune train` needs; recorded verbatim in config.json. Its fields are the flags."""

    dataset: str = setting(
        help="mnist, fashion-mnist, cifar10, synthetic, a .npz file or an image folder", group="data"
    )
    model: str = setting(
        help="a zoo model (small-cnn, madry-mnist, lenet5, vgg-cifar, preact-resnet18, preact-resnet20, "
        "preact-resnet20-w2) or your own: path/to/file.py:factory or package.module:factory (a function "
        "returning an nn.Module on pixels in [0, 1]; it gets input_shape= and num_classes= if its signature names them)"
    )
    out: str = out_setting()
    train: TrainConfig = setting(TrainConfig(), help="the training settings", cli=False)
    weights: str | None = setting(
        None,
        help="start from these weights: a .safetensors file or a PyTorch checkpoint (.pt/.pth, read with "
        "weights_only=True: never executing code; a state_dict, or one under state_dict/model/model_state_dict or "
        "--weights-key; DataParallel's module. prefixes removed); with --epochs 0 the run records the model as it "
        "is, for evaluate/analyze/harden",
    )
    weights_key: str | None = setting(None, help="the key of the checkpoint that holds the state_dict")
    data_dir: str | None = data_dir_setting("data")
    limit: int | None = limit_setting()
    limit_test: int | None = limit_test_setting()
    val: float = val_setting()
    device: str = device_setting()
    adversarial: str | None = setting(
        None,
        help="train on adversarial examples of this attack spec, e.g. pgd:steps=10",
        metavar="ATTACK",
        group="adversarial training",
    )
    norm: str = norm_setting("adversarial training")
    eps: float | None = eps_setting("adversarial training")
    attack_mode: str = setting(
        "eval", help="model mode while the attack runs", choices=("eval", "train"), group="adversarial training"
    )
    eps_warmup: float | None = eps_warmup_setting("adversarial training")
    guard: bool | None = setting(
        None, help="catastrophic-overfitting guard (default: on for FGSM attacks)", group="adversarial training"
    )
    budget: int | None = budget_setting()
    points: int = points_setting()
    resume: bool = resume_setting()
    overwrite: bool = overwrite_setting()

    def to_json(self) -> dict:
        return _json_with(self, "train")


@dataclass(frozen=True)
class FinetuneRun:
    """Adversarial fine-tuning of a trained run: all parameters, a selection of components, or a
    random control of equal size, through the one training loop. Its fields are the flags."""

    base: str = setting(help="run folder of the trained model", positional=True)
    out: str = out_setting()
    eps: float | None = eps_setting("attack")
    select: str = setting(
        "all",
        help="all | random | layers:<name,...> | lowrank:rank=R (adapters on every conv/linear layer) | lowrank "
        "(with --params) | <analyze folder> (its --criterion ranking)",
        group="selection",
    )
    share: float = setting(0.1, help="share of components to fine-tune, in (0, 1]", type=number, group="selection")
    criterion: str = setting("taylor", help="score table of the analyze folder to rank by", group="selection")
    per_layer: bool = setting(False, help="take the top share within each layer instead of globally", group="selection")
    attack: str = setting(
        "pgd:steps=10", help="attack spec (pgd:steps=10, fgsm-rs, ...) or trades[:steps=10,beta=6]", group="attack"
    )
    norm: str = norm_setting("attack")
    attack_mode: str = setting(
        "eval", help="model mode while the attack runs", choices=("eval", "train"), group="attack"
    )
    eps_warmup: float | None = eps_warmup_setting("attack", probe=True)
    guard: bool | None = setting(
        None, help="catastrophic-overfitting guard (default: on for FGSM attacks)", group="attack"
    )
    train: TrainConfig = setting(TrainConfig(epochs=1), help="the training settings", cli=False)
    data_dir: str | None = base_data_dir_setting("data")
    limit: int | None = limit_setting()
    limit_test: int | None = limit_test_setting()
    val: float = val_setting()
    monitor_test: int = setting(500, help="test examples for the quick PGD-10 monitor (0: off)", group="attack")
    params: float | None = setting(
        None,
        help="parameter budget instead of --share: entries (or a share < 1 of the model's) that the selection may "
        "train; with random: the matched control",
        type=budget_number,
        group="selection",
    )
    granularity: str = setting(
        "unit",
        help="with --params and an analyze folder: best units, whole layers, low-rank adapters on every layer "
        "with ranks shared out by the layers' scores, hybrid (the best whole layers + adapters on the others), or "
        "quota (the best units of every layer, the budget shared out by the layers' scores), or shares (every layer "
        "a share of the budget by its score: whole where the share pays for it, else the adapter it buys), or sparse "
        "(every layer's share as single weight entries, those with the largest adversarial Fisher), or probe (the "
        "whole network first for --probe of the budget, then only the entries it moved most: harden's rule; it needs "
        "--budget, and an analyze folder only for --probe-quotas)",
        choices=GRANULARITIES,
        group="selection",
    )
    norms: bool | None = setting(
        False,
        help="also train every normalization layer's scale and shift (a BatchNorm keeps updating its statistics), "
        "paid out of --params; with lowrank, hybrid, shares, sparse or probe (none in an API call or config: auto, "
        "as harden)",
        group="selection",
    )
    head: bool | None = setting(
        False,
        help=HEAD_HELP
        + " (none in an API call or config: auto, on with --probe-quotas where the output layer is cheap, as harden)",
        group="selection",
    )
    probe: float = setting(
        PROBE_SHARE,
        help="with --granularity probe: the share of --budget the whole network trains first (its run folder is "
        "<out>.probe); the entries it moved most then train for the rest, every other entry back to the base",
        type=number,
        group="selection",
    )
    probe_quotas: bool = setting(
        False,
        help="with --granularity probe and an analysis (--select <analyze folder>): the mask shared out over the "
        "layers by the analysis' scores, the probe's movement ranking the entries within each layer",
        group="selection",
    )
    budget: int | None = budget_setting()
    points: int = points_setting()
    keep_best: int = keep_best_setting()
    device: str = device_setting()
    resume: bool = resume_setting()
    overwrite: bool = overwrite_setting()

    def to_json(self) -> dict:
        return _json_with(self, "train")


@dataclass(frozen=True)
class AnalyzeRun:
    """Score every component of a trained run under an attack, on training data (never the test
    split), and measure how concentrated the adversarial errors are. Its fields are the flags."""

    base: str = setting(help="run folder of the trained model", positional=True)
    out: str = setting(help="folder to write the analysis to")
    eps: float | None = eps_setting()
    attack: str = setting("pgd:steps=20", help="attack spec")
    norm: str = norm_setting()
    criteria: tuple[str, ...] = setting(
        ("activation-shift", "taylor", "restoration"), help="comma list of vulnerability criteria"
    )
    granularity: str = setting(
        "channel", help="channel (= unit): one conv channel or linear unit per component", choices=("channel", "unit")
    )
    limit: int = setting(2000, help="training examples to score")
    curve_limit: int = setting(1000, help="training examples for the concentration curve (0: skip)")
    shares: tuple[float, ...] = setting(
        (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0), help="shares of the concentration curve"
    )
    random_seeds: tuple[int, ...] = setting((0, 1, 2), help="seeds of the random shares of the curve")
    batch_size: int = setting(256, help="examples per batch")
    seed: int = seed_setting()
    data_dir: str | None = base_data_dir_setting()
    device: str = device_setting()
    overwrite: bool = setting(False, help="replace an existing analysis in --out")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvaluateRun:
    """Evaluate a trained run on its test split under an attack list or a named suite, at one or more
    eps. Its fields are the flags."""

    run: str = setting(help="run folder of the model to evaluate", positional=True)
    eps: tuple[float, ...] = setting((), help="one eps or a comma list for a curve, e.g. 0.3 or 0.1,0.2,0.3 or 8/255")
    attacks: str | None = setting(
        None, help="comma list of attack specs, e.g. fgsm,pgd:steps=40,restarts=2,apgd-ce,apgd-t (this or --suite)"
    )
    suite: str | None = setting(
        None, help="standard = APGD-CE, APGD-T, Square; quick = FGSM, PGD-20", choices=("standard", "quick")
    )
    norm: str = norm_setting()
    limit_test: int | None = setting(1000, help="evaluate the first N test examples")
    batch_size: int | None = setting(
        None, help="examples per batch (default: 256 on the CPU, 1000 on a GPU; halved where it runs out of memory)"
    )
    cascade: bool = setting(
        True,
        help="each attack only on the examples still robust, cheapest first (AutoAttack's protocol); "
        "--no-cascade: every attack on every example, per-attack numbers comparable (an eps curve: always off)",
    )
    compile: bool | None = setting(
        None,
        help="torch.compile the model for Square's queries: ~1.3-2.3x faster black-box queries on CPU after a "
        "one-off compile of ~5-20 s (logits equal to ~1e-6; eager again where compiling fails); --no-compile: never "
        "(default: auto = compiled on the CPU when a batch's query load is large enough to pay for the compile)",
    )
    plot: bool = setting(False, help="with several eps: write the accuracy-vs-eps PNG")
    name: str | None = setting(None, help="name of the record, eval-<name>.json (default: from the attacks and eps)")
    record_dir: str | None = setting(
        None, help="the folder eval-<name>.json (and its .png) goes to (default: the run folder; e.g. a read-only RUN)"
    )
    overwrite: bool = overwrite_setting(None, "replace an eval-<name>.json holding an evaluation with other settings")
    seed: int = seed_setting()
    data_dir: str | None = base_data_dir_setting()
    device: str = device_setting()

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HardenRun:
    """Everything `advtune harden` needs; recorded verbatim in config.json. Its fields (and the
    recipe's) are the flags."""

    base: str = setting(help="run folder of the trained model (from advtune train)", positional=True)
    out: str = setting(help="folder to write the hardened model and its report to")
    eps: float | None = eps_setting()
    norm: str = norm_setting()
    budget: int | None = setting(
        None,
        help="training gradient evaluations (default: the recipe's --epochs passes over the training data with "
        "the training attack; whole optimizer steps: the last one may pass it by up to a batch's cost)",
        type=grad_evals_number,
    )
    recipe: Recipe = setting(Recipe(), help="the fine-tuning recipe", cli=False)
    limit: int | None = setting(None, help="use only the first N training examples (analysis and fine-tuning)")
    limit_test: int = setting(1000, help="test examples for the evaluation")
    holdout: int | None = setting(
        None,
        help="training examples held out (never analysed or fine-tuned on; the base model may have trained on "
        "them) to choose the checkpoint to keep "
        "(default: 1000, at most a tenth of the training data; 0: none, keep the last; only with --keep-best > 0)",
    )
    keep_best: int = keep_best_setting(4, None)
    evaluation: str = setting(
        EVALUATION,
        help="attack list of the evaluation before and after (worst case per example, masking gate on), or a "
        "suite: standard, quick; under l2 the default's Square (black-box, linf-only) is dropped, a named one refused",
    )
    seed: int = seed_setting()
    data_dir: str | None = base_data_dir_setting()
    device: str = device_setting()
    resume: bool = resume_setting(None, "continue an interrupted harden run in --out")
    overwrite: bool = overwrite_setting(None)

    def to_json(self) -> dict:
        return _json_with(self, "recipe")


@dataclass(frozen=True)
class DemoConfig:
    """`advtune demo`; its fields are the flags."""

    out: str | None = setting(
        None, help="folder for the demo's runs and report (default runs/demo; --full: runs/demo-full)"
    )
    full: bool = setting(
        False,
        help="the same job at the MNIST frontier's sizes (the full training set, 900k per curve, 1000 test images, "
        "adversarial training to its plateau): hours on a CPU",
    )
    data_dir: str | None = setting(None, help="folder holding mnist/ (default: search, else download)")
    seed: int = seed_setting()
    device: str = device_setting()


@dataclass(frozen=True)
class ApplyRun:
    """`advtune apply`: a robustness patch applied to its base model. Its fields are the flags."""

    base: str = setting(help="the base model: its run folder, or its weights file (.safetensors/.pt)", positional=True)
    patch: str = setting(help="patch.safetensors of a harden or finetune run", positional=True)
    out: str = setting(help="folder to write the patched model to")
    weights_key: str | None = setting(None, help="with a .pt base: the key of the checkpoint holding the state_dict")
    overwrite: bool = overwrite_setting(None)


FORMATS = ("onnx", "safetensors", "pt")
SUFFIX_FORMATS = {".onnx": "onnx", ".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}  # export's --out


@dataclass(frozen=True)
class ExportRun:
    """`advtune export`: the model of a run for serving, checked against the model that was evaluated.
    Its fields are the flags."""

    run: str = setting(help="run folder of the model to export (a harden, finetune or train run)", positional=True)
    out: str = setting(help="file to write")
    format: str | None = setting(
        None,
        help="file format (default: from --out's suffix: .onnx, .safetensors, .pt or .pth; onnx for any other)",
        choices=FORMATS,
    )
    eps: float | None = setting(
        None, help="eps of the adversarial inputs of the ONNX check (default: the run's)", type=number
    )
    attack: str | None = setting(None, help="attack of the ONNX check's adversarial inputs (default: the run's)")
    norm: str | None = setting(None, help="threat model norm of the check (default: the run's)", choices=("linf", "l2"))
    limit_test: int = setting(1000, help="test examples the ONNX check compares on, clean and adversarial")
    batch_size: int = setting(256, help="examples per batch in the check")
    seed: int = seed_setting()
    data_dir: str | None = base_data_dir_setting()
    device: str = device_setting()
    overwrite: bool = overwrite_setting(None, "replace an existing --out file")
