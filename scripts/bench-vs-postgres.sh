#!/usr/bin/env bash
# The performance table in one run on this machine: cellbank's transfers
# (one 3-replica cell behind a router, and the default cluster of two
# pairs with synchronous standbys; batched SubmitTransfers, unary
# Transfer, and unary transfers through the client's opt-in coalescer) next to PostgreSQL's pgbench TPC-B-like figure (Debian's
# PostgreSQL, a fresh initdb, shared_buffers 1 GB, fsync and synchronous
# commit on, scale 50, 64 clients). Every cellbank run starts a fresh
# cluster with mutual TLS (the default) and warms up before it measures.
#   ./scripts/bench-vs-postgres.sh [seconds]      (default 30)
# Prints one line per run as it ends, then the table (markdown).
source "$(dirname "$0")/bench-lib.sh"
missing=()
for pkg in postgresql-15 postgresql-contrib; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
./scripts/apt-install.sh "${missing[@]}"
seconds="${1:-30}"
warmup=5
pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
stop_postgres() {
    if [ -f "$work/pg/data/postmaster.pid" ]; then
        runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
    fi
}
bench_cleanup=stop_postgres
rows=()

cellbank_run() { # label topology api
    local label="$1" topology="$2" api="$3"
    start_cluster --topology "$topology"
    bench_args_for "$api"
    "$bin" bench "${bench_args[@]}" --duration "$seconds" --warmup "$warmup" --json >"$work/report.json"
    stop_cluster
    local row
    row="$(python3 - "$work/report.json" "$label" "bench ${bench_args[*]}" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_ms"]
note = "" if r["errors"] == 0 and r["other_results"] == 0 else f" ({r['errors']} errors, {r['other_results']} not OK)"
print(f"| {sys.argv[2]} | `{sys.argv[3]}` | {r['transfers_per_s']:,.0f} transfers/s{note} | {l['p50']:.1f} ms | {l['p99']:.1f} ms |")
EOF
)"
    echo "$row"
    rows+=("$row")
}

cellbank_run "one 3-replica cell behind one router, batched" deploy/local/one-cell.toml batch
cellbank_run "one 3-replica cell behind one router, unary" deploy/local/one-cell.toml unary
cellbank_run "default cluster (2 pairs, synchronous standbys), batched" deploy/local/cluster.toml batch
cellbank_run "default cluster (2 pairs, synchronous standbys), unary" deploy/local/cluster.toml unary
cellbank_run "one 3-replica cell behind one router, unary through the client's coalescer" deploy/local/one-cell.toml coalesced
cellbank_run "default cluster, unary through the client's coalescer" deploy/local/cluster.toml coalesced

# PostgreSQL: its own data directory, socket and port, owned by its user.
mkdir -p "$work/pg"
chown postgres "$work/pg"
runuser -u postgres -- "$pg_bin/initdb" -D "$work/pg/data" -A trust >/dev/null
port=$((20000 + RANDOM % 10000))
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w start -o \
    "-c port=$port -c listen_addresses='' -c unix_socket_directories=$work/pg -c shared_buffers=1GB \
     -c fsync=on -c synchronous_commit=on -c max_connections=100" >/dev/null
pgbench=(runuser -u postgres -- "$pg_bin/pgbench" -h "$work/pg" -p "$port")
"${pgbench[@]}" -i -s 50 -q postgres >/dev/null 2>&1
# Warm-up, then the measured run with a log of every transaction.
"${pgbench[@]}" -c 64 -j 2 -T "$warmup" postgres >/dev/null 2>&1
(cd "$work/pg" && "${pgbench[@]}" -c 64 -j 2 -T "$seconds" -l --log-prefix="$work/pg/tx" postgres >"$work/pg/out" 2>&1)
row="$(python3 - "$work/pg" "$pg_bin" <<'EOF'
import glob, re, sys
d = sys.argv[1]
out = open(f"{d}/out").read()
tps = float(re.search(r"tps = ([0-9.]+)", out).group(1))
lat = sorted(int(line.split()[2]) for f in glob.glob(f"{d}/tx*") for line in open(f))
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000
version = sys.argv[2].rstrip("/").split("/")[-2]
print(f"| PostgreSQL {version} pgbench TPC-B-like, 64 clients, fsync on | `pgbench -c 64 -j 2` | {tps:,.0f} tps | {q(0.50):.1f} ms | {q(0.99):.1f} ms |")
EOF
)"
echo "$row"
rows+=("$row")

echo
echo "measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo): ${seconds} s each after ${warmup} s of warm-up"
echo "| run | command | throughput | p50 | p99 |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
