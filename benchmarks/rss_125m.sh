#!/usr/bin/env bash
# Server peak RSS with real processes: dept-server (125m preset, spec, int8) and 4 dept-worker
# processes on loopback, 2 rounds of 1 inner step each (CPU). Prints the server's
# /usr/bin/time -v "Maximum resident set size". Usage: bash benchmarks/rss_125m.sh [OUTDIR]
set -euo pipefail
out="${1:-$(mktemp -d /tmp/dept-rss125m-XXXX)}"
mkdir -p "$out"
port=$((40000 + RANDOM % 20000))
/usr/bin/time -v dept-server --port "$port" --rounds 2 --workers 4 --variant spec --model 125m \
  --codec-up int8 --codec-down int8 --checkpoint-dir "$out/ckpt" --metrics-path "$out/metrics.jsonl" \
  >"$out/server.out" 2>"$out/server.err" &
server=$!
sleep 20
pids=()
for src in en it code sw; do
  dept-worker --server "127.0.0.1:$port" --source "$src" --name "w-$src" --inner-steps 1 --batch-size 1 \
    --seq-len 32 --eval-batches 1 --device cpu --state-dir "$out/state-$src" >"$out/worker-$src.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "worker $p exited $?"; done
wait "$server" || true
grep -E "Maximum resident set size|Elapsed" "$out/server.err"
echo "logs: $out"
