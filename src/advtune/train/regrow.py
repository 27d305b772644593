"""A mask that moves within its budget (`--regrow SHARE`, #21 round 39): drop and regrow single weight entries.

The sparse and probe rules fix their mask before the masked training starts, from a short look (a Fisher or the
probe's movement); what matters later in the run may differ. Dynamic sparse training keeps the number of trained
entries and moves them: every `--regrow-every` steps a share of each weight's selected entries (cosine-decayed from
`--regrow` to 0 at `--regrow-end`, 75% of the run by default) is dropped and as many of its unselected entries are
grown (with `--regrow-pool global`: as many over all the moving weights). RigL (Evci et al.
2020, from memory) drops the smallest weights and grows where the gradient is largest; here the mask is of changes
from a base, so a drop is the entry that moved least from the base (it is put back to the base's value, with its
optimizer moments and weight average, so entries outside the mask stay bit-exact and the changed entries never
exceed the budget), and a grow is where a score over the window since the last move is largest: `movement` (the
default), how far Adam would have moved the entry, |sum g| / sqrt(sum g^2) (the probe rule's own criterion: +1.5
validation points over the fixed mask on preact-resnet20's three seeds), or `fisher`, the summed squared gradient
(RigL's magnitude over the window; level). The loop computes every entry's gradient of a partly selected weight
anyway, so the sums cost no extra pass. Each weight keeps its count of entries (its quota), or with `--regrow-pool
global` the dropped entries regrow wherever the movement score is largest over all the moving weights (the counts
move between layers); `--regrow-rate` multiplies the grown entries' steps and `--regrow-drop per-step` drops by the
change per step since an entry joined (round 41). Biases and normalization layers are untouched. Only single-entry
masks move (the sparse and probe rules); the selection follows the mask as it moves, and the run's selection.json
records the final one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import AdvtuneError
from .config import REGROW_END, check_regrow
from .lowrank import ADAPTABLE

log = logging.getLogger(__name__)


def regrow_share(share: float, step: int, total: int, end_share: float = REGROW_END) -> float:
    """The share of each weight's mask swapped at global step `step` of `total`: cosine from `share` to 0 at
    `end_share` of the run."""
    end = end_share * total
    if step >= end or end <= 0:
        return 0.0
    return share * 0.5 * (1 + math.cos(math.pi * step / end))


def as_mask(indices: Tensor, like: Tensor) -> Tensor:
    """A bool tensor of `like`'s shape, True at the flat (logical-order) `indices`."""
    out = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    out[indices] = True
    return out.view(like.shape)


class Regrowth:
    """Moves the masks of a Trainable's partly selected conv/linear weights (its `partial` entries, in place).
    `reference`: the values a dropped entry returns to (the base's; default: the weights at the start, which is
    the base wherever the mask is off)."""

    def __init__(
        self,
        model: nn.Module,
        trainable,
        share: float,
        every: int,
        total: int,
        reference: Mapping[str, Tensor] | None = None,
        score: str = "movement",
        moments: str = "zero",
        rate: float = 1.0,
        pool: str = "layer",
        drop: str = "moved",
        end: float = REGROW_END,
    ) -> None:
        check_regrow(share, every, score, moments, rate, pool, drop, end)
        self.share, self.every, self.total, self.score = float(share), int(every), int(total), score
        self.end = float(end)
        if share and self.end * self.total <= self.every:  # the first move would fall after the mask stops moving
            log.warning(
                "--regrow: the mask stops moving at step %d (--regrow-end %g of %d steps), before its first move at "
                "step %d: it stays put; lower --regrow-every or raise --regrow-end",
                int(self.end * self.total),
                self.end,
                self.total,
                self.every,
            )
        self.moments, self.rate, self.pool, self.drop = moments, float(rate), pool, drop
        names = {id(p): n for n, p in model.named_parameters()}
        weights = {
            # every weight the sparse rule masks (lowrank.ADAPTABLE), so none keeps a fixed mask while the others move
            id(m.weight)
            for m in model.modules()
            if isinstance(m, ADAPTABLE) and m.weight is not None
        }
        # (name, its index in the Trainable's partial list, the parameter, the values a dropped entry returns to)
        self.moving = []
        for i, (p, m, frozen) in enumerate(trainable.partial):
            if id(p) not in weights:
                continue
            base = frozen if reference is None else reference[names[id(p)]].to(p.device, p.dtype)
            self.moving.append((names[id(p)], i, p, base))
        if not self.moving or getattr(trainable.selection, "kind", None) != "sparse":  # units stay units
            raise AdvtuneError(
                "--regrow moves a mask of single weight entries, and this selection has none: use it with "
                "--granularity probe or sparse"
            )
        if reference is None and getattr(trainable.selection, "probe", None):  # the probe's weights are not the base
            raise AdvtuneError("--regrow on the probe rule's mask needs the base's weights (fit's base_state=)")
        self.trainable = trainable
        # the window's sums of each entry's gradient and squared gradient (float64: a tiny gradient's square does not
        # underflow to a denominator that inflates the movement score; contiguous)
        self.sums = [torch.zeros(p.shape, device=p.device, dtype=torch.float64) for _, _, p, _ in self.moving]
        self.squares = [torch.zeros(p.shape, device=p.device, dtype=torch.float64) for _, _, p, _ in self.moving]
        # the entries a move grew and that are still in the mask (--regrow-rate scales their steps), and the
        # weights before the optimizer's step (update_started to update_done)
        self.late = [torch.zeros(p.shape, device=p.device, dtype=torch.bool) for _, _, p, _ in self.moving]
        self.has_late = [False] * len(self.moving)  # whether late[j] has an entry (read every step: no device sync)
        # the step each entry joined the mask (0: it started in it) and its value then (the masked stage's start: the
        # probe rule's start keeps the probe's change, which is not this stage's), for --regrow-drop per-step
        self.joined = [torch.zeros(p.shape, device=p.device, dtype=torch.int32) for _, _, p, _ in self.moving]
        # (a copy of every moving weight: kept only where the per-step rule reads it)
        self.origin = [p.detach().clone() for _, _, p, _ in self.moving] if drop == "per-step" else []
        self.before: list[Tensor | None] = []

    def masks(self) -> dict[str, Tensor]:
        return {name: self.trainable.partial[i][1] for name, i, _, _ in self.moving}

    @torch.no_grad()
    def observe(self, done: int) -> None:
        """After backward (the gradients of the global batch, unscaled), before they are masked, with `done` steps
        behind: add every entry's gradient and its square while the mask still moves. A step whose gradients are not
        finite (fp16's scaler skips it) adds nothing."""
        if done >= self.end * self.total:
            return
        grads = [None if p.grad is None else p.grad.detach().double() for _, _, p, _ in self.moving]
        if not all(bool(torch.isfinite(g).all()) for g in grads if g is not None):
            return
        for s, q, g in zip(self.sums, self.squares, grads):
            if g is not None:
                s.add_(g)
                q.addcmul_(g, g)

    def scores(self, i: int) -> Tensor:
        """Where entry i's weight would grow: the window's summed squared gradient (fisher, an empirical Fisher), or
        how far Adam would have moved each entry over the window (movement: |sum g| / sqrt(sum g^2), as the
        probe rule's mask ranks what Adam moved)."""
        if self.score == "fisher":
            return self.squares[i]
        q = self.squares[i]
        return torch.where(q > 0, self.sums[i].abs() / q.sqrt(), torch.zeros_like(q))  # no gradient: no movement

    @torch.no_grad()
    def update_started(self) -> None:
        """Before the optimizer's step: keep the weights that hold late entries (only with --regrow-rate != 1)."""
        if self.rate != 1:
            self.before = [p.detach().clone() if has else None for (_, _, p, _), has in zip(self.moving, self.has_late)]

    @torch.no_grad()
    def update_done(self) -> None:
        """After the optimizer's step (and the frozen entries' restore): a late entry's step times --regrow-rate,
        from the step after its move until it is dropped (after the mask stops moving: to the end of the run). The
        late entries train for fewer steps than those the mask started with (a move grows them at the base); a
        larger step also moves them further from the base, so the next move drops them less often;
        Adam's zero-moment restart already speeds their first steps up (reset_moments), this is a steady factor."""
        for (_, _, p, _), late, before in zip(self.moving, self.late, self.before):
            if before is not None:
                p.data.copy_(torch.where(late, before + self.rate * (p.data - before), p.data))
        self.before = []

    @torch.no_grad()
    def step(self, done: int, opt: torch.optim.Optimizer, average=None) -> int:
        """After `done` optimizer steps: move the masks if an update falls here. Returns the entries swapped."""
        if done % self.every or done >= self.end * self.total:
            return 0
        share = regrow_share(self.share, done, self.total, self.end)
        swapped = 0
        shadows = dict(zip(map(id, average.params), average.shadow)) if average is not None else {}
        # which entries leave: each weight's least moved (|change| has the weight's units: ranked within it), or
        # least moved per step since it joined (per-step)
        drops, ks = [], self.drop_counts(share)
        for j, (_, i, p, base) in enumerate(self.moving):
            m, k = self.trainable.partial[i][1], ks[j]
            # ranked in the logical order of the entries (reshape copies a channels_last tensor), applied as
            # full-shape masks, so any memory layout is indexed alike
            if self.drop == "per-step":  # the change since the entry joined, per step since
                steps = (done - self.joined[j].reshape(-1)).clamp(min=1).float()
                moved = (p.detach() - self.origin[j]).abs().float().reshape(-1) / steps
            else:
                moved = (p.detach() - base).abs().float().reshape(-1)
            drops.append(as_mask(moved.masked_fill(~m.reshape(-1), math.inf).topk(k, largest=False).indices, m))
        for j, grow in enumerate(self.grows(drops)):
            _, i, p, base = self.moving[j]
            _, m, frozen = self.trainable.partial[i]
            drop = drops[j]
            if bool(drop.any()) or bool(grow.any()):
                m[drop] = False
                m[grow] = True
                self.late[j][drop] = False
                self.late[j][grow] = True
                self.has_late[j] = bool(self.late[j].any())
                self.joined[j][grow] = done
                if self.origin:
                    self.origin[j][grow] = base[grow]
                for t in (p.data, frozen, shadows.get(id(p))):
                    if t is not None:
                        t[drop] = base[drop]  # dropped: back to the base, bit for bit
                self.reset_moments(opt, p, drop, grow, j)
                swapped += int(drop.sum())
            self.sums[j].zero_()
            self.squares[j].zero_()
        if swapped:  # the selection follows the mask as it moves (keep-best keeps the mask of the point it keeps)
            self.write_back(self.trainable.selection)
        return swapped

    def drop_counts(self, share: float) -> list[int]:
        """How many entries each weight drops: its share of its mask; within a weight (pool=layer) no more than it has
        free to grow, over all of them (pool=global) no more than they can take while each keeps a free entry (a
        weight whose mask fills up is whole, and a whole weight no longer moves)."""
        counts = [(int(self.trainable.partial[i][1].sum()), p.numel()) for _, i, p, _ in self.moving]
        if self.pool != "global":
            return [min(int(share * on), n - on) for on, n in counts]
        ks = [int(share * on) for on, _ in counts]
        room = max(sum(n - on - 1 for on, n in counts), 0)
        if sum(ks) > room:  # a mask that nearly fills its weights: fewer drops, the count is kept
            ks = [k * room // sum(ks) for k in ks]
        return ks

    def grows(self, drops: list[Tensor]) -> list[Tensor]:
        """Where the dropped entries regrow, among the entries outside the mask before the move: within each weight,
        as many as it dropped (pool=layer: its quota kept), or (pool=global) the largest movement scores over all
        the moving weights together (the score is unit-free, |sum g| / sqrt(sum g^2) in [0, sqrt(window)], so it
        ranks entries of different layers alike; a weight's count then follows where the gradient moves)."""
        masks = [self.trainable.partial[i][1].reshape(-1) for _, i, _, _ in self.moving]
        scores = [self.scores(j).reshape(-1).masked_fill(m, -math.inf) for j, m in enumerate(masks)]
        if self.pool != "global":
            return [as_mask(sc.topk(int(d.sum())).indices, d) for sc, d in zip(scores, drops)]
        # the best scores of all the weights, each weight taking at most all its free entries but one (drop_counts
        # leaves room for every drop): a stable sort, then each weight's first `cap` candidates in that order
        order = torch.cat(scores).argsort(descending=True, stable=True)
        owner = torch.cat([torch.full((sc.numel(),), j, device=sc.device) for j, sc in enumerate(scores)])[order]
        keep = torch.zeros_like(order, dtype=torch.bool)
        for j, m in enumerate(masks):
            mine = (owner == j).nonzero().squeeze(1)
            keep[mine[: max(int((~m).sum()) - 1, 0)]] = True
        chosen = order[keep][: sum(int(d.sum()) for d in drops)]
        out, offset = [], 0
        for sc, d in zip(scores, drops):
            here = chosen[(chosen >= offset) & (chosen < offset + sc.numel())] - offset
            out.append(as_mask(here, d))
            offset += sc.numel()
        return out

    def reset_moments(self, opt: torch.optim.Optimizer, p: Tensor, drop: Tensor, grow: Tensor, j: int) -> None:
        """The optimizer's state of the swapped entries: a dropped entry's to zero; a grown entry's to zero, or
        (moments=window, Adam) to the moments whose bias-corrected values are the window's mean gradient and mean
        squared gradient: Adam divides by 1 - beta^t with t the weight's steps, so moments grown from zero under a
        large t read as a far too small second moment, and the entry steps up to ~6x faster than the entries that
        trained all along (still 2-3x after 100 steps)."""
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            buf = state.get(key)
            if isinstance(buf, Tensor) and buf.shape == p.shape:
                buf[drop | grow] = 0
        if self.moments != "window" or not isinstance(state.get("exp_avg_sq"), Tensor):
            return
        beta1, beta2 = next(g["betas"] for g in opt.param_groups if any(q is p for q in g["params"]))
        t = float(state["step"])
        mean, mean_sq = self.sums[j][grow] / self.every, self.squares[j][grow] / self.every
        state["exp_avg"][grow] = (mean * (1 - beta1**t)).to(state["exp_avg"].dtype)
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            if isinstance(state.get(key), Tensor) and state[key].shape == p.shape:
                state[key][grow] = (mean_sq * (1 - beta2**t)).to(state[key].dtype)

    def state_dict(self) -> dict:
        return {
            "masks": [m.cpu() for m in self.masks().values()],
            "sums": [s.cpu() for s in self.sums],
            "squares": [q.cpu() for q in self.squares],
            "late": [t.cpu() for t in self.late],
            "joined": [t.cpu() for t in self.joined],
            **({"origin": [t.cpu() for t in self.origin]} if self.origin else {}),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict | None, where: str) -> None:
        """The masks and sums of a checkpoint (call before the Trainable's snapshot: its frozen values are then the
        loaded weights, the base wherever the loaded mask is off)."""
        state = state or {}
        masks, sums, squares = (state.get(k, ()) for k in ("masks", "sums", "squares"))
        if not len(masks) == len(sums) == len(squares) == len(self.moving):
            raise AdvtuneError(f"{where} has no moving mask for this run (--regrow); start a new run")
        for (_, i, p, _), m, s, q, s_now, q_now in zip(self.moving, masks, sums, squares, self.sums, self.squares):
            self.trainable.partial[i][1].copy_(m.to(p.device))
            s_now.copy_(s.to(s_now.device))
            q_now.copy_(q.to(q_now.device))
        # a checkpoint from before --regrow-rate / --regrow-drop has neither: it ran at rate 1 and dropped by the
        # total change, which its resume keeps (a changed setting is refused)
        for key, now in (("late", self.late), ("joined", self.joined)):
            saved = state.get(key) or [torch.zeros_like(t) for t in now]
            if len(saved) != len(now):
                raise AdvtuneError(f"{where} has no moving mask for this run (--regrow); start a new run")
            for t, t_now in zip(saved, now):
                t_now.copy_(t.to(t_now.device))
        if self.origin:  # lacking in a checkpoint of 8941fd8: an entry that joined late joined at the base
            saved = state.get("origin") or [
                torch.where(j > 0, base, start) for (*_, base), j, start in zip(self.moving, self.joined, self.origin)
            ]
            for t, t_now in zip(saved, self.origin):
                t_now.copy_(t.to(t_now.device))
        self.has_late = [bool(t.any()) for t in self.late]
        self.write_back(self.trainable.selection)  # the selection follows the loaded mask (keep-best reads it)

    def write_back(self, selection) -> None:
        """The final masks into the selection's entries (what selection.json records)."""
        for name, m in self.masks().items():
            selection.entries[name] = m.detach().to("cpu", torch.bool).clone()
