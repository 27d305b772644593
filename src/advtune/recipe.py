"""The measured recipe of `advtune harden` and its evaluation protocol: plain settings, no torch, so
the CLI's help and an experiment's YAML checks can read them without loading the library.
Every default says where its number comes from (docs/RESULTS.md, rounds 2-7)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import AdvtuneError
from .keywords import keyword_errors
from .settings import budget_number, number, setting

PROTOCOL = "apgd-ce,apgd-t:n_target_classes=3"  # the strong protocol: worst case of APGD-CE and APGD-T
# harden's evaluation adds the black-box Square, so the masking gate's black-box check can fire: on a
# hardened small-cnn Square broke 2.2 points more than APGD-T while the APGD-only gate passed (#21)
EVALUATION = PROTOCOL + ",square"
# the fine-tuning batches' augmentations: train/config.py's AUGMENTS, named here because this module imports nothing
# torch-side (tests/test_harden_augment.py keeps the two the same)
AUGMENTATIONS = ("none", "crop-flip")


# what each selection rule trains, in words (harden's output and its report)
GRANULARITY_WORDS = {
    "layer": "whole layers",
    "unit": "units",
    "lowrank": "low-rank adapters on every layer",
    "hybrid": "whole layers + low-rank adapters on the others",
    "shares": "every layer's share of the budget by its score: whole where it pays for the layer, else an adapter",
    "quota": "units of every layer (quotas by the layers' scores)",
    "sparse": "single weight entries of every layer (quotas by the layers' scores, entries by adversarial Fisher)",
    "probe": "the weight entries a whole-network probe (the first --probe share of the budget) moved most, biases "
    "whole",
}
GRANULARITIES = tuple(GRANULARITY_WORDS)
PROBE_QUOTAS_WORDS = (
    "the weight entries a whole-network probe (the first --probe share of the budget) moved most, within every "
    "layer's quota by its score"
)


def rule_words(granularity: str, quotas: bool = False) -> str:
    """A selection rule in words; the probe rule says whether its mask keeps the analysis' layer quotas."""
    return PROBE_QUOTAS_WORDS if granularity == "probe" and quotas else GRANULARITY_WORDS.get(granularity, granularity)


# rules that train low-rank adapters (and --norms); their by_layer counts rank-one directions, not units
ADAPTER_GRANULARITIES = ("lowrank", "hybrid", "shares")
# rules that --norms applies to: the adapter rules and the sparse rule (unit rules train the BatchNorm that
# follows each selected unit already)
NORMS_GRANULARITIES = (*ADAPTER_GRANULARITIES, "sparse", "probe")
# rules that mix whole layers and adapters (or entries): the ones --head can add the output layer to whole (the
# probe rule only with its quotas: its global ranking lets the output layer's entries compete in the mask)
HEAD_GRANULARITIES = ("hybrid", "shares", "sparse", "probe")
PROBE_SHARE = 0.2  # the probe rule's default first stage: 20% of the budget on the whole network (#21, round 18)


def check_probe_share_used(probe: float, granularity: str) -> None:
    """--probe other than its default with another rule would be ignored: refused (harden's recipe, finetune)."""
    if probe != PROBE_SHARE and granularity != "probe":
        raise AdvtuneError(
            f"--probe sets the probe rule's share of the budget: use it with --granularity probe, not {granularity}"
        )


HEAD_HELP = (
    "train the output (classifier) layer whole, paid out of --params (the analysis scores no output layer, so the "
    "hybrid and shares rules otherwise give it the smallest adapter, the sparse rule and the probe's quotas "
    "nothing); with hybrid, shares, sparse or probe (with its quotas) on an analysis, or (finetune) in the random "
    "control of single entries (--select random --granularity sparse)"
)
HEAD_AUTO_HELP = (
    " (default: auto = on with the probe rule's quotas where it costs at most a quarter of what the norms leave of "
    "--params)"
)


SCHEDULES = ("constant", "cosine", "step", "onecycle", "ssfd")  # the learning-rate schedules (train/config.py)


@dataclass(frozen=True)
class Recipe:
    """The selective adversarial fine-tuning recipe. Defaults = the best measured on the frontier
    (docs/RESULTS.md); each field is a flag of `advtune harden` and a key of an experiment's `recipe`."""

    # probe with the analysis' layer quotas (round 20): the first rule to beat the previous default on both networks
    # at equal compute -- MNIST eps 0.3 (small-cnn, three seeds) 87.8% at 1.05M against shares' 86.8% on the same
    # bases, the residual CIFAR-10 frontier 30.3% against 23.5% (full fine-tuning 33.0%); shares had been the default
    # since round 7 (docs/RESULTS.md, #21)
    granularity: str = setting(
        "probe",
        help="select whole layers (best-ranked first), single units, low-rank adapters on every conv/linear "
        "layer (ranks shared out by the layers' scores; merged into the weights at the end), hybrid: the "
        "best whole layers plus adapters on the others with the budget they leave, or quota: the best units "
        "of every layer, the budget shared out by the layers' scores; shares: every layer gets a share of the "
        "budget by its score, trains whole where the share pays for it and gets the adapter it buys otherwise; "
        "sparse: every layer's share as single weight entries, those with the largest squared adversarial-loss "
        "gradients on training examples (a fixed mask, Sung et al. 2021); probe: the whole network trains for the "
        "first --probe share of the budget, then only the entries it moved most (within every layer's quota by its "
        "score with the probe quotas, the default; else one ranking with the biases whole), every other entry back "
        "to the base",
        choices=GRANULARITIES,
        group="recipe",
    )
    params: float = setting(
        0.1,
        help="parameter budget: share (< 1) or number of trainable parameter entries (whole layers' entries "
        "plus adapters' factors)",
        type=budget_number,
        group="recipe",
    )
    criterion: str = setting("taylor", help="ranking of components (layers: summed unit scores)", group="recipe")
    analysis_attack: str = setting("pgd:steps=10", help="attack of the analysis", group="recipe")
    analysis_limit: int = setting(1000, help="training examples scored by the analysis", group="recipe")
    # PGD-5: as good per gradient evaluation as PGD-10 at half the cost (validation). TRADES
    # (`trades:steps=5,beta=6`) adds +0.9 validation points on top of the average below for -0.7 clean;
    # at eps 0.1 it cost 1.2 points of clean accuracy, so it stays an option (docs/RESULTS.md, round 3)
    attack: str = setting("pgd:steps=5", help="training attack", group="recipe")
    # a ramp over 15% of the run with the average: validation +0.7 at the end and +1.3 at 3/4 of it over
    # 30%; the MNIST eps 0.3 test curve +0.8 within 25% of AT's cost (docs/RESULTS.md, round 4). Without any
    # ramp PGD fine-tuning from a standard model stalled at chance (round 1)
    eps_warmup: float = setting(
        0.15, help="share of the fine-tuning over which eps ramps up from 0", type=number, group="recipe"
    )
    optimizer: str = setting("adam", help="optimizer", choices=("adam", "sgd"), group="recipe")
    # a small selection takes a higher rate than full training (1e-3 -> 3e-3)
    lr: float = setting(3e-3, help="learning rate", type=number, group="recipe")
    schedule: str = setting("constant", help="learning-rate schedule", choices=SCHEDULES, group="recipe")
    # more, smaller steps for the same gradient evaluations (validation: +5 points)
    batch_size: int = setting(64, help="examples per optimizer step", group="recipe")
    # no augmentation of the fine-tuning batches, even for a base trained with crop-flip (#21, round 28): on the
    # residual CIFAR-10 network's validation split the probe rule gained +2.1 and +2.3 points (two seeds) without it
    # over with it, +0.1 and +1.4 on the test split (a 2-epoch fine-tuning is too short to overfit; un-augmented batches
    # match the test images)
    augment: str = setting(
        "none",
        help="augmentation of the fine-tuning batches: none, or crop-flip (a random crop after 4 pixels of zero "
        "padding and a horizontal flip half the time)",
        choices=AUGMENTATIONS,
        group="recipe",
    )
    # an average of the trained weights over ~100 steps (Gowal et al. 2020): +2.2 validation points and
    # +0.4 clean, at no training cost; 0.999 spanned the eps ramp and collapsed (round 2)
    ema: float = setting(
        0.99,
        help="end with an exponential moving average of the trained weights with this decay (0: off)",
        type=number,
        group="recipe",
    )
    # the normalization layers' scale and shift as a cheap extra (issue 21, item 1). Auto: on for a model with
    # BatchNorm/GroupNorm/LayerNorm scales when the rule trains adapters or is the probe rule and they cost at most
    # a quarter of the budget -- +5.0 validation / +5.4 test points with hybrid, +3.2 / +4.4 with shares, on the
    # residual CIFAR-10 frontier (docs/RESULTS.md, round 7); a model without norms (small-cnn) is unchanged
    norms: bool | None = setting(
        None,
        help="also train every normalization layer's scale and shift (a BatchNorm keeps updating its "
        "statistics), paid out of --params; with lowrank, hybrid, shares, sparse or probe (default: auto = on where "
        "the model has normalization layers and they cost at most a quarter of --params)",
        group="recipe",
    )
    # the output layer whole (#21, round 10): the analysis scores no output layer, so the shares and hybrid rules
    # give the classifier the smallest adapter (rank 1 on preact-resnet20's 64 -> 10 head at any budget) and the
    # probe's quotas nothing. Auto = on with the probe's quotas (round 21: validation +0.7 over three MNIST seeds, +0.1
    # on the residual network), off with every other rule (round 10: no gain with shares)
    head: bool | None = setting(None, help=HEAD_HELP + HEAD_AUTO_HELP, group="recipe")
    # the probe rule's first stage (#21, round 18): 20% of the budget on the whole network, the mask from its change
    probe: float = setting(
        PROBE_SHARE,
        help="with --granularity probe: the share of the budget the whole network trains first (it must end after "
        "the eps ramp); the entries it moved most then train for the rest, every other entry back to the base",
        type=number,
        group="recipe",
    )
    # round 19: on small-cnn the global ranking put 89% of the mask in fc1, where the best selection trains the early
    # convolutions whole; the quotas keep the analysis' layer shares (the sparse rule's, movement for Fisher): +7.0
    # points there, +1.0 on the residual network (round 20). Auto = on with the probe rule
    probe_quotas: bool | None = setting(
        None,
        help="with --granularity probe: share the mask out over the layers by the analysis' scores (as the sparse "
        "rule), the probe's movement ranking the entries within each layer; --no-probe-quotas: one ranking over all "
        "layers (default: auto = on with --granularity probe)",
        group="recipe",
    )
    # a mask that moves within its budget (#21, round 39; train/regrow.py): +1.8 / +1.1 / +1.6 validation points on
    # preact-resnet20 (three seeds), +0.8 on preact-resnet20-w2 (seed 0); under round 7's +2 rule: an option, off
    regrow: float = setting(
        0.0,
        help="with --granularity probe or sparse: every 100 steps, until three quarters of the run, this share of "
        "each weight's entries (cosine-decayed) goes back to the base and as many start training where Adam would "
        "have moved them furthest (0: a fixed mask)",
        type=number,
        group="recipe",
    )
    epochs: float = setting(
        2.0, help="default budget: this many passes over the training data", type=number, group="recipe"
    )

    @keyword_errors()  # Recipe(ema=2) names ema, --ema 2 names --ema
    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITY_WORDS:
            raise AdvtuneError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        for name in ("batch_size", "analysis_limit"):  # taken here, refused by harden in other words
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AdvtuneError(f"--{name.replace('_', '-')} must be a positive number (whole), got {v!r}")
        for name, valid in (("optimizer", ("adam", "sgd")), ("schedule", SCHEDULES)):
            if getattr(self, name) not in valid:
                raise AdvtuneError(f"unknown --{name} {getattr(self, name)!r}; use one of {', '.join(valid)}")
        for name in ("attack", "analysis_attack", "criterion"):  # specs: an attack object is evaluation's, not here
            if not isinstance(getattr(self, name), str):
                raise AdvtuneError(
                    f"--{name.replace('_', '-')} is a spec such as 'pgd:steps=5', got {getattr(self, name)!r}"
                )
        if isinstance(self.params, bool) or not (isinstance(self.params, (int, float)) and 0 < self.params):
            raise AdvtuneError(f"--params must be a share like 0.1 or a count of entries, got {self.params!r}")
        for name in ("eps_warmup", "epochs", "ema", "lr", "probe", "regrow"):  # "0.1" crashed on a comparison
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise AdvtuneError(f"{name} must be a number, got {v!r}")
        if not 0 <= self.eps_warmup < 1:
            raise AdvtuneError(f"--eps-warmup must be a share of the fine-tuning in [0, 1), got {self.eps_warmup}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise AdvtuneError(f"--epochs must be a positive number of passes over the data, got {self.epochs}")
        if not 0 <= self.ema < 1:  # accepted here, refused inside harden after the data was read
            raise AdvtuneError(f"--ema must be a decay in [0, 1) (e.g. 0.99; 0: off), got {self.ema!r}")
        if self.norms is True and self.granularity not in NORMS_GRANULARITIES:
            raise AdvtuneError(
                f"--norms trains the normalization layers next to low-rank adapters or sparse entries: use it with "
                f"--granularity {', '.join(NORMS_GRANULARITIES)}, not {self.granularity}"
            )
        if self.head is True and self.granularity not in HEAD_GRANULARITIES:
            raise AdvtuneError(
                f"--head trains the output layer whole next to the other layers' adapters: use it with --granularity "
                f"{', '.join(HEAD_GRANULARITIES)} (with its quotas), not {self.granularity}"
            )
        if self.head is True and self.granularity == "probe" and self.probe_quotas is False:
            raise AdvtuneError(
                "--head with --no-probe-quotas: the probe's global ranking lets the output layer's entries compete in "
                "the mask; drop --head, or keep the quotas"
            )
        if not (isinstance(self.probe, (int, float)) and 0 < self.probe < 1):
            raise AdvtuneError(f"--probe must be a share of the budget in (0, 1), got {self.probe!r}")
        check_probe_share_used(self.probe, self.granularity)
        if self.probe_quotas is True and self.granularity != "probe":
            raise AdvtuneError(
                f"--probe-quotas shapes the probe rule's mask: use it with --granularity probe, not {self.granularity}"
            )
        if self.granularity == "probe" and self.probe <= self.eps_warmup:
            raise AdvtuneError(
                f"--probe {self.probe:g} must be larger than --eps-warmup {self.eps_warmup:g}: the eps ramp has to end "
                "within the probe (the masked stage trains at the full eps)"
            )
        if isinstance(self.regrow, bool) or not isinstance(self.regrow, (int, float)) or not 0 <= self.regrow < 1:
            raise AdvtuneError(
                f"--regrow must be a share of the mask in [0, 1) (e.g. 0.3; 0: off), got {self.regrow!r}"
            )
        if self.regrow and self.granularity not in ("probe", "sparse"):
            raise AdvtuneError(
                f"--regrow moves a mask of single weight entries: use it with --granularity probe or sparse, not "
                f"{self.granularity}"
            )
        if self.regrow and self.attack.strip().lower().startswith("fgsm"):  # the guard's rollback: an older mask
            raise AdvtuneError("--regrow with an fgsm attack: its overfitting guard's rollback restores an older mask")
        if self.augment not in AUGMENTATIONS:
            raise AdvtuneError(f"unknown augmentation {self.augment!r}; valid: {', '.join(AUGMENTATIONS)}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise AdvtuneError(f"learning rate must be a positive number, got {self.lr!r}")

    @property
    def quotas(self) -> bool:
        """Whether the probe rule's mask follows the analysis' layer quotas (auto: on with the probe rule)."""
        return self.granularity == "probe" and self.probe_quotas is not False

    @property
    def trains_head(self) -> bool:
        """Whether the output layer trains whole (auto: on with the probe rule's quotas, off with every other rule)."""
        return self.quotas if self.head is None else bool(self.head)

    def to_json(self) -> dict:
        return asdict(self)
