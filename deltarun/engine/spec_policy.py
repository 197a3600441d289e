"""When to speculate (`--mtp on|off|auto`), and the acceptance rule for sampled drafts.

Auto keeps MTP only while it really speeds decoding up: it measures, at run time, the cost per emitted
token of speculative and of plain steps (over a probe's steps together, then exponential moving averages),
each step's seconds counted in plain steps of the same batch size and its tokens per row, so that steps of a
server's batches, which swing between a few rows and many as requests come and go, compare like with like
(seconds per token alone made a speculative probe at 16 rows look cheaper than plain steps measured at
2). It starts with a short probe of each (plain first; a speculative probe that clearly loses ends after
one measured step). It then runs the cheaper mode and re-probes the other now and then, doubling
the pause each time the decision stands, so a losing mode costs a vanishing share of steps (the issue's
bar: auto never below 0.97× plain). The first step after a switch is not measured: speculative rows
resynchronise their MTP context in it.
"""
from __future__ import annotations

import torch

from ..ops.sampling import draw

PROBE = 4  # measured steps per mode per probe
FIRST_HOLD, MAX_HOLD = 64, 4096  # steps between probes of the losing mode
MARGIN = 0.98  # speculate only when it is at least 2% cheaper per token (noise, and probe costs)
# A speculative probe ends after one measured step when it costs this much more per token. Not lower: one
# step's tokens are a coin toss (k=2 at 50% acceptance emits 1 token 30% of the time, then costs ~1.35× per
# token), and a probe dropped wrongly keeps a winning mode off for FIRST_HOLD steps (measured: 1.24× → 0.97×).
EARLY = 1.5
EMA = 0.3


class SpecPolicy:
    def __init__(self, mode: str):
        if mode not in ("on", "off", "auto"):
            raise ValueError(f"mtp must be 'on', 'off' or 'auto', not {mode!r}")
        self.mode = mode
        # per emitted token per row, in plain steps of the same batch size (plain's is ≈ 1 by construction)
        self.cost: dict[bool, float | None] = {True: None, False: None}
        self.plain_step: dict[int, float] = {}  # seconds of a plain step by batch size (moving averages)
        self.samples = {True: 0, False: 0}  # measured steps in the current probe of each mode
        self._probe: dict[bool, tuple[float, float]] = {True: (0.0, 0.0), False: (0.0, 0.0)}  # its sums
        self.last: bool | None = None
        self.hold, self.until_probe = FIRST_HOLD, 0
        self.probing: bool | None = False  # the mode being probed now (None: the winner runs); plain first
        self.last_winner: bool | None = None

    def winner(self) -> bool:
        spec, plain = self.cost[True], self.cost[False]
        return spec is not None and plain is not None and spec < MARGIN * plain

    def speculate(self) -> bool:
        if self.mode != "auto":
            return self.mode == "on"
        if self.probing is not None:
            spec, plain = self.cost[True], self.cost[False]  # spec is set once a speculative step was measured
            hopeless = self.probing and self.samples[True] and spec is not None and plain is not None \
                and spec > EARLY * plain  # do not pay a whole probe for a clear loser
            if self.samples[self.probing] < PROBE and not hopeless:
                return self.probing
            if self.cost[not self.probing] is None:  # first probes: measure the other mode too
                self.probing = not self.probing
                return self.probing
            before = self.last_winner
            self.last_winner = self.winner()
            self.hold = min(MAX_HOLD, self.hold * 2) if before == self.last_winner else FIRST_HOLD
            self.probing, self.until_probe = None, self.hold
        if self.until_probe <= 0:
            self.probing = not self.last_winner
            self.samples[self.probing] = 0
            return self.probing
        self.until_probe -= 1
        assert self.last_winner is not None  # decided when the first probes ended
        return self.last_winner

    def record(self, spec: bool, seconds: float, tokens: int, rows: int | None = None) -> None:
        """One measured step: its seconds, the tokens it emitted and its batch size (`rows`, plain steps: the
        tokens)."""
        rows = rows or tokens
        switched, self.last = self.last is not None and self.last != spec, spec
        if self.mode != "auto" or switched or tokens <= 0 or rows <= 0:
            return
        if not spec:
            old = self.plain_step.get(rows)
            self.plain_step[rows] = seconds if old is None else (1 - EMA) * old + EMA * seconds
        steps, per_row = seconds / self._plain_step(rows, seconds), tokens / rows
        n = self.samples[spec]
        if n < PROBE:  # a probe: sums over its steps (a step's own ratio swings with its acceptance)
            s0, t0 = (0.0, 0.0) if n == 0 else self._probe[spec]
            self._probe[spec] = s0 + steps, t0 + per_row
            self.cost[spec] = (s0 + steps) / (t0 + per_row)
        else:  # the running mode: follow slow drifts (longer contexts, other load)
            cost = self.cost[spec]
            assert cost is not None  # its probe measured it
            self.cost[spec] = (1 - EMA) * cost + EMA * steps / per_row
        self.samples[spec] += 1

    def _plain_step(self, rows: int, seconds: float) -> float:
        """A plain step's seconds at this batch size: measured, else at the nearest size measured (else this
        step's own, which counts it as one plain step)."""
        if not self.plain_step:
            return seconds
        return self.plain_step[min(self.plain_step, key=lambda r: (abs(r - rows), r))]


def rejection_step(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator | None
                   ) -> tuple[int, bool]:
    """Standard speculative sampling for one position: `draft` was drawn from q [V]; keep it with
    probability min(1, p(d)/q(d)), else draw from max(0, p − q) renormalised. The token returned is
    distributed exactly as p [V]. Returns (token, accepted)."""
    pd, qd = float(p[draft]), float(q[draft])
    if float(torch.rand((), generator=generator)) * qd < pd:
        return draft, True
    resid = (p - q).clamp_(min=0)
    resid = resid if float(resid.sum()) > 0 else p  # p == q: a rejection cannot happen (kept safe)
    return draw(resid, generator), False
