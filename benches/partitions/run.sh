#!/usr/bin/env bash
# kv get and set latency on a 10M-row cache_entries table, plain and hash-partitioned
# (16 partitions), side by side in one run: the statements are the library's own
# (prepared, so generic plans after the fifth execution), driven by pgbench.
#
#   bash benches/partitions/run.sh            # ROWS=10000000 SECONDS_EACH=20 ROUNDS=2
#
# Needs: a built `pgcache` command (cargo build --release -p pgcache-cli), pgbench,
# DATABASE_URL (default postgres://postgres@localhost:5432/postgres). Creates the
# schemas pgcache_part_plain and pgcache_part_16 and drops them at the end.
set -euo pipefail
cd "$(dirname "$0")"
URL=${DATABASE_URL:-postgres://postgres@localhost:5432/postgres}
ROWS=${ROWS:-10000000}
SECS=${SECONDS_EACH:-20}
ROUNDS=${ROUNDS:-2}
PGCACHE=${PGCACHE:-../../target/release/pgcache}
# The library's own setting (see session_sql in src/pool.rs); `auto` is PostgreSQL's default.
PLAN_CACHE_MODE=${PLAN_CACHE_MODE:-force_generic_plan}
LOGS=$(mktemp -d)
trap 'psql -q "$URL" -c "DROP SCHEMA IF EXISTS pgcache_part_plain CASCADE; DROP SCHEMA IF EXISTS pgcache_part_16 CASCADE" >/dev/null 2>&1; rm -rf "$LOGS"' EXIT

setup() { # schema, extra migrate args
  PGCACHE_SCHEMA=$1 DATABASE_URL=$URL "$PGCACHE" --quiet migrate "${@:2}"
  psql -q "$URL" -c "SET search_path TO $1; \
    INSERT INTO cache_entries (key, value, expires_at) \
    SELECT 'key:' || g, jsonb_build_object('v', g), now() + interval '1 day' \
    FROM generate_series(1, $ROWS) g;"
  psql -q "$URL" -c "VACUUM ANALYZE $1.cache_entries"
}
setup pgcache_part_plain
setup pgcache_part_16 --partitions 16

# p50 and p99 in microseconds from pgbench's per-transaction log (column 3).
percentiles() {
  cat "$@" | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {printf "%d %d %d\n", a[int(NR*0.5)], a[int(NR*0.99)], NR}'
}
printf "%-5s %-4s %-8s %10s %10s %10s\n" op thr layout "p50 us" "p99 us" "tx/s"
for round in $(seq "$ROUNDS"); do
  for op in get set; do
    for clients in 1 4; do
      for schema in pgcache_part_plain pgcache_part_16; do
        rm -f "$LOGS"/pgbench_log.*
        (cd "$LOGS" && PGOPTIONS="-c search_path=$schema -c plan_cache_mode=$PLAN_CACHE_MODE" pgbench -n -M prepared -c "$clients" -j "$clients" \
          -T "$SECS" -l -f "$OLDPWD/$op.sql" "$URL" >/dev/null)
        read -r p50 p99 n < <(percentiles "$LOGS"/pgbench_log.*)
        printf "%-5s %-4s %-8s %10s %10s %10s\n" "$op" "$clients" "${schema#pgcache_part_}" "$p50" "$p99" "$((n / SECS))"
      done
    done
  done
done
