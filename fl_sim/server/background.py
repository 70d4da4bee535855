"""`--attack-async`: a round's attack runs on one background thread while the next round trains.

A passive (honest-but-curious) attack changes nothing in the average, so the round need not wait for it:
the strategy (fl_sim/server/strategy.py) hands everything the recorder is to hear of a round (the replies it left
out, then the inversion and its rows) to `AttackQueue.submit` as one job and returns the aggregate at once.
One worker thread runs the jobs in the order the rounds came, so metrics.jsonl gets the rows in the same
order as a synchronous run; torch releases the GIL in its kernels, so the attack and the server's own work
(and, in one process, the clients' training) overlap. Standard library only.

The commit point (fl_sim/server/resume.py) moves with it: OUT/checkpoint.pt may name round r only once round r's
job is done (`done_through`), so `RoundEnd` (fl_sim/server/server_app.py) writes, as round r ends, the checkpoint of
the last round whose training *and* attack are both finished; that is round r when its attack already
finished, else round r - 1 (whose attack it waits for: it ran beside round r's training). A kill at any
moment thus leaves a checkpoint c with every row of rounds <= c on disk and nothing of later rounds that
`--resume` keeps (it rewinds them and trains round c + 1 again): nothing doubled, nothing lost.

An error raised by a job (a bug: the engine's per-victim failures are rows, not errors) is not lost: `wait`
and `close` re-raise it in the calling (main) thread, once.
"""
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from logging import ERROR, getLogger

LOGGER = getLogger(__name__)


class AttackQueue:
    """Rounds' attack jobs, run one after another on a single background thread."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fl-sim-attack")
        self._jobs: dict[int, Future] = {}
        self._reported: set[int] = set()  # rounds whose error was raised already

    def submit(self, server_round: int, job: Callable[[], None]) -> None:
        """Queues round `server_round`'s job (one per round) behind the rounds before it."""
        if server_round in self._jobs:
            raise RuntimeError(f"round {server_round} already has an attack job")
        self._jobs[server_round] = self._pool.submit(job)

    def done_through(self, server_round: int) -> bool:
        """True when the job of every round up to `server_round` finished without error (a round with no
        job counts as done): its rows are all on disk. Does not wait."""
        return all(future.done() and future.exception() is None
                   for job_round, future in self._jobs.items() if job_round <= server_round)

    def wait(self, through_round: int | None = None) -> None:
        """Blocks until the jobs of rounds up to `through_round` (None: all) are done; re-raises the first
        error among them not raised before."""
        for _, error in self._unreported_errors(through_round):
            raise error

    def pending(self) -> list[int]:
        """The rounds whose job has not finished yet."""
        return sorted(job_round for job_round, future in self._jobs.items() if not future.done())

    def close(self, raise_errors: bool = True) -> None:
        """Drains the queue (no attack is lost: every job runs) and stops the thread. With `raise_errors`,
        re-raises the first error not raised before and logs any others; without (the run is failing
        already), logs every such error instead."""
        try:
            errors = list(self._unreported_errors())
        finally:
            self._pool.shutdown(wait=True)
        for job_round, error in errors[1 if raise_errors else 0:]:
            LOGGER.log(ERROR, "the background attack of round %s failed", job_round, exc_info=error)
        if raise_errors and errors:
            raise errors[0][1]

    def _unreported_errors(self, through_round: int | None = None):
        """(round, error) of the jobs up to `through_round` (None: all) whose error was not raised before,
        in round order, waiting for each job; each is marked raised as it is yielded."""
        for job_round in sorted(self._jobs):
            if through_round is not None and job_round > through_round:
                return
            error = self._jobs[job_round].exception()  # blocks until the job is done
            if error is not None and job_round not in self._reported:
                self._reported.add(job_round)
                yield job_round, error
