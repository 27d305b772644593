"""How a model is trained: `TrainConfig` (its fields are the training flags) and the learning-rate
schedules over steps."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

from ..errors import AdvtuneError
from ..keywords import keyword_errors
from ..recipe import SCHEDULES
from ..settings import number, setting

log = logging.getLogger(__name__)


AUGMENTS = ("none", "crop-flip")  # train/augment.py implements them
REGROW_SCORES = ("fisher", "movement")  # train/regrow.py
REGROW_MOMENTS = ("zero", "window")
REGROW_POOLS = ("layer", "global")
REGROW_DROPS = ("moved", "per-step")
REGROW_END = 0.75  # RigL's schedule: the mask stops moving at 75% of the run, the rest trains a fixed one
# how a moving mask moves (--regrow > 0): inert on a fixed mask; finetune/harden's levers, never train's
REGROW_HOW = (
    "regrow_every",
    "regrow_score",
    "regrow_moments",
    "regrow_rate",
    "regrow_pool",
    "regrow_drop",
    "regrow_end",
)
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained (every job that trains takes one; its fields are the training flags)."""

    epochs: int = setting(2, help="passes over the training data", group="training")
    batch_size: int = setting(128, help="examples per optimizer step", group="training")
    optimizer: Literal["sgd", "adam"] = setting("adam", help="optimizer", choices=("adam", "sgd"), group="training")
    lr: float = setting(1e-3, help="learning rate", type=number, group="training")
    momentum: float = setting(SGD_MOMENTUM, help="SGD momentum", type=number, group="training")
    weight_decay: float = setting(0.0, help="weight decay", type=number, group="training")
    schedule: Literal["constant", "cosine", "step", "onecycle", "ssfd"] = setting(
        "constant", help="learning-rate schedule; ssfd = slow start, fast decay", choices=SCHEDULES, group="training"
    )
    warmup_epochs: float = setting(0.0, help="epochs of linear learning-rate warm-up", type=number, group="training")
    seed: int | None = setting(0, help="random seed (None: nondeterministic)", cli=False)  # the shared --seed
    eval_batch_size: int = setting(512, help="batch size of the accuracy checks", group="training")
    checkpoint_every: int = setting(0, help="also checkpoint every N steps (0: at epoch ends only)", group="training")
    val_attack_limit: int = setting(500, help="validation examples attacked after each epoch", group="training")
    amp: Literal["off", "bf16", "fp16"] = setting(
        "off",
        help="mixed precision (autocast) of training and its attacks: bf16 (CPU or GPU) or fp16 (GPU, with a "
        "gradient scaler); the adversarial examples' step and projection stay float32, evaluation is always float32",
        choices=("off", "bf16", "fp16"),
        group="training",
    )
    compile: bool = setting(
        False,
        help="torch.compile the model for training (opt-in: no gain measured on CPU for attack+update steps; "
        "where the compiler fails on this machine, training goes on without it, with a warning)",
        group="training",
    )
    augment: Literal["none", "crop-flip"] = setting(
        "none",
        help="augmentation of the training batches: crop-flip = a random crop after 4 pixels of zero padding and "
        "a horizontal flip half the time (CIFAR-10's standard; not for digits)",
        choices=AUGMENTS,
        group="training",
    )
    ema: float = setting(
        0.0,
        help="keep an exponential moving average of the trained weights with this decay (e.g. 0.99) and end with "
        "it; snapshots are of the average (0: off)",
        type=number,
        group="training",
    )
    # LoRA+ (Hayou, Ghosh and Yu 2024): under Adam an adapter (up factor from zero, down factor ~1/sqrt(fan_in))
    # first changes W by ~lr * sqrt(rank / fan_in) per entry, a whole weight by ~lr; a higher rate on the up
    # factors alone speeds the adapter up without a faster random factor (their ratio: 16; docs/method.md)
    adapter_lr_ratio: float = setting(
        1.0,
        help="learning rate of the low-rank adapters' up factors as a multiple of --lr (LoRA+; e.g. 16); the "
        "down factors, whole layers and normalization layers keep --lr",
        type=number,
        group="training",
    )
    # a mask that moves (train/regrow.py, #21 round 39): RigL-style drop and regrow of single weight entries
    regrow: float = setting(
        0.0,
        help="move the sparse/probe rule's mask within its budget: every --regrow-every steps this share of "
        "the mask's entries (cosine-decayed to 0 at --regrow-end of the run) goes back to the base and as "
        "many new entries start training where --regrow-score ranks highest (default movement: where Adam would "
        "have moved them furthest; 0: a fixed mask)",
        type=number,
        group="training",
    )
    regrow_every: int = setting(100, help="optimizer steps between the moves of --regrow's mask", group="training")
    # movement: 31.7% against fisher's 29.7% on validation (preact-resnet20, seed 0; docs/RESULTS.md round 39)
    regrow_score: Literal["fisher", "movement"] = setting(
        "movement",
        help="where --regrow's mask grows: fisher = the largest summed squared gradient since the last move; "
        "movement = how far Adam would have moved the entry, |sum g| / sqrt(sum g^2)",
        choices=REGROW_SCORES,
        group="training",
    )
    # zero (round 39's runs): a grown entry's Adam moments start at 0 while Adam's bias correction counts the
    # tensor's steps, so its next steps are up to ~6x (after 100 steps still 2-3x) the rate of an entry that trained
    # all along; window: the moments a bias-corrected Adam would read equal the window's mean gradient and mean
    # squared gradient
    regrow_moments: Literal["zero", "window"] = setting(
        "zero",
        help="how a grown entry's Adam moments start: zero (its steps after growing are up to ~6x the others', "
        "Adam's bias correction counting the weight's steps) or window (as if it had trained: the window's mean "
        "gradient and mean squared gradient)",
        choices=REGROW_MOMENTS,
        group="training",
    )
    # round 41's lever: the late entries train for fewer steps than those the mask started with
    regrow_rate: float = setting(
        1.0,
        help="the steps of the entries --regrow's mask grows, as a multiple of the optimizer's, from their move to "
        "the end of the run or their drop (e.g. 2: they joined late; on top of --regrow-moments zero's fast start; "
        "1: off)",
        type=number,
        group="training",
    )
    # global: the layers' counts follow where the gradient moves, one ranking of the unit-free movement score over all
    # the weights (redistribution across layers as in Sparse Momentum, Dettmers & Zettlemoyer 2019, and DSR, Mostafa
    # & Wang 2019, from memory; round 41)
    regrow_pool: Literal["layer", "global"] = setting(
        "layer",
        help="where --regrow's dropped entries regrow: layer = within each weight (its count kept), global = "
        "wherever the movement score is largest over all the weights it moves (the counts move between layers)",
        choices=REGROW_POOLS,
        group="training",
    )
    # per-step: an entry that joined late has had fewer steps to move, so its total |change| undersells it (the
    # zero-moment fast start and --regrow-rate protect it by making it move more; this compares it fairly; round 41)
    regrow_drop: Literal["moved", "per-step"] = setting(
        "moved",
        help="which of --regrow's entries leave: moved = the least |change| from the base; per-step = the least "
        "|change| per step since the entry joined the mask (a late entry is not dropped for having joined late)",
        choices=REGROW_DROPS,
        group="training",
    )
    # RigL stops moving at 75% of the run; a longer moving phase explores more entries over the run (ITOP's
    # in-time over-parameterization, Liu et al. 2021, from memory); round 42
    regrow_end: float = setting(
        REGROW_END,
        help="the share of the run after which --regrow's mask stops moving (its share cosine-decays to 0 there; "
        "the rest of the run trains the last mask)",
        type=number,
        group="training",
    )
    # > 0: train exactly this many optimizer steps (as many epochs as that takes; `epochs` is then
    # ignored); schedules span them. Set from a gradient-evaluation budget (--budget).
    steps: int = setting(0, help="optimizer steps (0: epochs decide)", cli=False)

    @keyword_errors()  # TrainConfig(ema=2) names ema, --ema 2 names --ema
    def __post_init__(self) -> None:
        for f in fields(self):  # a switch is a bool: compile="no" would have compiled
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise AdvtuneError(
                    f"{f.name} is a switch: True or False (true/false in YAML), got {getattr(self, f.name)!r}"
                )
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise AdvtuneError(f"{name} must be a finite number, got {v!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "val_attack_limit", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise AdvtuneError(f"{name} must be an integer, got {v!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise AdvtuneError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.regrow and self.regrow_moments == "window" and self.optimizer != "adam":
            raise AdvtuneError("--regrow-moments window sets Adam's moments; with --optimizer sgd use zero (default)")
        if self.eval_batch_size <= 0 or self.val_attack_limit <= 0:
            raise AdvtuneError("eval batch size and val attack limit must be positive")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise AdvtuneError(f"epochs must be a non-negative integer, got {self.epochs}")
        if self.batch_size <= 0:
            raise AdvtuneError(f"--batch-size must be positive, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AdvtuneError(f"--lr: the learning rate must be positive, got {self.lr}")
        if self.augment not in AUGMENTS:
            raise AdvtuneError(f"unknown augmentation {self.augment!r}; valid: {', '.join(AUGMENTS)}")
        if self.optimizer not in ("sgd", "adam"):
            raise AdvtuneError(f"unknown optimizer {self.optimizer!r}; use sgd or adam")
        if self.schedule not in SCHEDULES:
            raise AdvtuneError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.weight_decay < 0:  # each named with its value (one line said both, whichever was wrong)
            raise AdvtuneError(f"--weight-decay must be >= 0 (e.g. 5e-4; 0: off), got {self.weight_decay!r}")
        if not (0 <= self.momentum < 1):
            raise AdvtuneError(f"--momentum must lie in [0, 1) (e.g. 0.9), got {self.momentum!r}")
        if self.optimizer == "adam" and self.momentum != SGD_MOMENTUM:  # Adam has none: it was ignored
            raise AdvtuneError("--momentum is SGD's (Adam keeps its own moments): use it with --optimizer sgd")
        if self.amp not in ("off", "bf16", "fp16"):
            raise AdvtuneError(f"unknown --amp {self.amp!r}; use off, bf16 or fp16")
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0 <= self.ema < 1:
            raise AdvtuneError(f"--ema must be a decay in [0, 1) (e.g. 0.99; 0: off), got {self.ema!r}")
        r = self.adapter_lr_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r > 0):
            raise AdvtuneError(f"--adapter-lr-ratio must be a positive number (1: off; LoRA+ uses 16), got {r!r}")
        check_regrow(
            self.regrow,
            self.regrow_every,
            self.regrow_score,
            self.regrow_moments,
            self.regrow_rate,
            self.regrow_pool,
            self.regrow_drop,
            self.regrow_end,
        )
        for name in ("warmup_epochs", "checkpoint_every", "steps"):  # one line named all three, and no value
            if getattr(self, name) < 0:
                raise AdvtuneError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)!r}")
        if self.warmup_epochs and self.schedule == "onecycle":  # its rise is the warm-up: a second would saw-tooth
            raise AdvtuneError(
                "--warmup-epochs does not combine with --schedule onecycle (its first 40% is a warm-up already; "
                "with both the rate fell to 0 after the warm-up): drop --warmup-epochs (warmup_epochs: 0 in an "
                "experiment's train:) or choose --schedule cosine"
            )

    def to_json(self) -> dict:
        return asdict(self)


def check_regrow(
    share: float,
    every: int,
    score: str = "movement",
    moments: str = "zero",
    rate: float = 1.0,
    pool: str = "layer",
    drop: str = "moved",
    end: float = REGROW_END,
) -> None:
    """--regrow's share of the mask, --regrow-every's interval, --regrow-score, --regrow-moments, --regrow-rate,
    --regrow-pool, --regrow-drop, --regrow-end (train/regrow.py)."""
    if score not in REGROW_SCORES:
        raise AdvtuneError(f"unknown --regrow-score {score!r}; use one of {', '.join(REGROW_SCORES)}")
    if moments not in REGROW_MOMENTS:
        raise AdvtuneError(f"unknown --regrow-moments {moments!r}; use one of {', '.join(REGROW_MOMENTS)}")
    if pool not in REGROW_POOLS:
        raise AdvtuneError(f"unknown --regrow-pool {pool!r}; use one of {', '.join(REGROW_POOLS)}")
    if drop not in REGROW_DROPS:
        raise AdvtuneError(f"unknown --regrow-drop {drop!r}; use one of {', '.join(REGROW_DROPS)}")
    if pool == "global" and score != "movement":  # a summed squared gradient has each layer's own units
        raise AdvtuneError("--regrow-pool global ranks entries of all layers together: use --regrow-score movement")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise AdvtuneError(f"--regrow must be a share of the mask in [0, 1) (e.g. 0.3; 0: a fixed mask), got {share!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
        raise AdvtuneError(f"--regrow-every must be a positive number of steps (e.g. 100), got {every!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and 0 < rate <= 100):
        raise AdvtuneError(f"--regrow-rate must be a multiple in (0, 100] (e.g. 2; 1: off), got {rate!r}")
    if isinstance(end, bool) or not isinstance(end, (int, float)) or not (math.isfinite(end) and 0 < end <= 1):
        raise AdvtuneError(f"--regrow-end must be a share of the run in (0, 1] (e.g. 0.75), got {end!r}")


def inert_regrow(cfg: TrainConfig) -> list[str]:
    """The settings of how a mask moves (REGROW_HOW) set away from their defaults where the mask stays put
    (regrow 0): they would do nothing, so the jobs refuse them."""
    if cfg.regrow:
        return []
    fixed = TrainConfig()
    return [k for k in REGROW_HOW if getattr(cfg, k) != getattr(fixed, k)]


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: `cfg.steps` when set, else every step of every epoch."""
    return cfg.steps if cfg.steps else steps_per_epoch * cfg.epochs


def epochs_for(steps: int, steps_per_epoch: int) -> int:
    """Epochs needed to run `steps` optimizer steps."""
    return max(1, -(-steps // max(steps_per_epoch, 1)))


def lr_at(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int | None = None) -> float:
    """Learning rate at a global step (a pure function: nothing to save for resume).

    ssfd ("slow start, fast decay", Jeddi et al. 2020, for adversarial fine-tuning): linear rise over
    the first 10% of steps (warmup_epochs, when set, overrides that), then linear decay to 0."""
    per_epoch = steps_per_epoch or total / max(cfg.epochs, 1)  # with cfg.steps set, epochs says nothing
    if cfg.schedule == "ssfd":
        warm = int(cfg.warmup_epochs * per_epoch) if cfg.warmup_epochs else max(1, total // 10)
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return cfg.lr * max(0.0, (total - step) / max(total - warm, 1))
    warm = int(cfg.warmup_epochs * per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(total - warm, 1)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.lr * (0.1 ** (int(t >= 0.5) + int(t >= 0.75)))
    if cfg.schedule == "onecycle":  # triangular: up to the peak at 40%, then down to 0 (fast-AT style)
        t = (step + 0.5) / max(total, 1)  # each step's middle: no step at rate 0 (its cost would buy nothing)
        return cfg.lr * (t / 0.4 if t < 0.4 else max(0.0, (1 - t) / 0.6))
    return cfg.lr
