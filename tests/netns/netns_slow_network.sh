#!/usr/bin/env bash
# Slow-network measurement (issue 13): the Llama-2-7B adapter all-reduce (bench_allreduce,
# r 8 on q,v: 16.8 MB fp32) at 2 hosts x 2 ranks in network namespaces (netns_lib.sh),
# with each host's link rate-limited by `tc tbf` (this kernel has no sch_netem, so no
# delay), printed next to the ring cost model of docs/distributed.md:
#   T = 2 (n - 1) / n * S / B   (the bytes each ring edge carries; with 2 ranks per host
#                                two ring edges cross hosts, one per direction of the link)
# Not a pass/fail test: it prints a table for docs/distributed.md. Root only.
#   tests/netns/netns_slow_network.sh [BIN_DIR] [RATE...]   (default rates: none 1gbit 100mbit)
e2e_name=netns_slow_network
source "$(dirname "${BASH_SOURCE[0]}")/netns_lib.sh"
netns_require
source "$(dirname "${BASH_SOURCE[0]}")/../e2e/common.sh"
[ -x "$DPO_BIN/bench_allreduce" ] || fail "$DPO_BIN/bench_allreduce not found"
shift $(($# > 0 ? 1 : 0)) || true
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(none 1gbit 100mbit)
netns_up 2
h1=$netns_subnet.1
h2=$netns_subnet.2

echo "| host link (tc tbf, each host) | all-reduce avg ms | max ms | algbw MB/s | ring model ms | measured / model |"
echo "|---|---:|---:|---:|---:|---:|"
for rate in "${rates[@]}"; do
  for i in 1 2; do ip netns exec "${netns_ns[i]}" tc qdisc del dev eth0 root 2>/dev/null || true; done
  bits=0
  if [ "$rate" != none ]; then
    for i in 1 2; do
      ip netns exec "${netns_ns[i]}" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kbit latency 2000ms ||
        fail "tc tbf $rate on host $i failed"
    done
    bits=$(python3 -c "
import re, sys
m = re.fullmatch(r'(\d+(?:\.\d+)?)([kmg]?)bit', sys.argv[1]); v, u = float(m.group(1)), m.group(2)
print(v * {'': 1, 'k': 1e3, 'm': 1e6, 'g': 1e9}[u])" "$rate")
  fi
  netns_mpirun_cmd 1 -H "$h1:2,$h2:2" -np 4 "$DPO_BIN/bench_allreduce" --sizes r8qv --iters 3 --warmup 1 --grad_sync false
  rc=0
  run_bounded 600 "$work/ar_$rate.log" "${netns_cmd[@]}" || rc=$?
  [ $rc = 0 ] || { tail -n 20 "$work/ar_$rate.log"; fail "bench_allreduce at $rate exited $rc"; }
  line=$(grep -m1 "r8 q,v" "$work/ar_$rate.log")
  python3 - "$rate" "$bits" "$line" <<'PY'
import sys
rate, bits, line = sys.argv[1], float(sys.argv[2]), sys.argv[3].split()
# "llama2-7b r8 q,v ELEMENTS MB AVG_MS MAX_MS ALGBW BUSBW"
mb, avg, mx = float(line[4]), float(line[5]), float(line[6])
n = 4
model = 2 * (n - 1) / n * mb * 1e6 * 8 / bits * 1e3 if bits > 0 else float("nan")
ratio = avg / model if bits > 0 else float("nan")
print("| %s | %.1f | %.1f | %.1f | %s | %s |" % (
    rate, avg, mx, mb / (avg / 1e3), "%.1f" % model if bits > 0 else "-", "%.2f" % ratio if bits > 0 else "-"))
PY
done
log "done"
