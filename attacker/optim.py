"""Optimisers over a batch of independent problems: one row of `z` (rows, dims) per victim restart.

Every row keeps its own state (moments, step count, curvature history, line search), so a row
optimised with 63 others follows the same path as alone; rows can be reset one by one when the
engine re-draws a diverged restart. Each `step` returns the new point with its loss and gradient.
"""
from collections.abc import Callable

import torch

# evaluate(z_rows, row_indices) -> (loss (n,), gradient (n, dims))
Evaluate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Project = Callable[[torch.Tensor], torch.Tensor]


def _rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten()


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

    def reset(self, rows: torch.Tensor) -> None:
        self.m[rows] = 0
        self.v[rows] = 0
        self.t[rows] = 0

    def step(self, z, loss, gradient, evaluate: Evaluate, active, project: Project):
        rows = _rows(active)
        g = gradient[rows].sign() if self.signed else gradient[rows]
        b1, b2 = self.betas
        t = self.t[rows] + 1
        self.t[rows] = t
        m = self.m[rows].mul_(b1).add_(g, alpha=1 - b1)
        v = self.v[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
        self.m[rows], self.v[rows] = m, v
        decays = sum((t > milestone).long() for milestone in self.milestones) if self.milestones else 0
        lr = (self.lr * 0.1 ** decays) if self.milestones else torch.full_like(t, self.lr, dtype=z.dtype)
        m_hat = m / (1 - b1 ** t.to(z.dtype)).unsqueeze(1)
        v_hat = v / (1 - b2 ** t.to(z.dtype)).unsqueeze(1)
        z, loss, gradient = z.clone(), loss.clone(), gradient.clone()
        z[rows] = project(z[rows] - lr.to(z.dtype).unsqueeze(1) * m_hat / (v_hat.sqrt() + self.eps))
        loss[rows], gradient[rows] = evaluate(z[rows], rows)
        return z, loss, gradient


class LBFGS:
    """Limited-memory BFGS with a line search of each row's own.

    The DLG code runs torch's L-BFGS with a fixed unit step and no line search, which is why it
    sometimes diverges; here a trial step is only taken where it lowers that row's loss (else it is
    halved). Histories are stored in slots shared by all rows (slot = update count mod history):
    a row whose pair is not stored (no curvature, or a failed search) leaves its slot empty, so the
    two-loop recursion runs over plain strided slices with no per-row gathering.
    """

    def __init__(self, z: torch.Tensor, lr: float = 1.0, history: int = 100, max_line_search: int = 10,
                 patience: int = 200, progress: float = 1e-4):
        rows, dims = z.shape
        self.lr, self.history, self.max_line_search = lr, history, max_line_search
        self.patience, self.progress = patience, progress
        self.s = torch.zeros(history, rows, dims, device=z.device, dtype=z.dtype)
        self.y = torch.zeros_like(self.s)
        self.rho = torch.zeros(history, rows, device=z.device, dtype=z.dtype)  # 0 marks an empty slot
        self.gamma = torch.zeros(rows, device=z.device, dtype=z.dtype)  # 0: no curvature known yet
        self.updates = 0
        # a row stops when even a gradient step cannot lower its loss, or when `patience` updates
        # have not lowered it by a fraction `progress`: it sits at its minimum to float precision
        self.converged = torch.zeros(rows, device=z.device, dtype=torch.bool)
        self.best = torch.full((rows,), float("inf"), device=z.device, dtype=z.dtype)
        self.stalled = torch.zeros(rows, device=z.device, dtype=torch.long)

    def reset(self, rows: torch.Tensor) -> None:
        """Forget everything about these rows (their restart was re-drawn)."""
        self._forget_curvature(rows)
        self.converged[rows] = False
        self.best[rows] = float("inf")
        self.stalled[rows] = 0

    def _forget_curvature(self, rows: torch.Tensor) -> None:
        self.rho[:, rows] = 0
        self.gamma[rows] = 0

    def _direction(self, g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """-H g by the two-loop recursion, each row over its own stored pairs."""
        order = [(self.updates - 1 - j) % self.history for j in range(min(self.updates, self.history))]
        q, alphas = g.clone(), {}
        for slot in order:  # newest to oldest
            s, y, rho = self.s[slot, rows], self.y[slot, rows], self.rho[slot, rows]
            alphas[slot] = rho * (s * q).sum(1)
            q -= alphas[slot].unsqueeze(1) * y
        gamma = self.gamma[rows]
        r = torch.where(gamma > 0, gamma, torch.ones_like(gamma)).unsqueeze(1) * q
        for slot in reversed(order):  # oldest to newest
            s, y, rho = self.s[slot, rows], self.y[slot, rows], self.rho[slot, rows]
            beta = rho * (y * r).sum(1)
            r += (alphas[slot] - beta).unsqueeze(1) * s
        return -r

    def step(self, z, loss, gradient, evaluate: Evaluate, active, project: Project):
        rows = _rows(active)
        g, f, x = gradient[rows], loss[rows], z[rows]
        d = self._direction(g, rows)
        slope = (g * d).sum(1)
        bad = ~torch.isfinite(slope) | (slope >= 0)  # not a descent direction: forget, and use -g
        self._forget_curvature(rows[bad])
        d[bad] = -g[bad]
        fresh = self.gamma[rows] == 0  # no curvature yet (d = -g): scale the first step as torch does
        t = torch.where(fresh, self.lr * torch.clamp(1.0 / g.abs().sum(1).clamp_min(1e-30), max=1.0),
                        torch.full_like(f, self.lr))
        new_x, new_f, new_g = x.clone(), f.clone(), g.clone()
        pending = torch.ones_like(f, dtype=torch.bool)
        for _ in range(self.max_line_search):
            which = _rows(pending)
            trial = project(x[which] + t[which].unsqueeze(1) * d[which])
            trial_f, trial_g = evaluate(trial, rows[which])
            accept = torch.isfinite(trial_f) & (trial_f <= f[which]) & torch.isfinite(trial_g).all(1)
            taken = which[accept]
            new_x[taken], new_f[taken], new_g[taken] = trial[accept], trial_f[accept], trial_g[accept]
            pending[taken] = False
            if not pending.any():
                break
            t = torch.where(pending, t * 0.5, t)
        s, y = new_x - x, new_g - g
        sy = (s * y).sum(1)
        keep = (~pending) & (sy > 1e-10 * (y * y).sum(1).clamp_min(1e-30))
        slot = self.updates % self.history
        self.s[slot, rows], self.y[slot, rows] = s, y
        self.rho[slot, rows] = torch.where(keep, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))
        self.gamma[rows] = torch.where(keep, sy / (y * y).sum(1).clamp_min(1e-30), self.gamma[rows])
        self._forget_curvature(rows[pending & ~fresh])  # no acceptable step: try -g next time
        best = self.best[rows]
        improved = torch.isinf(best) | (new_f < best - self.progress * best.abs())
        self.best[rows] = torch.where(improved, new_f, best)
        self.stalled[rows] = torch.where(improved, 0, self.stalled[rows] + 1)
        self.converged[rows] = (pending & fresh) | (self.stalled[rows] >= self.patience)
        self.updates += 1
        z, loss, gradient = z.clone(), loss.clone(), gradient.clone()
        z[rows], loss[rows], gradient[rows] = new_x, new_f, new_g
        return z, loss, gradient


def make_optimizer(name: str, z: torch.Tensor, lr: float, iterations: int, decay: bool):
    if name == "lbfgs":
        return LBFGS(z, lr=lr)
    return Adam(z, lr=lr, iterations=iterations, signed=name == "signed-adam", decay=decay)
