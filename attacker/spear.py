"""SPEAR-class exact batch recovery from the gradient of a linear layer followed by a ReLU. Pure torch.

A linear layer Z = W X + c (X: the layer's inputs, one column per example) has weight gradient
dW = G X^T and bias gradient dc = G 1, with G = dL/dZ (one column g_j per example). Three facts give X exactly
(after Dimitrov, Baader, Mueller and Vechev, "SPEAR: Exact Gradient Inversion of Batches in Federated
Learning", NeurIPS 2024):

- rank: dW has rank b, the batch size (for b below both of its sides), so its singular values say b;
  dW = U_b S_b V_b^T, and G = U_b Q, X^T = Q^{-1} S_b V_b^T for some unknown invertible b x b matrix Q;
- sparsity: the ReLU after the layer zeroes g_j wherever example j left a unit off, so each column of Q
  is orthogonal to many rows of U_b. Sampling b - 1 rows of U_b and taking their common null vector gives a
  candidate column; it is right when the b - 1 rows all lie in one example's zeros, and then U_b q has far more
  zeros than the b - 1 sampled (the filter), while a wrong candidate has those b - 1 alone;
- scale: a candidate is a direction only; dc = U_b Q s fixes each column's scale (and sign) s = Q^{-1} U_b^T dc,
  so X^T = diag(s)^{-1} Q^{-1} S_b V_b^T.

Each filtered candidate is refit on all the rows it is zero on (attacker/spear_pool.py): an image's direction
is then exact to the gradient's precision and counts all its zeros. Two images that leave many of the same
units off make mixtures that are zero on nearly as many rows; the rows both leave off are orthogonal to a
plane, not a line, so a mixture is told apart and split into the two images' own directions. The b candidates
are chosen greedily from the refit ones (sparsest first, each linearly independent of those chosen). With the
layer's weights, the last few need no sampling: the missing images' rows of Q^{-1} lie in the normal space
of the known columns, and a point p there gives an input R^T p / (p . U_b^T dc) whose pre-activations say
which units it leaves off, and so (from their rows of U_b) its direction: exactly when one is
missing (`_complete`), by a search over that space when 2 or 3 are (`_normal_search`).

A sample hits example j's zeros with probability about sparsity^(b-1), so the cost grows
exponentially in b: `budget` caps the samples, and a rank above `max_rank`, a rank the gradient cannot show
(as large as the layer's live units), or too few directions within the budget give a failed result with
its reason, never an unverified batch. Every victim whose gradient has the same rank is sampled in one
vectorised draw.
"""
from dataclasses import dataclass
from typing import Any

import torch

from attacker.spear_pool import MIN_EXTRA_ZEROS, ZERO_SHARE, Pool, distinct_rows, zero_rows

RANK_GAP = 1e3  # a drop of the singular values by this factor ends the rank
RANK_FLOOR = 1e-7  # singular values under this share of the largest are rounding, whatever the gap
MAX_RANK = 40  # beyond this the sampling cost (about 2^(b-1) draws per example) is out of reach
BUDGET = 200_000  # candidate directions drawn per victim, at most
CHUNK = 8192  # candidates drawn per victim per vectorised step
SWAPS = 32  # pool candidates tried in each position when the sparsest batch fails the ReLU check
SWAP_ROUNDS = 4  # rounds of swaps, each from the previous round's best set, while the contradictions fall
RELU_SLACK = 1e-3  # the ReLU check's margin, in shares of the largest pre-activation
NORMAL_MISSING = 3  # with at most this many directions missing, they are searched for in the known ones' normal space
NORMAL_DRAWS = 20_000  # points drawn in that space per search
NORMAL_EXTRA_ROWS = 8  # rows beyond b - 1 a point's null vector must fit
CARRY_SHARE = 1e-2  # the ReLU check counts a unit as carrying gradient above this share of the example's largest



@dataclass
class SpearResult:
    """One gradient's answer: the layer's inputs (b, features) and dL/dZ (units, b) when found, else a reason.

    `batch_size` is the rank read off the gradient (0 when none), `samples` the candidates drawn, `found` the
    distinct filtered directions found."""

    inputs: torch.Tensor | None
    directions: torch.Tensor | None
    batch_size: int
    reason: str = ""
    samples: int = 0
    found: int = 0

    @property
    def ok(self) -> bool:
        return self.inputs is not None


def gradient_rank(singular: torch.Tensor) -> int:
    """The rank of a gradient from its singular values (descending): the first drop by RANK_GAP, or the count
    above RANK_FLOOR of the largest."""
    if singular.numel() == 0 or float(singular[0]) <= 0:
        return 0
    s = singular / singular[0]
    above = int((s > RANK_FLOOR).sum())
    ratios = s[:above - 1] / s[1:above].clamp_min(1e-300)
    drops = (ratios > RANK_GAP).nonzero().flatten()
    return int(drops[0]) + 1 if len(drops) else above


def spear(weight_grads: list[torch.Tensor], bias_grads: list[torch.Tensor],
          layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None, *,
          off_rates: list[torch.Tensor] | None = None, budget: int = BUDGET,
          max_rank: int = MAX_RANK, seed: int = 0, sparsity_filter: bool = True,
          bias_scale: bool = True) -> list[SpearResult]:
    """Each gradient's batch of layer inputs, recovered exactly (see the module docstring).

    Parameters
    ----------
    weight_grads, bias_grads : list of Tensor
        Per victim, the layer's weight gradient (units, features) and bias gradient (units,), or any one
        common multiple of both (a weight change of one SGD step, a mean of several clients' changes).
    layers : list of (Tensor, Tensor), optional
        Per victim, the layer's weight and bias at which the gradient was taken. With them a batch is accepted
        only when its inputs switch on every unit its gradient runs through (the ReLU check), and the search
        ends at the first batch that passes; without them the whole budget is drawn and the b sparsest
        directions are taken unchecked.
    off_rates : list of Tensor, optional
        Per victim, each unit's share of inputs that leave it off (a server measures it on its own public
        images). Rows are then drawn in proportion to powers of it and of its odds, a different one each
        chunk, so the b - 1 rows of a draw lie in one example's zeros far more often than when drawn
        uniformly; None: uniform draws.
    budget : int
        The most candidate directions drawn per victim.
    max_rank : int
        Ranks above this fail at once with their reason.
    seed : int
        Fixes the draws.
    sparsity_filter, bias_scale : bool
        The attack's two steps, switchable only to show what each does (without the filter every candidate
        counts; without the bias every direction keeps unit scale).

    Returns
    -------
    list of SpearResult
        One per victim, in order.
    """
    results: list[SpearResult | None] = [None] * len(weight_grads)
    prepared: dict[int, list[Any]] = {}  # per rank: (index, live, U_b, S_b V_b^T, dc, distinct rows, off rates)
    for index, (dw, dc) in enumerate(zip(weight_grads, bias_grads, strict=True)):
        dw, dc = dw.detach().double().cpu(), dc.detach().double().cpu()
        live = (dw.abs().amax(1) > 0) | (dc != 0)
        if not bool(live.any()):
            results[index] = SpearResult(None, None, 0, "the layer's gradient is zero: no example reached it")
            continue
        u, s, vh = torch.linalg.svd(dw[live], full_matrices=False)
        b = gradient_rank(s)
        units = int(live.sum())
        if b >= min(units, dw.shape[1]):
            results[index] = SpearResult(None, None, b, f"the gradient has full rank {b} over the layer's {units} "
                                                        "live units: the batch size cannot be read off it, nor the "
                                                        "examples (more examples than units)")
        elif b > max_rank:
            results[index] = SpearResult(None, None, b, f"gradient rank {b} (the batch size) is above {max_rank}, "
                                                        "beyond the sampling's reach (its cost grows as 2^b)")
        elif b < 1:
            results[index] = SpearResult(None, None, 0, "the gradient has rank 0")
        else:
            distinct = distinct_rows(u[:, :b])
            rate = (off_rates[index].detach().double().cpu()[live][distinct] if off_rates is not None
                    else torch.full((len(distinct),), 0.5, dtype=torch.float64))
            prepared.setdefault(b, []).append((index, live, u[:, :b], s[:b, None] * vh[:b], dc[live], distinct,
                                               rate))
    for b, group in prepared.items():
        weights = None if layers is None else [layers[item[0]] for item in group]
        for (index, live, *_), result in zip(group, _solve(b, group, weights, budget, seed, sparsity_filter,
                                                             bias_scale)):
            if result.directions is not None:  # back to every unit of the layer
                full = torch.zeros(len(live), b, dtype=result.directions.dtype)
                full[live] = result.directions
                result.directions = full
            results[index] = result
    return [result for result in results if result is not None]


def _solve(b: int, group, layers, budget: int, seed: int, sparsity_filter: bool,
           bias_scale: bool) -> list[SpearResult]:
    """The victims of one rank b: candidates drawn for all of them at once, chunk by chunk; after each chunk a
    victim's pool of filtered candidates gives its b sparsest independent directions, which end its search
    when the batch they give passes the ReLU check (with the layer's weights) or when the budget is spent."""
    victims = len(group)
    width = max(len(item[5]) for item in group)
    basis = torch.zeros(victims, width, b, dtype=torch.float64)  # each victim's distinct rows of U_b
    valid = torch.zeros(victims, width, dtype=torch.bool)
    rates = torch.full((victims, width), 0.5, dtype=torch.float64)
    for v, (_, _, u, _, _, distinct, rate) in enumerate(group):
        basis[v, :len(distinct)], valid[v, :len(distinct)] = u[distinct], True
        rates[v, :len(distinct)] = rate.clamp(1e-3, 1 - 1e-3)
    odds = rates / (1 - rates)
    weightings = [rates, rates ** 2, odds, rates ** 4]
    chunk = 0
    generator = torch.Generator().manual_seed(seed)
    pools = [Pool(b, item[2][item[5]] if sparsity_filter else None) for item in group]
    answers: list[SpearResult | None] = [None] * victims
    drawn = torch.zeros(victims, dtype=torch.long)
    while True:
        active = torch.tensor([v for v in range(victims) if answers[v] is None and int(drawn[v]) < budget],
                              dtype=torch.long)
        if not len(active):
            break
        count = min(CHUNK, budget - int(drawn[active].min()))
        # weighted draws without replacement: the b - 1 first of exponential clocks of rate w_i
        weight = weightings[chunk % len(weightings)][active, None]
        chunk += 1
        keys = -torch.rand(len(active), count, width, generator=generator, dtype=torch.float64).log_() / weight
        keys.masked_fill_(~valid[active, None], float("inf"))  # only live units are sampled
        rows = keys.topk(b - 1, dim=-1, largest=False).indices  # (A, count, b - 1), distinct per draw
        sub = torch.gather(basis[active, None].expand(-1, count, -1, -1), 2,
                           rows[..., None].expand(-1, -1, -1, b))
        # the common null vector q = (y, 1) with sub[:, :-1] y = -sub[:, -1]; a draw whose rows span less than
        # b - 1 dimensions has no single null direction, and its square part is singular
        y, info = torch.linalg.solve_ex(sub[..., :-1], -sub[..., -1])
        q = torch.cat([y, torch.ones_like(y[..., :1])], -1)
        q = q / q.norm(dim=-1, keepdim=True)
        proper = (info == 0) & torch.isfinite(q).all(-1) & (y.abs().amax(-1) < 1e8)
        q = torch.where(proper[..., None], q, torch.zeros_like(q))
        g = torch.einsum("amb,acb->acm", basis[active], q)
        scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        zeros = ((g.abs() < ZERO_SHARE * scale) & valid[active, None]).sum(-1)
        keep = proper & (zeros >= b - 1 + MIN_EXTRA_ZEROS) if sparsity_filter else proper
        drawn[active] += count
        for a, v in enumerate(active.tolist()):
            picked = keep[a].nonzero().flatten()
            # without the filter, candidates count in the order drawn, whatever their zeros
            pools[v].add(q[a, picked], zeros[a, picked] if sparsity_filter else -torch.arange(len(picked)) -
                         len(pools[v].zeros))
            last = int(drawn[v]) >= budget
            if layers is None and not last:
                continue  # nothing to check a batch against: the whole budget is drawn
            result = _settle(pools[v], group[v], layers[v] if layers is not None else None, bias_scale,
                             int(drawn[v]))
            if result is not None and (result.ok or last):
                answers[v] = result
    return [answer if answer is not None else
            SpearResult(None, None, b, f"found {pool.independent()} of the {b} directions in {int(drawn[v])} "
                                       "samples (the budget)", int(drawn[v]), pool.independent())
            for v, (answer, pool) in enumerate(zip(answers, pools))]


def _settle(pool: "Pool", prepared, layer: tuple[torch.Tensor, torch.Tensor] | None, bias_scale: bool,
            drawn: int, again: bool = True) -> SpearResult | None:
    """The batch a victim's pool gives, or None while it holds fewer than b independent directions.

    Without the layer's weights: the b sparsest independent directions. With them: those, or (when their batch
    fails the ReLU check) the first batch that passes with one of them swapped for one of the next SWAPS
    sparsest candidates (a mixture of two examples can outrank an example's own direction); a failure says
    how far the best try was from passing."""
    picked = pool.select()
    b = pool.b
    _, live, u, r, dc, *_ = prepared
    if picked is None and layer is not None and bias_scale:
        known = pool.select(pool.independent())
        if known is not None and 2 <= b - len(known) <= NORMAL_MISSING:
            pool.add(*_normal_search(pool.directions[known].T, u, r, dc, live, layer))
            picked = pool.select()
    partial = None
    if picked is None:
        partial = pool.select(b - 1)
        if partial is None or layer is None or not bias_scale:
            return None
        picked = partial
    if layer is None:
        return _batches(pool.directions[picked][None].transpose(1, 2), u, r, dc, bias_scale, drawn)[0]
    order = torch.argsort(pool.zeros, descending=True).tolist()
    chosen, tries, fewest = list(picked), 0, None
    for _ in range(SWAP_ROUNDS if partial is None else 1):
        rest = [i for i in order if i not in set(chosen)][:SWAPS]
        base = pool.directions[chosen].T  # (b, b) columns, or b - 1 of them (each set then completed by its last)
        variants, sets = [base], [chosen]
        for position in range(len(chosen)):
            for other in rest:
                swapped = base.clone()
                swapped[:, position] = pool.directions[other]
                variants.append(swapped)
                sets.append(chosen[:position] + [other] + chosen[position + 1:])
        if partial is not None:
            completed = [(each, _complete(each, u, r, dc, live, layer)) for each in variants]
            variants = [torch.cat([each, last[:, None]], 1) for each, last in completed if last is not None]
            if not variants:
                return None
        q = torch.stack(variants)
        wrong = _contradictions(q, u, r, dc, live, layer, bias_scale)
        tries += len(q)
        best = int(torch.argmin(wrong))
        if int(wrong[best]) == 0:
            return _batches(q[best][None], u, r, dc, bias_scale, drawn)[0]
        if fewest is not None and int(wrong[best]) >= fewest:
            break
        fewest, chosen = int(wrong[best]), sets[best] if partial is None else chosen
    if partial is not None and again:
        # one of the b - 1 may be a mixture of two images' directions (it hides the second one): each set of
        # b - 2 left is searched for its two missing directions, and the pool is settled again
        for position in range(len(partial)):
            known = partial[:position] + partial[position + 1:]
            pool.add(*_normal_search(pool.directions[known].T, u, r, dc, live, layer, draws=NORMAL_DRAWS // 10))
        return _settle(pool, prepared, layer, bias_scale, drawn, again=False)
    return SpearResult(None, None, b, f"the {b} sparsest directions in {drawn} samples (the budget) give no "
                                      f"consistent batch: in the best of {tries} tries {fewest} unit(s) "
                                      "carry gradient while the recovered input leaves them off", drawn,
                       len(pool.zeros))


def _contradictions(q: torch.Tensor, u: torch.Tensor, r: torch.Tensor, dc: torch.Tensor, live: torch.Tensor,
                    layer: tuple[torch.Tensor, torch.Tensor], bias_scale: bool) -> torch.Tensor:
    """For each set of directions q (n, b, b): the units that carry an example's gradient while its recovered
    input leaves them off (the ReLU check; 0 for a consistent batch)."""
    b = q.shape[-1]
    s = (torch.linalg.solve_ex(q, (u.T @ dc).expand(len(q), b))[0] if bias_scale
         else torch.ones(len(q), b, dtype=torch.float64))
    qs = q * s[:, None, :]
    weight, bias = layer
    rw = r @ weight.double().cpu()[live].T  # (b, units): the pre-activations are (Q diag(s))^{-1} rw + c
    z, info = torch.linalg.solve_ex(qs, rw.expand(len(q), -1, -1))
    z = z + bias.double().cpu()[live]
    g = (u @ qs).transpose(1, 2)  # (variants, b, units)
    carries = g.abs() > CARRY_SHARE * g.abs().amax(2, keepdim=True)
    off = z < -RELU_SLACK * z.abs().amax(2, keepdim=True)
    wrong = (carries & off).sum((1, 2))
    wrong[(info != 0) | ~torch.isfinite(z).all(2).all(1)] = torch.iinfo(wrong.dtype).max
    return wrong


def _complete(q: torch.Tensor, u: torch.Tensor, r: torch.Tensor, dc: torch.Tensor, live: torch.Tensor,
              layer: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
    """The last direction when b - 1 are known (q: b x (b - 1) columns), or None.

    The missing example's row of Q^{-1} is orthogonal to the b - 1 known columns, so it is their normal n up to
    scale, and its input x = R^T n / (n . U_b^T dc) does not depend on that scale. Its pre-activations at the
    layer's weights give the units it leaves off; the direction is the common null vector of their rows of U_b."""
    b = q.shape[0]
    n = torch.linalg.svd(q.T)[2][-1]  # the unit normal of the b - 1 columns
    denominator = float(n @ (u.T @ dc))
    if abs(denominator) < 1e-300:
        return None
    weight, bias = layer
    x = r.T @ n / denominator
    z = weight.double().cpu()[live] @ x + bias.double().cpu()[live]
    off = z < -RELU_SLACK * z.abs().max()
    if int(off.sum()) < b - 1:
        return None
    return torch.linalg.svd(u[off])[2][-1]


def _normal_search(q: torch.Tensor, u: torch.Tensor, r: torch.Tensor, dc: torch.Tensor, live: torch.Tensor,
                   layer: tuple[torch.Tensor, torch.Tensor], draws: int = NORMAL_DRAWS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates for the k = b - (known) missing directions, drawn in the k-dimensional normal space of the
    known columns q (b x known) instead of among rows: each missing image's row of Q^{-1} lies there, and a point p
    of it gives an input x = R^T p / (p . U_b^T dc), whose most negative pre-activations at the sent weights are
    units that image leaves off when p is near its row; the common null vector of those rows of U_b is a
    candidate, kept (with its zero count) by the same sparsity filter as the sampled ones."""
    b, k = q.shape[0], q.shape[0] - q.shape[1]
    normal = torch.linalg.svd(q.T)[2][-k:]  # (k, b) orthonormal rows
    generator = torch.Generator().manual_seed(k)
    p = torch.randn(draws, k, generator=generator, dtype=torch.float64) @ normal  # (draws, b)
    weight, bias = layer
    rw = r @ weight.double().cpu()[live].T  # (b, units)
    z = (p @ rw) / (p @ (u.T @ dc))[:, None] + bias.double().cpu()[live]
    rows = z.topk(b - 1 + NORMAL_EXTRA_ROWS, dim=1, largest=False).indices  # the most clearly off units
    _, sv, vh = torch.linalg.svd(u[rows])
    candidates = vh[:, -1]
    flat = sv[:, -1] < 1e-4 * sv[:, 0]  # the rows share a null vector: all lie in one image's zeros
    zeros = zero_rows(candidates[flat], u).sum(1)
    keep = zeros >= b - 1 + MIN_EXTRA_ZEROS
    return candidates[flat][keep], zeros[keep]


def _batches(q: torch.Tensor, u: torch.Tensor, r: torch.Tensor, dc: torch.Tensor, bias_scale: bool,
             drawn: int) -> list[SpearResult]:
    """The batch each set of directions `q` (n, b, b) gives: each direction's scale from the bias gradient,
    then the inputs."""
    b = q.shape[-1]
    results = []
    for each in q:
        s = torch.linalg.solve(each, u.T @ dc) if bias_scale else torch.ones(b, dtype=torch.float64)
        if bool((s.abs() < 1e-12 * s.abs().max().clamp_min(1e-300)).any()):
            results.append(SpearResult(None, None, b, "an example's bias gradient is zero: its scale is unknown",
                                       drawn, b))
            continue
        qs = each * s  # G = U_b Q diag(s)
        results.append(SpearResult(torch.linalg.solve(qs, r), u @ qs, b, "", drawn, b))  # X^T = (Q diag(s))^-1 R
    return results
