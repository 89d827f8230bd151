"""Tail weight averaging: record #92's terminal "ships" (modded-nanogpt PR #360, "ANVIL2").

Over the last steps of the schedule, float32 moving averages of groups of weights are kept at
the steps each ship's cadence picks (the first such step seeds the average with the weights);
after the last step they go into the weights, blended or in their place, in the order below.
Then the groups the record renormalises (lm_head, embed, Q/K, V/O, MLP: not the value
embeddings) are scaled back to the Frobenius norm they had before any ship, a group's norm
taken over all its tensors (the record's "decontraction"). Validation and the saved model see
the result; checkpoints carry the averages.

==============  =======================  ===========================================  ========
ship            groups                   ticks, after the optimizer step of step s     at the end
==============  =======================  ===========================================  ========
tail EMA        lm_head, embed           odd s at rate 1 - (1 - r)^2, r = 2 / (W + 1)  blend
                (``tail_ema_window`` W)  (one update for Adam's two steps); r at the    0.65
                                         last step; an even first step only seeds
tail average    V/O, MLP                 every 4th step counted back from the last,    replaced
                (``tail_average_window``)  rate 4/53
value average   value embeddings         s = 3 mod 4, rate 4/53                        replaced
                (``tail_average_window``)
bank blend      Q/K, V/O, MLP            s = 1 mod 4 and the last two steps, rate      0.55; V/O
                (``bank_blend_window`` W)  2 / (W // 4 + 1)                             and MLP
                                                                                       0.3493
==============  =======================  ===========================================  ========

The cadences are the record's: its Adam moves the lm_head and the embedding on odd steps, and
(from its step 336) the value embeddings on steps 3 mod 4; ANVIL moves the matrices every step.
The bank blend's share is ``bank_blend`` less ``bank_blend_correction`` (0.55 - 0.2007) where
the tail average has already replaced the weights. tests/test_averaging.py holds all four to
the record's own code.
"""

import math

import torch
from torch import Tensor

AVERAGE_RATE = 4 / 53  # the record's rate for its tail and value averages, whatever the window
RENORMALISED = ("embed", "lm_head", "mlp", "qk", "vo")


def model_groups(model) -> dict[str, dict[str, Tensor]]:
    """The record's parameter groups in record #89's GPT: {group: {name: parameter}}."""
    named = dict(model.named_parameters())

    def ending(*suffixes):
        return {n: p for n, p in named.items() if n.endswith(suffixes)}

    return {"lm_head": {"lm_head": model.lm_head}, "embed": {"embed": model.embed},
            "value_embeds": {n: p for n, p in named.items() if n.startswith("value_embeds.")},
            "qk": ending(".attn.qk"), "vo": ending(".attn.vo"),
            "mlp": ending(".mlp.fc", ".mlp.proj")}


def tail_ema_rate(step: int, window: int, total: int) -> float | None:
    r = 2.0 / (window + 1)
    if step % 2 == 0:  # Adam did not move the weights: only the window's first step seeds
        return r if step == total - window else None
    return r if step == total - 1 else -math.expm1(2.0 * math.log1p(-r))


def tail_average_rate(step: int, window: int, total: int) -> float | None:
    return AVERAGE_RATE if (total - 1 - step) % 4 == 0 else None


def value_average_rate(step: int, window: int, total: int) -> float | None:
    return AVERAGE_RATE if step % 4 == 3 else None


def bank_blend_rate(step: int, window: int, total: int) -> float | None:
    return 2 / (window // 4 + 1) if step % 4 == 1 or step >= total - 2 else None


class Ship:
    """One average: the tensors of ``groups`` ({group: {name: tensor}}) averaged in float32
    at the steps ``cadence`` picks in the last ``window`` of ``total`` steps; ``blend``
    {group: share of the average, or None to put the average in the weights' place}."""

    def __init__(self, name: str, groups: dict, window: int, total: int, cadence, blend: dict):
        self.name, self.groups, self.window, self.total = name, groups, window, total
        self.cadence, self.blend = cadence, blend
        self.tensors = {name: t for tensors in groups.values() for name, t in tensors.items()}
        self.averages: dict[str, Tensor] = {}

    def rate(self, step: int) -> float | None:
        """The update's rate after the optimizer step of ``step`` (0-based), None for none."""
        if step < self.total - self.window:
            return None
        return self.cadence(step, self.window, self.total)

    @torch.no_grad()
    def tick(self, step: int) -> None:
        rate = self.rate(step)
        if rate is None:
            return
        for name, tensor in self.tensors.items():
            if name not in self.averages:
                self.averages[name] = tensor.detach().float().clone()
            else:
                self.averages[name].lerp_(tensor.detach().float(), rate)

    @torch.no_grad()
    def ship(self) -> bool:
        """Put the averages into the weights; False before the window has begun."""
        if not self.averages:
            return False
        for group, tensors in self.groups.items():
            share = self.blend[group]
            for name, tensor in tensors.items():
                average = self.averages.pop(name)
                tensor.copy_(average if share is None else torch.lerp(tensor.float(), average,
                                                                      share))
        return True


class TailShips:
    """The ships a schedule config asks for, over ``groups`` (``model_groups``): ``tick(step)``
    after each step's optimizer update, ``ship()`` after the last."""

    def __init__(self, groups: dict, schedule_config, total: int):
        sc = schedule_config
        self.groups = groups
        self.ships = []

        def add(name, names, window, cadence, blend):
            self.ships.append(Ship(name, {g: groups[g] for g in names}, window, total, cadence,
                                   {g: blend(g) for g in names}))

        if sc.tail_ema_window:
            add("tail EMA", ("lm_head", "embed"), sc.tail_ema_window, tail_ema_rate,
                lambda g: sc.tail_ema_blend)
        if sc.tail_average_window:
            add("tail average", ("vo", "mlp"), sc.tail_average_window, tail_average_rate,
                lambda g: None)
            add("value average", ("value_embeds",), sc.tail_average_window,
                value_average_rate, lambda g: None)
        if sc.bank_blend_window:
            averaged = ("vo", "mlp") if sc.tail_average_window else ()
            add("bank blend", ("qk", "vo", "mlp"), sc.bank_blend_window, bank_blend_rate,
                lambda g: sc.bank_blend - sc.bank_blend_correction if g in averaged
                else sc.bank_blend)

    def tick(self, step: int) -> None:
        for ship in self.ships:
            ship.tick(step)

    @torch.no_grad()
    def ship(self) -> list[str]:
        """Every ship in order, then each renormalised group its norm from before them;
        returns the names of the ships that had begun."""
        touched = {g for ship in self.ships if ship.averages for g in ship.groups}
        renormalised = [g for g in RENORMALISED if g in touched]
        before = {g: _norm(self.groups[g]) for g in renormalised}
        shipped = [ship.name for ship in self.ships if ship.ship()]
        for group in renormalised:
            now = _norm(self.groups[group])
            ratio = torch.where(now > 0, before[group] / now, 1.0).item()
            for tensor in self.groups[group].values():
                tensor.mul_(ratio)
        return shipped

    def state_dict(self) -> dict:
        return {f"{ship.name}/{name}": average.clone() for ship in self.ships
                for name, average in ship.averages.items()}

    def load_state_dict(self, state: dict) -> None:
        """Averages by "ship/tensor" (a checkpoint from before the other ships keyed the tail
        EMA's by tensor name alone)."""
        ships = {ship.name: ship for ship in self.ships}
        for ship in self.ships:
            ship.averages = {}
        for key, value in state.items():
            name, tensor = key.split("/", 1) if "/" in key else ("tail EMA", key)
            ship = ships.get(name)
            if ship is None or tensor not in ship.tensors:
                raise ValueError(f"tail average state {key!r} matches no ship of this run")
            ship.averages[tensor] = value.float().to(ship.tensors[tensor].device).clone()


def _norm(tensors: dict) -> Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors.values()]).norm()
