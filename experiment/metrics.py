"""Communication and learning curves taken from the server's metrics.jsonl and STD's history."""

from __future__ import annotations

from typing import Any

from dept_model.std import StdResult

from .config import ExperimentConfig


def bytes_summary(
    records: list[dict[str, Any]], config: ExperimentConfig, *, full_model_fp32_bytes: int
) -> dict[str, Any]:
    """Payload bytes on the wire per round and for the whole run (rounds plus the final pull).

    ``ddp_equivalent_bytes`` is what standard data parallel of the STD model (body and global
    matrix, ``full_model_fp32_bytes``) would move for the same steps: every worker sends and
    receives the whole fp32 model every step. Computed, not run.
    """
    rounds = [r for r in records if r.get("kind") != "final"]
    final = next((r for r in records if r.get("kind") == "final"), {})
    per_round = [
        {"round": r["round"], "up": int(r["up_payload_bytes"]), "down": int(r["down_payload_bytes"])}
        for r in rounds
    ]
    up = sum(r["up"] for r in per_round) + int(final.get("up_payload_bytes", 0))
    down = sum(r["down"] for r in per_round) + int(final.get("down_payload_bytes", 0))
    full = full_model_fp32_bytes
    steps = config.rounds * config.inner_steps
    return {
        "per_round": per_round,
        "final_pull_down": int(final.get("down_payload_bytes", 0)),
        "total_up": up,
        "total_down": down,
        "total": up + down,
        "mean_per_round": (up + down) / max(len(per_round), 1),
        "full_model_fp32_bytes": full,
        "ddp_equivalent_bytes": 2 * full * len(config.sources) * steps,
    }


def _mean_bpb(evals: dict[str, Any], sources: tuple[str, ...]) -> float | None:
    values = [evals[s]["bits_per_byte"] for s in sources if s in evals and "bits_per_byte" in evals[s]]
    return sum(values) / len(values) if len(values) == len(sources) else None


def dept_curve(records: list[dict[str, Any]], sources: tuple[str, ...]) -> list[dict[str, Any]]:
    """Validation bits per byte after r rounds, r = 0..R: round r's evaluation is taken before it
    trains (so after r rounds), the final line's after the last round."""
    out = []
    for r in records:
        evals = r.get("eval", {})
        out.append(
            {
                "rounds_done": int(r["round"]),
                "per_source": {s: evals[s]["bits_per_byte"] for s in sources if s in evals},
                "mean": _mean_bpb(evals, sources),
            }
        )
    return out


def std_curve(result: StdResult, config: ExperimentConfig) -> list[dict[str, Any]]:
    """STD's validation bits per byte against round-equivalents (steps / (K * inner_steps))."""
    per_round = len(config.sources) * config.inner_steps
    return [
        {
            "rounds_done": entry["step"] / per_round,
            "per_source": {s: entry["eval"][s]["bits_per_byte"] for s in config.sources},
            "mean": _mean_bpb(entry["eval"], config.sources),
        }
        for entry in result.history
    ]
