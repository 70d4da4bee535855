"""SPEAR's candidate directions for one victim: refit on their zero rows, mixtures split, the sparsest chosen.

Pure torch; attacker/spear.py draws the candidates and checks the batches they give (its docstring has the
notation: U_b, the rows of dL/dZ's left singular vectors; a direction q, a column of Q with dL/dZ = U_b Q).
"""
import torch

ZERO_SHARE = 1e-4  # |g_i| under this share of max |g| counts as a zero of the ReLU
MIN_EXTRA_ZEROS = 2  # a candidate needs this many zeros beyond the b - 1 it was sampled on
SAME_DIRECTION = 1e-4  # 1 - |cos| under which two candidates are one direction
INDEPENDENT = 1e-3  # the smallest singular value of the chosen (unit) directions must stay above this
POOL_EXTRA = 96  # candidates a victim's pool keeps beyond b, the sparsest
MIXTURE_NULL = 1e-4  # a singular value of a candidate's zero rows under this share of their largest is a null direction
MIXTURE_PINS = 3  # rows a mixture may be pinned on beyond those both its images leave off
SAME_ANGLE = 1e-5  # radians within which two rows vanish at one angle of a mixture's plane


class Pool:
    """A victim's distinct filtered candidates (unit directions) with their zero counts.

    With `rows` (the distinct rows of U_b) every candidate entering the pool is first refined
    (`refine`): refit as the common null vector of all the rows it is zero on, and, when those rows leave a
    plane rather than a line (a mixture of two images, which every row off for both images is orthogonal to),
    split into the two images' own directions."""

    def __init__(self, b: int, rows: torch.Tensor | None = None):
        self.b, self.rows = b, rows
        self.directions = torch.empty(0, b, dtype=torch.float64)
        self.zeros = torch.empty(0, dtype=torch.long)

    def add(self, candidates: torch.Tensor, zeros: torch.Tensor) -> None:
        if not len(candidates):
            return
        order = torch.argsort(zeros, descending=True)
        candidates = candidates[order] / candidates[order].norm(dim=1, keepdim=True)
        zeros = zeros[order]
        fresh = self._fresh(candidates)
        candidates, zeros = candidates[fresh], zeros[fresh]
        if self.rows is not None and len(candidates):
            candidates, zeros = refine(candidates[:self.b + POOL_EXTRA], self.rows, self.b)
            fresh = self._fresh(candidates)
            candidates, zeros = candidates[fresh], zeros[fresh]
        directions = torch.cat([self.directions, candidates])
        zeros = torch.cat([self.zeros, zeros])
        keep = torch.argsort(zeros, descending=True, stable=True)[:self.b + POOL_EXTRA]  # the sparsest only
        self.directions, self.zeros = directions[keep], zeros[keep]

    def _fresh(self, candidates: torch.Tensor) -> torch.Tensor:
        """Which of the (unit) candidates are neither in the pool nor a copy of an earlier one."""
        fresh = torch.ones(len(candidates), dtype=torch.bool)
        if len(self.zeros):
            fresh &= ((candidates @ self.directions.T).abs() < 1 - SAME_DIRECTION).all(1)
        within = ((candidates @ candidates.T).abs() >= 1 - SAME_DIRECTION).tril(-1).any(1)  # a copy of an earlier one
        return fresh & ~within

    def independent(self) -> int:
        """How many independent directions the pool holds."""
        return int(torch.linalg.matrix_rank(self.directions, atol=INDEPENDENT)) if len(self.zeros) else 0

    def select(self, count: int | None = None) -> list[int] | None:
        """Greedy selection of `count` (default b) directions: sparsest first, each kept when linearly independent
        of those kept; their indices, or None when the pool holds fewer independent ones."""
        count = self.b if count is None else count
        kept: list[int] = []
        basis = torch.empty(0, self.b, dtype=torch.float64)
        for index in torch.argsort(self.zeros, descending=True).tolist():
            q = self.directions[index]
            residual = q - basis.T @ (basis @ q)
            if float(residual.norm()) > INDEPENDENT:
                kept.append(index)
                basis = torch.cat([basis, (residual / residual.norm())[None]])
                if len(kept) == count:
                    return kept
        return None


def zero_rows(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(n, rows) mask: the rows each direction q (n, b) is zero on, U_b q below ZERO_SHARE of its largest."""
    g = (q @ rows.T).abs()
    return g < ZERO_SHARE * g.amax(1, keepdim=True).clamp_min(1e-300)


def null_fit(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Each direction q (n, b) refit as the common null vector (least squares) of all the rows it is zero on."""
    return torch.linalg.svd(rows[None] * zero_rows(q, rows)[..., None], full_matrices=False)[2][:, -1]


def refine(q: torch.Tensor, rows: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates q (n, b) refit on all their zero rows, mixtures split; the results and their zero counts.

    An image's direction q_j is orthogonal to every row of U_b the image leaves off, and those rows span the
    rest of the space, so they have one common null vector: refit on all of them (not only the b - 1 drawn) it
    is q_j to the gradient's precision, and its zeros are all of the image's. A mixture of images i and j is
    zero on the rows both leave off, plus the few drawn rows that pinned it: without those few the rows leave
    a plane, span{q_i, q_j}. On that plane every row off for i but not j vanishes at q_i's angle and vice
    versa, so the two angles where most rows vanish give q_i and q_j."""
    mask = zero_rows(q, rows)
    a = rows[None] * mask[..., None]  # (n, rows, b): each candidate's zero rows, the others zeroed
    sv, vh = torch.linalg.svd(a, full_matrices=False)[1:]
    refit, tolerance, enough = vh[:, -1], MIXTURE_NULL * sv[:, 0], b + MIN_EXTRA_ZEROS  # the common null vectors
    count = mask.sum(1)
    mixed = (sv[:, -2] <= tolerance) & (count >= enough)  # more rows than span b - 1 dimensions, yet they leave a plane
    several = mixed & (sv[:, -3] <= tolerance)  # three images or more: left out
    plane = vh[:, -2:].clone()
    for _ in range(MIXTURE_PINS):  # drop the pinning rows one at a time: the row furthest from the plane
        if bool(mixed.all()):
            break
        reach = (a @ vh[:, -2, :, None])[..., 0].abs()
        a = a.clone()
        a[torch.arange(len(a)), reach.argmax(1)] = 0
        count = count - 1
        sv, vh = torch.linalg.svd(a, full_matrices=False)[1:]
        flat = ~mixed & (sv[:, -2] <= tolerance) & (count >= enough)
        plane[flat] = vh[flat, -2:]
        several |= flat & (sv[:, -3] <= tolerance)
        mixed |= flat
    parts = split_mixtures(plane[mixed & ~several], rows, b)
    if len(parts):  # each image's direction refit on all its zero rows, as the others are
        parts = null_fit(parts, rows)
    out = torch.cat([refit[~mixed], parts])
    if not len(out):
        return out, torch.empty(0, dtype=torch.long)
    zeros = zero_rows(out, rows).sum(1)
    keep = zeros >= b - 1 + MIN_EXTRA_ZEROS
    return out[keep], zeros[keep]


def split_mixtures(planes: torch.Tensor, rows: torch.Tensor, b: int) -> torch.Tensor:
    """The two image directions in each plane (m, 2, b) spanned by a mixture: the angles at which most rows of
    U_b vanish (rows off for both images vanish everywhere on the plane and are left out)."""
    p = rows @ planes.transpose(1, 2)  # (m, rows, 2)
    size = p.norm(dim=2)
    seen = size > ZERO_SHARE * size.amax(1, keepdim=True)
    angle = torch.atan2(-p[..., 0], p[..., 1]) % torch.pi  # u . (cos t a + sin t b) = 0
    out = []
    for each, on, plane in zip(angle, seen, planes):
        values = torch.sort(each[on]).values
        if len(values) < 2:
            continue
        # runs of equal angles (within SAME_ANGLE): the two longest are the two images
        breaks = (values[1:] - values[:-1] > SAME_ANGLE).nonzero().flatten() + 1
        starts = torch.cat([torch.tensor([0]), breaks])
        ends = torch.cat([breaks, torch.tensor([len(values)])])
        lengths = ends - starts
        for run in torch.argsort(lengths, descending=True)[:2].tolist():
            if int(lengths[run]) < MIN_EXTRA_ZEROS:
                break
            t = float(values[starts[run]:ends[run]].median())
            out.append(torch.cos(torch.tensor(t, dtype=torch.float64)) * plane[0] +
                       torch.sin(torch.tensor(t, dtype=torch.float64)) * plane[1])
    return torch.stack(out) if out else torch.empty(0, b, dtype=torch.float64)


def distinct_rows(u: torch.Tensor) -> torch.Tensor:
    """The indices of U_b's rows that are distinct directions. Units that only one example switched on (or any
    with proportional rows of G) give proportional rows, which are one constraint: counted apart, a wrong
    candidate orthogonal to one of them would count every copy as a zero."""
    unit = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = (unit @ unit.T).abs()
    keep: list[int] = []
    taken = torch.zeros(len(u), dtype=torch.bool)
    for i in range(len(u)):
        if not bool(taken[i]):
            keep.append(i)
            taken |= cos[i] > 1 - 1e-9
    return torch.tensor(keep, dtype=torch.long)
