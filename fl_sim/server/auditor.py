"""The recorder of an audit of a user's own Flower app (fl_sim/server/audit.py): rows, images and the gallery.

fl-sim's own ServerApp scores every reconstruction against the truth it re-derives from its seeded partitions
(fl_sim/server/server_app.py `Scoreboard`). A user's app has no such partitions and its clients send no truth,
so `AuditRecorder` scores each reconstruction against what the auditor does hold:

- what the client disclosed, where its train function called `fl_sim.disclose` (simulation only: the images it
  trained on, taken off the reply before anything else reads it), scored after optimal matching as fl-sim's
  own runs are;
- else the nearest image of the reference set the user named (fl_sim/results/nearest.py);
- else nothing: the reconstruction is saved and its row says it was not scored.

Clients are named by their Flower node id. Each round ends with the gallery rebuilt (`round_done`).
"""
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.common import log

from attacker import Reconstruction
from fl_sim.results.evaluation import failure_status, score_and_save, summarise
from fl_sim.results.gallery import AGGREGATE, client_folder, write_gallery
from fl_sim.results.nearest import Reference, nearest_scores
from fl_sim.results.outputs import append_jsonl, inside, save_images
from fl_sim.results.rows import RECOVERED_DB, metrics_row, recovered_key
from fl_sim.server.attacks import Victim
from fl_sim.server.round import ReplyFault, write_faults

__all__ = ["AuditRecorder", "Disclosed"]

Disclosed = tuple[torch.Tensor, torch.Tensor]  # (images in [0, 1], labels) a client said it trained on


class AuditRecorder:
    """Where an audited round is reported: metrics.jsonl, each client's images, the gallery (module docstring).

    Parameters
    ----------
    out
        The audit's output folder.
    reference
        The reference set, loaded when first asked (None: none named).
    secure_aggregation
        How a secure aggregate's row names it ("secagg+").
    """

    def __init__(self, out: Path, reference: Callable[[], Reference | None], secure_aggregation: str = "secagg+"):
        self.out, self.reference, self.secure_aggregation = out, reference, secure_aggregation
        self.counts: dict[int, dict[int, int]] = {}  # round -> node -> the num-examples it replied
        self.disclosed: dict[tuple[int, int], Disclosed] = {}  # (round, node) -> what it said it trained on

    def record_faults(self, server_round: int, faults: list[ReplyFault]) -> None:
        write_faults(self.out / "metrics.jsonl", server_round, faults)

    def record_inspection(self, server_round: int, flags: dict[int, int], attacked: frozenset[int]) -> None:
        """A user's clients send no inspection flags: nothing to record."""

    def record_privacy(self, server_round: int, spent: dict[int, dict[str, float]]) -> None:
        """A user's clients report no DP-SGD epsilons to the strategy: nothing to record."""

    def record_attack(self, server_round: int, victims: list[Victim], results: list[Reconstruction],
                      update_norms: list[float], seconds: float) -> None:
        rows = []
        counts = self.counts.get(server_round, {})
        for victim, result, norm in zip(victims, results, update_norms, strict=True):
            count = sum(counts.get(client, 0) for client in victim.clients)
            named: dict[str, Any] = {"client": AGGREGATE, "clients": list(victim.clients),
                                     "secure_aggregation": self.secure_aggregation} \
                if victim.secure_aggregate else {"client": victim.clients[0]}
            folder = inside(self.out, client_folder(server_round, AGGREGATE if victim.secure_aggregate
                                                    else victim.clients[0]))
            scores = self._score(server_round, victim, result, count, folder)
            row = metrics_row(**scores, round=server_round, **named, update_norm=norm, num_examples=count,
                              seconds=seconds / len(victims), round_attack_seconds=seconds)
            append_jsonl(self.out / "metrics.jsonl", row.to_json())
            rows.append(row)
        summary = summarise(rows)
        psnr = summary["psnr_median"]
        log(INFO, "audit round %s: %s client(s) in %.1f s, PSNR median %s dB, %s, %s failed",
            server_round, len(rows), seconds, "n/a" if psnr is None else f"{psnr:.1f}",
            ", ".join(f"{100 * (summary[recovered_key(db)] or 0):.0f}% >= {db} dB" for db in RECOVERED_DB),
            summary["failed"])

    def _score(self, server_round: int, victim: Victim, result: Reconstruction, count: int,
               folder: Path) -> dict[str, Any]:
        """A victim's scores by their row names, its images saved in `folder`: against what its clients
        disclosed, else against the nearest reference images, else none."""
        disclosed = [self.disclosed.pop((server_round, client), None) for client in victim.clients]
        if all(found is not None for found in disclosed) and disclosed:
            images = torch.cat([found[0] for found in disclosed if found is not None])
            labels = torch.cat([found[1] for found in disclosed if found is not None])
            return {**score_and_save(result, images, labels, folder), "scored_against": "what the client disclosed"}
        if not result.ok:  # a skip names fl-sim's flag: here the cap is malicious()'s argument
            reason = result.reason.replace("--max-attack-images", "max_images (run config audit-max-images)")
            return {"status": failure_status(result), "reason": reason,
                    **{recovered_key(db): 0.0 for db in RECOVERED_DB}}
        reference = self.reference()
        if reference is None:
            save_images(folder / "reconstruction.png", result.images)
            return {"status": "ok", "scored_against": "nothing: no reference set was named"}
        scores, matched = nearest_scores(result.images, result.labels, reference, count)
        if result.image_status is not None:
            scores["image_status"] = result.image_status
        save_images(folder / "truth.png", matched)
        save_images(folder / "reconstruction.png", result.images)
        return {"status": "ok", **scores, "labels": result.labels.tolist(), "loss": result.loss}

    def round_done(self, server_round: int) -> None:
        """The gallery rebuilt with the round's rows; what the round's clients disclosed and were not attacked
        for is dropped."""
        self.counts.pop(server_round, None)
        self.disclosed = {key: value for key, value in self.disclosed.items() if key[0] > server_round}
        write_gallery(self.out)

