#!/usr/bin/env bash
# A replica's resident memory under a long batched load: one 3-replica cell
# behind a router (deploy/local/one-cell.toml, mutual TLS), `cellbank bench
# --api batch` for the given time, and every replica's RSS read from /proc
# every 30 s. Prints the samples, then each replica's range over the second
# half of the run (in the first minutes the block cache, the memtables and
# the Raft entry cache fill up to their bounds).
#   ./scripts/bench-memory.sh [seconds]      (default 600)
source "$(dirname "$0")/bench-lib.sh"
seconds="${1:-600}"
start_cluster --topology deploy/local/one-cell.toml
"$bin" bench --api batch --batch-size 1000 --concurrency 16 --duration "$seconds" --warmup 0 --json >"$work/report.json" &
bench_pid=$!
started=$(date +%s)
: >"$work/rss"
while kill -0 "$bench_pid" 2>/dev/null; do
    elapsed=$(( $(date +%s) - started ))
    for replica in 1 2 3; do
        pid="$(pgrep -f "cell-1/replica-$replica/replica.toml" | head -1 || true)"
        [ -n "$pid" ] && echo "$elapsed $replica $(awk '/VmRSS/ {print $2}' "/proc/$pid/status")" >>"$work/rss"
    done
    sleep 30
done
wait "$bench_pid"
python3 - "$work/rss" "$work/report.json" <<'EOF'
import json, sys
samples = [tuple(map(int, line.split())) for line in open(sys.argv[1])]
report = json.load(open(sys.argv[2]))
print(f"batched load: {report['transfers_per_s']:,.0f} transfers/s over {report['duration_s']:.0f} s, "
      f"{report['errors']} errors")
print("seconds  " + "  ".join(f"replica {r} MiB" for r in (1, 2, 3)))
by_time = {}
for t, r, kib in samples:
    by_time.setdefault(t, {})[r] = kib / 1024
for t in sorted(by_time):
    print(f"{t:7d}  " + "  ".join(f"{by_time[t].get(r, 0):13.0f}" for r in (1, 2, 3)))
end = max(t for t, _, _ in samples)
for r in (1, 2, 3):
    series = [(t, kib / 1024) for t, rr, kib in samples if rr == r]
    later = [m for t, m in series if t >= end / 2]
    if len(later) >= 2:
        low, high = min(later), max(later)
        print(f"replica {r}: over the second half {low:.0f}-{high:.0f} MiB ({(high / low - 1) * 100:.1f}% above its "
              f"lowest); at the end {series[-1][1]:.0f} MiB, peak {max(m for _, m in series):.0f} MiB")
EOF
