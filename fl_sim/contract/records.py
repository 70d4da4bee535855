"""The vocabulary of metrics.jsonl rows that several modules read: the statuses of a client-round.

Standard library only, so readers of finished runs (summaries, sweeps, `fl-sim report`) need neither
Flower nor torch.
"""
from enum import StrEnum


class ReplyStatus(StrEnum):
    """Why a client-round was left out of both the attack and the average (its row's `status`)."""

    REJECTED = "rejected"
    CLIENT_ERROR = "client-error"
    NO_REPLY = "no-reply"
    REFUSED = "refused"  # the client inspected the model it was sent and refused to train it (--defense inspect)


REPLY_FAULTS = frozenset(ReplyStatus)
FLAGGED = "flagged"  # a client-round not attacked whose client flagged the model it was sent (inspect:flag)
