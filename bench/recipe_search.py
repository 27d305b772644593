"""Recipe search on the VALIDATION split (issue 8): fine-tune the standard MNIST small-cnn with one
recipe and log PGD-20 robust accuracy on 1000 held-out training images (the last 5000 of the 60k
training set, never trained on) at chosen steps. This is where the levers in docs/RESULTS.md
("Recipe levers") were measured; the frontier (bench/frontier.py) then measures the winners on the
test split with the strong protocol. A deliberately small, self-contained loop (advtune's attacks,
its own optimizer loop) so one lever can change at a time.

    .venv/bin/python bench/recipe_search.py --name c12-pgd5 --train conv1,conv2 --attack pgd:steps=5 \
        --steps 860 --warm 0.5 --evals 430,860 [--log runs/recipe-search.jsonl]

The base model (2 epochs, Adam 1e-3, first 55k images) is trained once and cached at --base.
"""

import argparse
import copy
import io
import math
import os
import time

import torch
import torch.nn.functional as F

from advtune.attacks import build_attack
from advtune.data import load_dataset
from advtune.devices import eval_mode
from advtune.errors import AdvtuneError
from advtune.metrics import accuracy, robust_accuracy_quick
from advtune.models import model_for
from advtune.seeding import make_generator
from advtune.storage import atomic_write_bytes
from advtune.threat import ThreatModel
from val_select import emit, writable_out

ap = argparse.ArgumentParser()
ap.add_argument("--name", required=True)
ap.add_argument("--train", default="all")  # comma list of module names, or all
ap.add_argument("--attack", default="pgd:steps=10")
ap.add_argument("--eps", type=float, default=0.3)
ap.add_argument("--opt", default="adam")
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--sched", default="const")  # const | cos | jeddi | late (x0.1 from --late-at on)
ap.add_argument("--late-at", type=float, default=0.85)
ap.add_argument("--steps", type=int, default=430)
ap.add_argument("--evals", default="50,100,200,430")
ap.add_argument("--warm", type=float, default=0.0)  # eps warm-up share
ap.add_argument("--bs", type=int, default=128)
ap.add_argument("--base", default="runs/recipe-search-base.pt")
ap.add_argument("--log", default="runs/recipe-search.jsonl")
ap.add_argument("--mode", default="eval")
ap.add_argument("--trades", type=float, default=0.0)
ap.add_argument("--feat", type=float, default=0.0)  # feature-matching weight at --featlayer
ap.add_argument("--featlayer", default="relu2")
ap.add_argument("--clean", type=float, default=0.0)
ap.add_argument("--local", default="")  # local objective: feature matching at this net child (prefix only)
ap.add_argument("--lsteps", type=int, default=10)
ap.add_argument(
    "--lora", type=int, default=0
)  # low-rank adapters of this rank on the --train layers (all: every conv/linear)
ap.add_argument("--lora-layers", default="")  # with --lora: adapters only here; --train layers train whole
ap.add_argument("--bias", action="store_true")  # with --lora: also train every bias
ap.add_argument("--apgd", action="store_true")  # also APGD-CE-100 on the validation images
ap.add_argument("--free", type=int, default=0)  # free AT: replay each minibatch this many times (see below)
ap.add_argument("--ema", type=float, default=0.0)  # evaluate an exponential moving average of the trained weights
args = ap.parse_args()
try:
    out = writable_out(args.log, "--log")  # checked before the base is trained or the data read
except AdvtuneError as e:
    ap.error(str(e))
torch.manual_seed(0)
ds = load_dataset("mnist")
tr = ds.train.index(torch.arange(0, 55000))
va = ds.train.index(torch.arange(55000, 60000))
model = model_for(ds, "small-cnn")

if not os.path.isfile(args.base):  # the standard model, trained once on the first 55k images
    from advtune.train import TrainConfig, clean, fit

    fit(model, tr, clean(), TrainConfig(epochs=2, seed=0))
    os.makedirs(os.path.dirname(args.base) or ".", exist_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(args.base, buf.getvalue())  # a kill mid-write leaves no half cache for the next run to trust
model.load_state_dict(torch.load(args.base, weights_only=True))

orig = copy.deepcopy(model).eval()
for p in orig.parameters():
    p.requires_grad_(False)
if args.lora and args.lora_layers:  # hybrid: --train layers whole, adapters on --lora-layers
    from advtune.train.lowrank import add_adapters, uniform_ranks

    add_adapters(model, uniform_ranks(model, args.lora, ["net." + n for n in args.lora_layers.split(",")]))
    for n, p in model.named_parameters():
        if any(n.startswith("net." + m + ".") for m in args.train.split(",")):
            p.requires_grad_(True)
elif args.lora:
    from advtune.train.lowrank import adaptable_layers, add_adapters

    layers = adaptable_layers(model)
    if args.train != "all":
        layers = [n for n in layers if n.removeprefix("net.") in args.train.split(",")]
    add_adapters(model, {n: min(args.lora, *getattr(model.get_submodule(n), "weight").shape[:1]) for n in layers})
    if args.bias:
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.requires_grad_(True)
elif args.train != "all":
    names = args.train.split(",")
    for n, p in model.named_parameters():
        p.requires_grad_(any(n.startswith("net." + m + ".") for m in names))
params = [p for p in model.parameters() if p.requires_grad]
ntrain = sum(p.numel() for p in params)
opt = (
    torch.optim.Adam(params, lr=args.lr)
    if args.opt == "adam"
    else torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True)
)
threat = ThreatModel("linf", args.eps)
evals = [int(s) for s in args.evals.split(",")]
val_attack = build_attack("pgd:steps=20", threat)
apgd_attack = build_attack("apgd-ce", threat)
vx = va.take(1000)
ema = [p.detach().clone() for p in params] if args.ema else None


def evaluate_now():
    """Validation accuracy, clean and PGD-20, of the weights (or their EMA)."""
    if ema:
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    out_ = accuracy(model, va.take(2000)), robust_accuracy_quick(model, vx, val_attack, 500, 0)
    if args.apgd:  # APGD-CE (100 steps) too: PGD-20 overstated the strong protocol by ~9 points here
        out_ += (robust_accuracy_quick(model, vx, apgd_attack, 500, 0),)
    if ema:
        with torch.no_grad():
            for p, v in zip(params, live):
                p.copy_(v)
    return out_


def lr_at(s):
    t = s / args.steps
    if args.sched == "cos":
        return args.lr * 0.5 * (1 + math.cos(math.pi * t))
    if args.sched == "jeddi":  # slow start (linear up over 10%), then fast decay (linear to 0)
        return args.lr * (t / 0.1 if t < 0.1 else max(0.0, (1 - t) / 0.9))
    if args.sched == "late":  # constant, then one decay late in the run (Rice et al.: robustness peaks right after it)
        return args.lr * (0.1 if t >= args.late_at else 1.0)
    return args.lr


feats = {}


def hook(m, i, o):
    feats["f"] = o


mods = dict(model.named_modules())
omods = dict(orig.named_modules())


def attack_for(s):
    eps = args.eps * min(1.0, max(s / (args.warm * args.steps), 1e-3)) if args.warm else args.eps
    return build_attack(args.attack, threat.with_eps(eps))


def prefix(m, upto):
    kids = []
    for n, c in m.net.named_children():
        kids.append(c)
        if n == upto:
            break
    return torch.nn.Sequential(m.normalize, *kids)


def average_step(step):
    """The weight average's update, as train/average.py: the decay warms up as min(decay, (1 + t) / (10 + t))."""
    if ema:
        d = min(args.ema, (2 + step) / (11 + step))
        with torch.no_grad():
            for p, e in zip(params, ema):
                e.lerp_(p, 1 - d)


def log_eval(step, pending_s):
    """Validation at `step`, one JSON line (train_s + pending_s: the training time so far)."""
    va_clean, va_rob, *va_apgd = evaluate_now()
    rec = dict(
        name=args.name,
        step=step,
        grad_evals=grad_evals,
        train_s=round(train_s + pending_s, 1),
        val_clean=va_clean,
        val_pgd20=va_rob,
        val_apgd_ce=va_apgd[0] if va_apgd else None,
        trainable=ntrain,
        args=vars(args),
    )
    emit(rec, out)  # stdout and the log, with what made the line (two sessions' lines stay apart)


if args.local:
    pre, opre = prefix(model, args.local), prefix(orig, args.local)
free_delta = None
step = 0
t0 = time.time()
grad_evals = 0
train_s = 0.0
gen = torch.Generator().manual_seed(0)
while step < args.steps:
    perm = torch.randperm(len(tr), generator=gen)
    for i in range(0, len(perm) - args.bs + 1, args.bs):
        ts = time.time()
        idx = perm[i : i + args.bs]
        x = tr.x[idx].float() / 255
        y = tr.y[idx]
        atk = attack_for(step)
        g = make_generator(step)
        if args.local:
            e = atk.threat.eps
            with torch.no_grad():
                target = opre(x)
            pre.eval()
            d = (torch.rand(x.shape, generator=g) * 2 - 1) * e
            for _ in range(args.lsteps):
                d.requires_grad_(True)
                loss = (pre((x + d).clamp(0, 1)) - target).pow(2).sum()
                (gr,) = torch.autograd.grad(loss, d)
                d = (d.detach() + 2.5 * e / args.lsteps * gr.sign()).clamp(-e, e)
            xa = (x + d).clamp(0, 1).detach()
            pre.train()
            for gr_ in opt.param_groups:
                gr_["lr"] = lr_at(step)
            loss = (pre(xa) - target).pow(2).mean() + (pre(x) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            train_s += time.time() - ts
            if step in evals:
                va_clean = accuracy(model, va.take(2000))
                va_rob = robust_accuracy_quick(model, vx, val_attack, 500, 0)
                rec = dict(
                    name=args.name,
                    step=step,
                    grad_evals=None,
                    train_s=round(train_s, 1),
                    val_clean=va_clean,
                    val_pgd20=va_rob,
                    trainable=ntrain,
                    args=vars(args),
                )
                emit(rec, out)
            if step >= args.steps:
                break
            continue
        if args.free:  # free adversarial training (Shafahi et al. 2019): each minibatch is replayed --free times;
            # one backward gives the weights' gradient (an optimizer step) and the perturbation's (an FGSM step of
            # size eps on it), and the perturbation carries over to the next minibatch. 1 gradient evaluation a step
            if free_delta is None or free_delta.shape != x.shape:
                free_delta = torch.zeros_like(x)
            model.train()
            for _ in range(args.free):
                e = attack_for(step).threat.eps  # the ramp goes on inside the replays
                d = free_delta.clamp(-e, e).requires_grad_(True)
                loss = F.cross_entropy(model((x + d).clamp(0, 1)), y)
                for gr in opt.param_groups:
                    gr["lr"] = lr_at(step)
                opt.zero_grad()
                loss.backward()
                opt.step()
                free_delta = (d.detach() + e * d.grad.sign()).clamp(-e, e)
                average_step(step)
                grad_evals += len(y)
                step += 1
                if step in evals:  # the evaluation's time is not training time
                    train_s += time.time() - ts
                    log_eval(step, 0.0)
                    ts = time.time()
                if step >= args.steps:
                    break
            train_s += time.time() - ts
            if step >= args.steps:
                break
            continue
        if not args.trades:  # TRADES runs its own inner maximisation
            with eval_mode(model):
                xa = atk(model, x, y, generator=g)
        model.train()
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        if args.trades:  # TRADES at the ramped eps: CE(clean) + beta * KL(clean || adversarial)
            from advtune.train import trades as trades_objective

            tr_obj = trades_objective(atk.threat, steps=int(args.attack.split("steps=")[1]), beta=args.trades)
            loss = tr_obj(model, x, y, generator=g)["loss"]
        else:
            logits = model(xa)
            loss = F.cross_entropy(logits, y)
        if args.clean:
            loss = (1 - args.clean) * loss + args.clean * F.cross_entropy(model(x), y)
        if args.feat:
            h = mods["net." + args.featlayer].register_forward_hook(hook)
            model(xa)
            fa = feats["f"]
            h.remove()
            h = omods["net." + args.featlayer].register_forward_hook(hook)
            with torch.no_grad():
                orig(x)
            fc = feats["f"]
            h.remove()
            loss = loss + args.feat * (fa - fc).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        average_step(step)
        # the attack's passes + the update's, and one more for each extra term on its own forward and backward:
        # TRADES' clean pass (its objective counts steps + 1 before the update), --clean, --feat
        extra = (1 if args.trades else 0) + (1 if args.clean else 0) + (1 if args.feat else 0)
        grad_evals += len(y) * (atk.grad_evals() + 1 + extra)
        step += 1
        train_s += time.time() - ts
        if step in evals:
            log_eval(step, 0.0)
        if step >= args.steps:
            break
