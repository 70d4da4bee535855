"""Optimisers over a batch of independent problems: one row of `z` (rows, dims) per victim restart.

Every row keeps its own state (moments, step count, curvature history, line search), so a row
optimised with 63 others follows the same path as alone; rows can be reset when the engine re-draws
a diverged restart. A step updates only the rows in its `active` mask, with `torch.where` over all
rows (static shapes, no gathering), and returns the new point with its loss and gradient. The one
exception is L-BFGS's line search, whose retries evaluate only the rows that need them.
"""
from collections.abc import Callable

import torch

# evaluate(z) -> (loss (rows,), gradient (rows, dims)) for every row; evaluate(z_some, rows) for some rows
Evaluate = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Project = Callable[[torch.Tensor], torch.Tensor]

HISTORY = 100  # L-BFGS pairs kept per row: torch.optim.LBFGS's default, which the DLG code uses


def _where_rows(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` in the rows of `mask`, `old` elsewhere; the mask is (rows,), the tensors (rows, ...)."""
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


class Adam:
    """Adam per element, optionally on the gradient's sign (as Inverting Gradients does), with
    Inverting Gradients' step decay (x0.1 at 3/8, 5/8, 7/8 of the iterations) counted per row."""

    def __init__(self, z: torch.Tensor, lr: float, iterations: int, signed: bool = False,
                 decay: bool = False, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.signed, self.betas, self.eps = lr, signed, betas, eps
        self.milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if decay else []
        self.m = torch.zeros_like(z)
        self.v = torch.zeros_like(z)
        self.t = torch.zeros(z.shape[0], device=z.device, dtype=torch.long)
        self.converged = torch.zeros(z.shape[0], device=z.device, dtype=torch.bool)  # Adam never stops early

    @staticmethod
    def bytes_per_row(dims: int, itemsize: int = 4) -> int:
        return 2 * dims * itemsize

    def reset(self, rows: torch.Tensor) -> None:
        """Forget the rows of the boolean mask `rows` (their restart was re-drawn)."""
        self.m = _where_rows(rows, torch.zeros_like(self.m), self.m)
        self.v = _where_rows(rows, torch.zeros_like(self.v), self.v)
        self.t = torch.where(rows, 0, self.t)

    def step(self, z, loss, gradient, evaluate: Evaluate, active, project: Project):
        g = gradient.sign() if self.signed else gradient
        b1, b2 = self.betas
        self.t = t = self.t + active.long()
        self.m = _where_rows(active, self.m * b1 + (1 - b1) * g, self.m)
        self.v = _where_rows(active, self.v * b2 + (1 - b2) * g * g, self.v)
        lr = torch.full_like(t, self.lr, dtype=z.dtype)
        for milestone in self.milestones:
            lr = torch.where(t > milestone, lr * 0.1, lr)
        t = t.clamp_min(1).to(z.dtype).unsqueeze(1)
        m_hat = self.m / (1 - b1 ** t)
        v_hat = self.v / (1 - b2 ** t)
        z = _where_rows(active, project(z - lr.unsqueeze(1) * m_hat / (v_hat.sqrt() + self.eps)), z)
        new_loss, new_gradient = evaluate(z)
        return z, torch.where(active, new_loss, loss), _where_rows(active, new_gradient, gradient)


class LBFGS:
    """Limited-memory BFGS with a line search of each row's own.

    The DLG code runs torch's L-BFGS with a fixed unit step and no line search, which is why it
    sometimes diverges; here a trial step is only taken where it lowers that row's loss (else it is
    halved). The direction comes from the compact representation of the inverse Hessian (Byrd,
    Nocedal and Schnabel 1994), which equals the two-loop recursion but is a handful of batched
    kernels instead of 2 x history small ones: the pairs live in a ring of slots (rows, history, dims)
    shared by all rows, with their inner products S'Y and Y'Y kept up to date one slot at a time. A
    row whose pair is not kept (no curvature, a failed search) marks its slot invalid.
    """

    def __init__(self, z: torch.Tensor, lr: float = 1.0, history: int = HISTORY, max_line_search: int = 10,
                 patience: int = 200, progress: float = 1e-4):
        rows, dims = z.shape
        self.lr, self.history, self.max_line_search = lr, history, max_line_search
        self.patience, self.progress = patience, progress
        self.s = torch.zeros(rows, history, dims, device=z.device, dtype=z.dtype)
        self.y = torch.zeros_like(self.s)
        self.sy = torch.zeros(rows, history, history, device=z.device, dtype=z.dtype)  # sy[r, a, b] = s_a . y_b
        self.yy = torch.zeros_like(self.sy)
        self.valid = torch.zeros(rows, history, device=z.device, dtype=torch.bool)
        self.gamma = torch.zeros(rows, device=z.device, dtype=z.dtype)  # 0: no curvature known yet
        self.updates = 0
        # a row stops when even a gradient step cannot lower its loss, or when `patience` updates
        # have not lowered it by a fraction `progress`: it sits at its minimum to float precision
        self.converged = torch.zeros(rows, device=z.device, dtype=torch.bool)
        self.best = torch.full((rows,), float("inf"), device=z.device, dtype=z.dtype)
        self.stalled = torch.zeros(rows, device=z.device, dtype=torch.long)

    @staticmethod
    def bytes_per_row(dims: int, history: int = HISTORY, itemsize: int = 4) -> int:
        """The optimiser's memory for one row: the pairs (2 x history x dims) and their products."""
        return (2 * history * dims + 2 * history * history + 8) * itemsize

    def reset(self, rows: torch.Tensor) -> None:
        """Forget everything about the rows of the boolean mask `rows` (their restart was re-drawn)."""
        self._forget_curvature(rows)
        self.converged = self.converged & ~rows
        self.best = torch.where(rows, float("inf"), self.best)
        self.stalled = torch.where(rows, 0, self.stalled)

    def _forget_curvature(self, rows: torch.Tensor) -> None:
        self.valid = self.valid & ~rows.unsqueeze(1)
        self.gamma = torch.where(rows, 0, self.gamma)

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """-H g for every row, H = gamma I + [S  gamma Y] M [S  gamma Y]' over the row's valid pairs.

        With a = S'g, b = gamma Y'g, R the upper triangle of S'Y (chronological order) and D its
        diagonal: H g = gamma g + S p + gamma Y q, q = -R^-1 a, p = R^-T ((D + gamma Y'Y) R^-1 a - b).
        Invalid pairs are zero vectors with a unit diagonal in R, so they drop out exactly.
        """
        count = min(self.updates, self.history)
        gamma = torch.where(self.gamma > 0, self.gamma, torch.ones_like(self.gamma))
        if count == 0:
            return -gamma.unsqueeze(1) * g
        # oldest first; built on the device (a tensor from a Python list would wait for the device on CUDA)
        order = (torch.arange(count, device=g.device) + (self.updates - count)) % self.history
        valid = self.valid[:, order]  # (rows, k), oldest first
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        sy = self.sy[:, order][:, :, order]
        yy = torch.where(pair, self.yy[:, order][:, :, order], 0)
        eye = torch.eye(count, device=g.device, dtype=g.dtype)
        r = torch.where(pair, sy.triu(), 0) + torch.diag_embed((~valid).to(g.dtype))
        a = torch.where(valid, torch.bmm(self.s, g.unsqueeze(2)).squeeze(2)[:, order], 0)
        b = gamma.unsqueeze(1) * torch.where(valid, torch.bmm(self.y, g.unsqueeze(2)).squeeze(2)[:, order], 0)
        u = torch.linalg.solve_triangular(r, a.unsqueeze(2), upper=True)  # R^-1 a
        middle = (sy * eye) * pair + gamma.view(-1, 1, 1) * yy  # D + gamma Y'Y
        p = torch.linalg.solve_triangular(r.transpose(1, 2), torch.bmm(middle, u) - b.unsqueeze(2), upper=False)
        coefficients_s = torch.zeros(g.shape[0], self.history, device=g.device, dtype=g.dtype)
        coefficients_y = torch.zeros_like(coefficients_s)
        coefficients_s[:, order] = p.squeeze(2)
        coefficients_y[:, order] = -gamma.unsqueeze(1) * u.squeeze(2)
        hg = gamma.unsqueeze(1) * g + torch.bmm(coefficients_s.unsqueeze(1), self.s).squeeze(1) \
            + torch.bmm(coefficients_y.unsqueeze(1), self.y).squeeze(1)
        return -hg

    def _store(self, s: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> None:
        """The new pair into this update's slot (zeros where not kept), and its inner products."""
        slot = self.updates % self.history
        s, y = _where_rows(keep, s, torch.zeros_like(s)), _where_rows(keep, y, torch.zeros_like(y))
        self.s[:, slot], self.y[:, slot] = s, y
        self.valid[:, slot] = keep
        self.sy[:, slot, :] = torch.bmm(self.y, s.unsqueeze(2)).squeeze(2)  # s_new . y_b
        self.sy[:, :, slot] = torch.bmm(self.s, y.unsqueeze(2)).squeeze(2)  # s_a . y_new
        self.yy[:, slot, :] = self.yy[:, :, slot] = torch.bmm(self.y, y.unsqueeze(2)).squeeze(2)

    def step(self, z, loss, gradient, evaluate: Evaluate, active, project: Project):
        g, f, x = gradient, loss, z
        d = self._direction(g)
        slope = (g * d).sum(1)
        bad = active & (~torch.isfinite(slope) | (slope >= 0))  # not a descent direction: forget, and use -g
        self._forget_curvature(bad)
        d = _where_rows(bad, -g, d)
        fresh = self.gamma == 0  # no curvature yet (d = -g): scale the first step as torch does
        t = torch.where(fresh, self.lr * torch.clamp(1.0 / g.abs().sum(1).clamp_min(1e-30), max=1.0),
                        torch.full_like(f, self.lr))
        new_x, new_f, new_g = x, f, g
        pending = active.clone()
        trial_x = project(x + t.unsqueeze(1) * d)
        trial_f, trial_g = evaluate(trial_x)
        for trial in range(self.max_line_search):
            accept = pending & torch.isfinite(trial_f) & (trial_f <= f) & torch.isfinite(trial_g).all(1)
            new_x, new_f = _where_rows(accept, trial_x, new_x), torch.where(accept, trial_f, new_f)
            new_g = _where_rows(accept, trial_g, new_g)
            pending = pending & ~accept
            if trial + 1 == self.max_line_search:
                break
            # the host sync of an update: most rows take the first step, and a few rows near their
            # minimum (where float noise refuses every step) would otherwise make every update cost
            # 10 evaluations of all rows; the retries evaluate only those rows
            retry = pending.nonzero().flatten()
            if len(retry) == 0:
                break
            t = torch.where(pending, t * 0.5, t)
            trial_x = project(x + t.unsqueeze(1) * d)
            trial_f, trial_g = f.clone(), g.clone()
            trial_f[retry], trial_g[retry] = evaluate(trial_x[retry], retry)
        s, y = new_x - x, new_g - g
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        keep = active & ~pending & (sy > 1e-10 * yy.clamp_min(1e-30))
        self._store(s, y, keep)
        self.gamma = torch.where(keep, sy / yy.clamp_min(1e-30), self.gamma)
        self._forget_curvature(active & pending & ~fresh)  # no acceptable step: try -g next time
        improved = torch.isinf(self.best) | (new_f < self.best - self.progress * self.best.abs())
        self.best = torch.where(active & improved, new_f, self.best)
        self.stalled = torch.where(active, torch.where(improved, 0, self.stalled + 1), self.stalled)
        self.converged = torch.where(active, (pending & fresh) | (self.stalled >= self.patience), self.converged)
        self.updates += 1
        return new_x, new_f, new_g


def make_optimizer(name: str, z: torch.Tensor, lr: float, iterations: int, decay: bool, history: int = HISTORY):
    if name == "lbfgs":
        return LBFGS(z, lr=lr, history=history)
    return Adam(z, lr=lr, iterations=iterations, signed=name == "signed-adam", decay=decay)


def optimizer_bytes_per_row(name: str, dims: int, history: int = HISTORY) -> int:
    return LBFGS.bytes_per_row(dims, history) if name == "lbfgs" else Adam.bytes_per_row(dims)
