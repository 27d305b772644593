"""ONE training loop for standard, adversarial and selective training (`fit`)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import filenames as files
from ..cost import CostMeter
from ..data import TensorData, num_batches
from ..devices import model_device
from ..distributed import all_max, broadcast_state, check_global_batch, rank_and_world
from ..errors import AdvtuneError
from ..inputs import as_tensor_data
from ..metrics import accuracy, robust_accuracy_quick
from ..progress import progress
from ..seeding import derive_seed, make_generator
from .augment import augment
from .average import WeightAverage
from .checkpoint import History, load_checkpoint, save_checkpoint
from .config import TrainConfig, epochs_for, lr_at, total_steps
from .objectives import (
    Objective,
    clean,
)
from .regrow import Regrowth
from .selection import Trainable

log = logging.getLogger(__name__)


EpochCallback = Callable[[nn.Module, dict], "str | None"]


StepCallback = Callable[[nn.Module, int, CostMeter], None]  # (model, optimizer steps done, meter)


def _make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if not params:
        raise AdvtuneError("nothing to train: every parameter is frozen (empty selection?)")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(
    model: nn.Module,
    train: TensorData,
    objective: Objective | None = None,
    cfg: TrainConfig | None = None,
    *,
    val: TensorData | None = None,
    val_attack=None,
    selection=None,
    meter: CostMeter | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[EpochCallback] = (),
    on_record: Callable[[History], None] | None = None,
    on_step: StepCallback | None = None,
    desc: str = "train",
    base_state: Mapping[str, torch.Tensor] | None = None,
) -> History:
    """Train `model` in place and return its per-epoch history.

    train / val: an (x, y) pair of tensors, an iterable of (x, y) batches such as a DataLoader (read
    once into memory), or an advtune split (see advtune.inputs). objective: clean() by default;
    cfg: TrainConfig() by default.
    checkpoint_dir: where `checkpoint.pt` is written atomically after every epoch (and every
    `cfg.checkpoint_every` steps); with resume=True training continues from it exactly.
    callbacks: called after each epoch with (model, record); returning "stop" ends training, "restored" ends it
        with the weights the callback put back (no weight average laid over them). One with a `name`,
        `checkpoint_state()` and `restore_checkpoint_state(state)` keeps what it remembers in the checkpoint.
    on_record: called with the history after each epoch (the CLI writes metrics.jsonl there).
    on_step: called after every optimizer step with (model, steps done, meter), outside the timed
    part (the frontier benchmark saves snapshots there). `cfg.steps` sets the run's length in steps.
    base_state: with `cfg.regrow`, the values an entry dropped from the moving mask returns to (default: the
    weights `model` starts with; the probe rule starts elsewhere and passes the base's); the final mask is written
    back into `selection`.
    """
    train = as_tensor_data(train, what="train")
    val = as_tensor_data(val, what="val") if val is not None else None
    objective = objective if objective is not None else clean()
    cfg = cfg if cfg is not None else TrainConfig()
    if val_attack is not None and not callable(val_attack):  # `val_attack=3` trained and measured nothing, silently
        raise AdvtuneError(
            f"val_attack must be an attack (e.g. PGD(threat, steps=10)), got {type(val_attack).__name__}"
        )
    if len(train) == 0:
        raise AdvtuneError("the training split is empty; check --limit and the dataset")
    device = model_device(model)
    rank, world = rank_and_world()
    meter = meter if meter is not None else CostMeter()
    example = train.to_float(train.x[:1], device)
    broadcast_state(model)  # every rank starts from rank 0's weights (before the frozen entries are recorded)
    autocast_dtype = amp_dtype(cfg.amp, device)  # fp16 without CUDA: refused before any step
    if autocast_dtype is not None and device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # where mixed precision helps: tensor-core convolutions
    trainable = Trainable(model, selection, example)
    try:
        params = trainable.params()
        opt = _make_optimizer(trainable.param_groups(cfg.adapter_lr_ratio), cfg)
        average = WeightAverage(params, cfg.ema) if cfg.ema else None
        # fp16 gradients underflow without a scale; bf16 has float32's range and needs none
        scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        step_model = compiled_or_eager(model, example) if cfg.compile else model  # shares model's parameters
        if not meter.flops_forward:
            meter.measure_model(model, tuple(train.x.shape[1:]))
        meter.trainable_params = trainable.count()
        # --batch-size is the global batch: each of the `world` ranks takes its share of every step's
        # examples, so N processes take the same steps, on the same examples, as one process (up to the
        # len(train) % world examples the shards leave out)
        local_batch = check_global_batch(cfg.batch_size)
        steps_per_epoch = num_batches(len(train) // world, local_batch)
        total = total_steps(cfg, steps_per_epoch)
        n_epochs = epochs_for(total, steps_per_epoch) if cfg.steps else cfg.epochs
        regrowth = (
            Regrowth(
                model,
                trainable,
                cfg.regrow,
                cfg.regrow_every,
                total,
                base_state,
                cfg.regrow_score,
                cfg.regrow_moments,
                cfg.regrow_rate,
                cfg.regrow_pool,
                cfg.regrow_drop,
                cfg.regrow_end,
            )
            if cfg.regrow
            else None
        )
        history = History()
        epoch, step = 0, 0
        acc_state = _zero_acc(device)
        ckpt = Path(checkpoint_dir) / files.CHECKPOINT if checkpoint_dir else None
        if resume and ckpt is None:  # nothing to resume from: it was ignored without a word
            raise AdvtuneError("resume=True continues from checkpoint_dir's checkpoint: pass checkpoint_dir=FOLDER")
        if resume and ckpt is not None and ckpt.is_file():
            epoch, step, acc_state = load_checkpoint(
                ckpt, model, opt, meter, history, cfg, device, average, regrowth, callbacks, scaler
            )
            trainable.snapshot()  # unselected slices: the loaded weights are the reference
            if rank != 0:  # the epoch's sums so far are every rank's (saved summed): counted once, on rank 0
                acc_state.zero_()
            log.info("resumed from %s at epoch %d step %d", ckpt, epoch + 1, step)
        elif resume and ckpt is not None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", checkpoint_dir)
        attack_ge = int(objective.attack_grad_evals())
        forwards = int(getattr(objective, "forward_passes", lambda: 0)())  # forward-only passes per example (FLOPs)
        n_classes = None
        block_fraction = objective.block_fraction(model, example) if hasattr(objective, "block_fraction") else None

        while epoch < n_epochs and history.stopped is None:
            meter.start()
            gen = make_generator(derive_seed(cfg.seed, "epoch", epoch))
            batches = train.batches(
                local_batch, shuffle=True, generator=gen, device=device, start=step, rank=rank, world_size=world
            )
            bar = progress(
                batches,
                desc=f"{desc} {epoch + 1}/{n_epochs}",
                total=min(steps_per_epoch, total - epoch * steps_per_epoch) - step,
                disable=None if rank == 0 else True,
            )
            trainable.train_mode()
            for x, y in bar:
                if epoch * steps_per_epoch + step >= total:
                    break
                # each rank draws its own attack noise (one process: the same stream as always)
                g = make_generator(derive_seed(cfg.seed, "step", epoch, step, *([rank] if world > 1 else [])), device)
                if cfg.augment != "none":  # a stream of its own: the attack noise stays what it was
                    keys = ("augment", epoch, step, *([rank] if world > 1 else []))
                    x = augment(x, cfg.augment, make_generator(derive_seed(cfg.seed, *keys), device))
                lr = lr_at(cfg, epoch * steps_per_epoch + step, total, steps_per_epoch)
                for group in opt.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)  # --adapter-lr-ratio's group: scaled
                step_objective = (
                    objective.at((epoch * steps_per_epoch + step) / max(total, 1))
                    if hasattr(objective, "at")
                    else objective
                )
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)):
                    out = step_objective(step_model, x, y, generator=g)
                finite = bool(torch.isfinite(out["loss"]))
                if world > 1:  # every rank stops together: one alone left the others in the gradients' all-reduce
                    finite = all_max([0.0 if finite else 1.0])[0] == 0.0
                if not finite:  # never train on (or save) a NaN model
                    loss = out["loss"].detach()
                    said = float(loss) if not torch.isfinite(loss) else "non-finite on another rank"
                    raise AdvtuneError(
                        f"the training loss became {said} at epoch {epoch + 1}, step {step + 1}; "
                        "lower the learning rate (--lr) or check the data for NaN/huge values"
                    )
                opt.zero_grad(set_to_none=True)
                (scaler.scale(out["loss"]) if scaler else out["loss"]).backward()
                if world > 1:  # before the mask (which commutes with the mean): the regrowth sums the global batch's
                    _all_reduce_grads(params, world)
                if regrowth is not None:  # every entry's gradient (unscaled), before the mask cuts it
                    if scaler:
                        scaler.unscale_(opt)
                    regrowth.observe(epoch * steps_per_epoch + step)
                trainable.mask_grads()
                if regrowth is not None:
                    regrowth.update_started()
                if scaler:  # skips the step when the scaled gradients overflowed, then adapts the scale
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                trainable.restore_frozen()
                if regrowth is not None:
                    regrowth.update_done()
                if average is not None:
                    average.update()
                if regrowth is not None:
                    moved = regrowth.step(epoch * steps_per_epoch + step + 1, opt, average)
                    if moved:
                        log.info("mask: %d entries moved after step %d", moved, epoch * steps_per_epoch + step + 1)
                with torch.no_grad():
                    acc_state[0] += out["loss"].detach() * len(y)
                    if out.get("logits") is not None:  # a local objective has no logits
                        acc_state[1] += (out["logits"].argmax(1) == y).sum()
                        n_classes = out["logits"].shape[1]
                    acc_state[2] += len(y)
                # costs count every rank's examples (the shards are equal: local x world is exact), so a
                # record says the same whatever the number of processes
                if block_fraction is None:
                    meter.add_update(len(y) * world, attack_ge)
                    meter.add_forward(len(y) * world * forwards)
                else:  # partial passes through an early block, counted in full-network equivalents
                    meter.add_partial(len(y) * world, attack_ge + objective.update_passes(), block_fraction)
                step += 1
                if on_step is not None:
                    meter.stop()
                    with average.swapped() if average is not None else nullcontext():  # what would be kept
                        on_step(model, epoch * steps_per_epoch + step, meter)
                    trainable.train_mode()
                    meter.start()
                if step % 50 == 0 and hasattr(bar, "set_postfix"):
                    bar.set_postfix(
                        refresh=False,  # shown with the step's own line, which counts it done
                        loss=f"{(acc_state[0] / acc_state[2]).item():.3f}",
                        acc=f"{(acc_state[1] / acc_state[2]).item():.3f}",
                    )
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps_per_epoch and ckpt:
                    meter.stop()
                    summed = _summed(acc_state, world)  # every rank's part of the epoch so far (a collective)
                    if rank == 0:
                        args = (ckpt, model, opt, meter, history, cfg, epoch, step, summed)
                        save_checkpoint(*args, average, regrowth, callbacks, scaler)
                    meter.start()
            meter.stop()
            broadcast_state(model, buffers_only=True)  # BatchNorm statistics: rank 0's, on every rank
            totals = _reduce(acc_state, world)
            record = {
                "epoch": epoch + 1,
                "train_loss": totals[0] / max(totals[2], 1),
                "train_acc": totals[1] / max(totals[2], 1) if block_fraction is None else None,
                "lr": lr_at(cfg, min((epoch + 1) * steps_per_epoch, total) - 1, total, steps_per_epoch),
                "examples": int(totals[2]),
                "grad_evals": meter.grad_evals,
                "wall_s": round(meter.wall_s, 3),
            }
            if val is not None and len(val):  # monitoring (of the average, with --ema): not training cost
                with average.swapped() if average is not None else nullcontext():
                    record["val_acc"] = accuracy(model, val, cfg.eval_batch_size)
                    if val_attack is not None:
                        record["val_robust_acc"] = robust_accuracy_quick(
                            model, val.take(cfg.val_attack_limit), val_attack, cfg.eval_batch_size, cfg.seed
                        )
            history.epochs.append(record)
            warn_if_at_chance(record, n_classes, attack_ge)
            for cb in callbacks:
                verdict = cb(model, record)
                if verdict in ("stop", "restored"):
                    history.stopped = f"stopped by {getattr(cb, 'name', type(cb).__name__)} after epoch {epoch + 1}"
                    history.restored = history.restored or verdict == "restored"
            record["grad_evals"] = meter.grad_evals  # with what a callback spent (the guard's PGD), as cost.json
            log.info(
                "epoch %d/%d: %s",
                epoch + 1,
                n_epochs,
                {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()},
            )
            epoch, step = epoch + 1, 0
            acc_state = _zero_acc(device)
            if ckpt is not None and rank == 0:
                save_checkpoint(
                    ckpt, model, opt, meter, history, cfg, epoch, step, acc_state, average, regrowth, callbacks, scaler
                )
            if on_record is not None and rank == 0:
                on_record(history)
        if average is not None and not history.restored:  # the run ends with the averaged weights, unless a
            average.copy_to_model()  # callback (the overfitting guard) put back weights it chose: those stay
        if regrowth is not None:  # the selection records the mask the run ended with
            regrowth.write_back(selection)
        return history
    finally:
        trainable.close()


def compiled_or_eager(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """--compile: the compiled module, or the model itself with a warning where torch.compile cannot build it on
    this machine (no C compiler, an unsupported op): compiling is lazy, so one eval-mode forward (no gradients,
    BatchNorm statistics untouched) finds out before the first step, not as a traceback inside it."""
    compiled = torch.compile(model)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            compiled(example)
    except Exception as e:  # the compiler's failures come as many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        log.warning("--compile: torch.compile failed on this machine (%s); training without it", first)
        return model
    finally:
        model.train(was_training)
    return compiled


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `--amp` on `device` (None: off); fp16 without CUDA is a one-line error."""
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise AdvtuneError("--amp fp16 needs a CUDA device (its gradient scaler is CUDA's); use --amp bf16 on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _zero_acc(device) -> torch.Tensor:
    return torch.zeros(3, dtype=torch.float64, device=device)


def _summed(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _reduce(t: torch.Tensor, world: int) -> list[float]:
    return [float(v) for v in _summed(t, world).tolist()]


def _all_reduce_grads(params, world: int) -> None:
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def warn_if_at_chance(record: dict, n_classes: int | None, attack_grad_evals: int) -> bool:
    """Adversarial training whose training accuracy (under the attack) is at chance is not learning:
    say so in the log, with the usual fixes, instead of training on silently."""
    acc = record.get("train_acc")
    if not attack_grad_evals or acc is None or not n_classes:
        return False
    if acc > 1.0 / n_classes + 0.05:
        return False
    log.warning(
        "training accuracy under attack is %.1f%% after epoch %d, chance for %d classes: the model is not learning; "
        "ramp eps up over more of the run (a larger eps warm-up: --eps-warmup, eps_warmup=), lower eps or the learning "
        "rate (--lr, lr=), or start from a trained model",
        100 * acc,
        record.get("epoch", 0),
        n_classes,
    )
    return True
