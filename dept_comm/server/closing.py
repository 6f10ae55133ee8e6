"""ServerApp's round close: fold, the outer step, the round's metrics, checkpoints, the final line."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from dept_comm.accounting import RoundMetrics, WorkerRoundMetrics
from dept_comm.memory import release_freed_memory

from .state import AppState, WorkerRound

logger = logging.getLogger(__name__)


class RoundClosing(AppState):
    """Closing (or abandoning) rounds, their records and checkpoints (part of ServerApp)."""

    # -- closing rounds ----------------------------------------------------------------------
    def maybe_close(self) -> bool:
        """Close the open round if every expected worker committed, or at the deadline with quorum.

        Also frees the staging of uploads the coordinator dropped since the last call (the
        server's ticker calls this twice a second).
        """
        self._free_dropped_uploads()
        with self._close_lock:
            state = self.coordinator.current_round()
            if state.finished or not self.coordinator.ready_to_close(time.time()):
                if not state.finished and self.coordinator.should_abandon(time.time()):
                    logger.warning("round=%d below quorum at the deadline: abandoned", state.round_idx)
                    self._aggregate.reset()
                    state = self.coordinator.abandon_round()
                    # Persist the new round index so a restart never sends the round id backwards.
                    self._checkpoint(state.round_idx)
                    self.watchers.publish()
                return False
            self._close_round(state.round_idx)
            return True

    def _close_round(self, round_idx: int) -> None:
        started = time.monotonic()
        self._aggregate.fold_all()  # uploads still waiting for their turn count in this round
        num = self._aggregate.num_contributions
        self.model.apply_round(self._aggregate.take_means())  # tensor by tensor; resets the sums
        record = self._round_record(round_idx, num)
        self.records.append(record)
        # Checkpoint first (it carries the records), then the JSONL line: a kill in between
        # loses no round, and a resumed server rewrites the metrics file from the checkpoint.
        self._checkpoint(round_idx + 1)
        if self.config.metrics_path is not None:
            record.append_jsonl(self.config.metrics_path)
        state = self.coordinator.close_round(self.model.digest)
        logger.info(
            "round_done round=%d workers=%d up_payload_bytes=%d down_payload_bytes=%d close_s=%.2f",
            round_idx,
            num,
            record.up_payload_bytes,
            record.down_payload_bytes,
            time.monotonic() - started,
        )
        self._round_started = time.monotonic()
        self._free_dropped_uploads()  # the coordinator dropped what was left open in the round
        release_freed_memory()  # the round's sums and the previous version go back to the system
        self.watchers.publish()
        self._round_closed(record)
        if state.finished:
            self.finished.set()

    def _round_closed(self, record: RoundMetrics) -> None:
        """Tell ``hooks.on_round_closed``; what it raises is logged, never fails the round."""
        callback = self.hooks.on_round_closed
        if callback is None:
            return
        try:
            callback(record, self.model.shared)
        except Exception:
            logger.exception("on_round_closed failed round=%d", record.round)

    def _round_record(self, round_idx: int, num_workers: int) -> RoundMetrics:
        per_worker = self._rounds.pop(round_idx, {})
        workers = [
            WorkerRoundMetrics.from_meters(
                worker_id, wr.source, up=wr.up, down=wr.down, train_loss=wr.train_loss
            )
            for worker_id, wr in sorted(per_worker.items())
        ]
        evals = {wr.source: wr.metrics for wr in per_worker.values() if wr.metrics}
        return RoundMetrics(
            round=round_idx,
            variant=self.hooks.label,
            num_workers=num_workers,
            duration_s=time.monotonic() - self._round_started,
            up_raw_bytes=sum(w.up_raw_bytes for w in workers),
            up_payload_bytes=sum(w.up_payload_bytes for w in workers),
            down_raw_bytes=sum(w.down_raw_bytes for w in workers),
            down_payload_bytes=sum(w.down_payload_bytes for w in workers),
            body_digest=self.model.body_digest().hex(),
            digest=self.model.digest.hex(),
            replica_digests=self._replica_digests(per_worker),
            workers=workers,
            full_model_fp32_bytes=self._full_model_fp32_bytes,
            uncompressed_body_bytes=4 * self.model.body_numel,
            eval=evals,
            version=self.model.version,
            codec_up=self.config.codec_up,
            codec_down=self.config.codec_down,
        )

    def _replica_digests(self, per_worker: Mapping[str, WorkerRound]) -> dict[str, str]:
        """With a row subset (TRIM): by source, the digest each worker's replica must have after
        this round (its rows differ per worker); otherwise replicas all carry the round digest."""
        if self.model.row_subset is None:
            return {}
        with self._lock:
            ids = {w: self._row_ids[w] for w in per_worker if w in self._row_ids}
        return {per_worker[w].source: self.model.replica_digest(i).hex() for w, i in sorted(ids.items())}

    def _checkpoint(self, next_round: int) -> None:
        if self._store is None:
            return
        meta: dict[str, Any] = {
            "round_idx": next_round,
            "version": self.model.version,
            "digest": self.model.digest.hex(),
            "digest_covers": "shared",
            **self.hooks.resume_identity,
            "records": [r.to_dict() for r in self.records],
        }
        # Steps are the next round index: strictly increasing across closes and abandons, so a
        # save never overwrites the checkpoint a crash would fall back to.
        self._store.save(next_round, self.model.checkpoint_groups(), meta)

    def save_checkpoint(self) -> None:
        """Checkpoint the body and the open round's index now, so ``--resume`` continues here.

        Takes the close lock, so it never interleaves with a round close; a no-op without
        ``--checkpoint-dir``. Round closes and abandons checkpoint on their own; this is for a stop.
        """
        with self._close_lock:
            self._checkpoint(self.coordinator.current_round().round_idx)

    def write_final(self) -> None:
        """Append the final evaluation (reported by workers on Leave) to the metrics file."""
        line: dict[str, Any] = {
            "kind": "final",
            "round": self.config.rounds,
            "variant": self.hooks.label,
            "eval": self.final_eval,
        }
        # Bytes after the last round: the final pulls workers make to evaluate the last body.
        per_worker = self._rounds.get(self.config.rounds, {})
        line["down_payload_bytes"] = sum(w.down.total().payload_bytes for w in per_worker.values())
        line["down_raw_bytes"] = sum(w.down.total().raw_bytes for w in per_worker.values())
        line["up_payload_bytes"] = sum(w.up.total().payload_bytes for w in per_worker.values())
        if self.config.metrics_path is not None:
            with open(self.config.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
