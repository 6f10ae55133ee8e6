"""Train a plain PyTorch MLP DiLoCo-style with dept_comm: one server, two participants.

    python examples/mlp_diloco.py                  # server + 2 participant processes, 3 rounds
    python examples/mlp_diloco.py --role server --port 50051 --workers 2
    python examples/mlp_diloco.py --role participant --port 50051 --name w0

Each participant fits the same teacher function from its own data stream; every ``--sync-every``
inner steps, dept_comm sends its int8 update, the server averages and applies a Nesterov outer
step, and every participant continues from the same new weights.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from dept_comm import ParameterServer, Participant, ServerConfig


def make_model() -> nn.Module:
    torch.manual_seed(0)  # every process starts from the same weights
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def batches(seed: int, batch_size: int = 64):
    teacher = torch.Generator().manual_seed(1234)  # the function to learn, the same everywhere
    w1, w2 = torch.randn(8, 4, generator=teacher), torch.randn(4, 1, generator=teacher)
    data = torch.Generator().manual_seed(seed)  # each participant's own samples
    while True:
        x = torch.randn(batch_size, 8, generator=data)
        yield x, torch.tanh(x @ w1 / 2) @ w2


def serve(args: argparse.Namespace) -> ParameterServer:
    config = ServerConfig(
        port=args.port,
        rounds=args.rounds,
        workers=args.workers,
        outer="nesterov",
        codec_up="int8",
        codec_down="int8",
        metrics_path=Path(args.metrics) if args.metrics else None,
    )
    return ParameterServer(make_model().state_dict(), config)


def participate(args: argparse.Namespace) -> None:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batches(seed=sum(map(ord, args.name)))
    losses: list[float] = []
    server = f"127.0.0.1:{args.port}"  # with --state-dir, a restarted participant continues its run
    with Participant(
        model, server, name=args.name, sync_every=args.sync_every, state_dir=args.state_dir
    ) as p:
        while not p.finished:
            x, y = next(data)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            synced = p.step(metrics={"loss": losses[-1]})  # every sync_every-th call: a round ends
            if synced is not None:
                line = f"{args.name} round={synced.round_idx} loss={sum(losses) / len(losses):.4f}\n"
                print(line, end="", flush=True)  # one write: the participants share the terminal
                losses.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["all", "server", "participant"], default="all")
    parser.add_argument("--port", type=int, default=0, help="server port (all: 0 picks a free one)")
    parser.add_argument("--name", default="w0", help="participant name")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sync-every", type=int, default=50, help="inner steps per round")
    parser.add_argument("--metrics", default=None, help="server: write metrics.jsonl here")
    parser.add_argument("--state-dir", default=None, help="participant: save its state here each round")
    args = parser.parse_args()
    if args.role == "participant":
        return participate(args)
    with serve(args) as server:
        print(f"server listening on 127.0.0.1:{server.port}", flush=True)
        if args.role == "all":
            me = [sys.executable, __file__, "--role", "participant", "--port", str(server.port)]
            me += ["--sync-every", str(args.sync_every)]
            procs = [subprocess.Popen([*me, "--name", f"w{i}"]) for i in range(args.workers)]
            if any(proc.wait() for proc in procs):
                sys.exit("a participant failed")
        server.wait()
        for r in server.records:  # bytes per round, summed over the participants
            print(
                f"server round={r.round} workers={r.num_workers} up_bytes={r.up_payload_bytes} "
                f"down_bytes={r.down_payload_bytes}"
            )


if __name__ == "__main__":
    main()
