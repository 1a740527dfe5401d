#!/usr/bin/env bash
# bench/process_bench.ts for each rank count, first as virtual ranks of one process, then as one
# process per rank (through the launcher), with the same arguments; every rank's JSON line goes
# to FILE. The exit status is that of the first run that failed.
#
#   bash bench/process-bench.sh FILE RANKS... -- ARGS   e.g. FILE 2 8 -- --iterations 5
set -uo pipefail
cd "$(dirname "$0")/.."
file="$1"
shift
counts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do counts+=("$1"); shift; done
[ $# -gt 0 ] && shift
permissions=(--allow-ffi --allow-env --allow-read --allow-run --allow-write --allow-net)
: >"$file"
for n in "${counts[@]}"; do
  for mode in virtual processes; do
    if [ "$mode" = virtual ]; then
      cmd=(deno run "${permissions[@]}" bench/process_bench.ts --mode virtual --ranks "$n" "$@")
    else
      cmd=(deno run "${permissions[@]}" src/cli/launch.ts --nproc "$n" bench/process_bench.ts --mode processes "$@")
    fi
    echo "--- $n ranks, $mode: ${cmd[*]}"
    "${cmd[@]}" | tee -a "$file.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "process-bench: $n ranks, $mode failed (exit $rc)"; exit "$rc"; }
  done
done
grep -o 'process_bench {.*' "$file.log" >"$file"
rm -f "$file.log"
[ -s "$file" ]
