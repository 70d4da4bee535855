"""The batched optimisers: the compact L-BFGS direction against the textbook two-loop recursion, and
rows outside the active mask left exactly as they were."""
import torch

from attacker.optim import LBFGS, Adam


def _two_loop(g, pairs, gamma):
    """-H g by Nocedal and Wright's two-loop recursion over (s, y) pairs, oldest first, one row."""
    q, alphas = g.clone(), []
    for s, y in reversed(pairs):
        alpha = (s @ q) / (s @ y)
        q -= alpha * y
        alphas.append(alpha)
    r = gamma * q
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        r += (alpha - (y @ r) / (s @ y)) * s
    return -r


def test_compact_direction_equals_the_two_loop_recursion():
    torch.manual_seed(0)
    rows, dims, history = 3, 12, 4
    optimizer = LBFGS(torch.zeros(rows, dims, dtype=torch.float64), history=history)
    kept = [[], [], []]
    for update in range(7):  # wraps around the ring of 4 slots
        s = torch.randn(rows, dims, dtype=torch.float64)
        y = s + 0.3 * torch.randn(rows, dims, dtype=torch.float64)  # s.y > 0: a valid curvature pair
        keep = torch.tensor([True, update % 3 != 1, update != 6])  # row 1 skips pairs, row 2 the newest
        optimizer._store(s, y, keep)
        optimizer.gamma = torch.where(keep, (s * y).sum(1) / (y * y).sum(1), optimizer.gamma)
        optimizer.updates += 1
        for row in range(rows):
            kept[row] = [(p, q, u) for p, q, u in kept[row] if u > update - history] + \
                ([(s[row], y[row], update)] if keep[row] else [])
    g = torch.randn(rows, dims, dtype=torch.float64)
    direction = optimizer._direction(g)
    for row in range(rows):
        expected = _two_loop(g[row], [(s, y) for s, y, _ in kept[row]], optimizer.gamma[row])
        torch.testing.assert_close(direction[row], expected)
    optimizer._forget_curvature(torch.tensor([False, True, False]))
    torch.testing.assert_close(optimizer._direction(g)[1], -g[1])  # no curvature: steepest descent
    pairs = []
    for _ in range(2):  # new pairs beside the forgotten ones, which must drop out
        s = torch.randn(rows, dims, dtype=torch.float64)
        y = s + 0.3 * torch.randn(rows, dims, dtype=torch.float64)
        optimizer._store(s, y, torch.ones(rows, dtype=torch.bool))
        optimizer.gamma = (s * y).sum(1) / (y * y).sum(1)
        optimizer.updates += 1
        pairs.append((s[1], y[1]))
    torch.testing.assert_close(optimizer._direction(g)[1], _two_loop(g[1], pairs, optimizer.gamma[1]))


def test_inactive_rows_are_left_as_they_were():
    z = torch.rand(4, 5)

    def evaluate(x, rows=None):
        return (x ** 2).sum(1), 2 * x

    active = torch.tensor([True, False, True, False])
    for optimizer in (Adam(z, lr=0.1, iterations=10, signed=True), LBFGS(z)):
        loss, gradient = evaluate(z)
        new_z, new_loss, new_gradient = optimizer.step(z, loss, gradient, evaluate, active, lambda x: x)
        assert torch.equal(new_z[~active], z[~active]) and torch.equal(new_loss[~active], loss[~active])
        assert torch.equal(new_gradient[~active], gradient[~active])
        assert (new_loss[active] < loss[active]).all()
