# shellcheck shell=bash
# Several "hosts" on one machine (sourced by tests/netns/*.sh after tests/e2e/common.sh):
# network namespaces joined by veth pairs to one bridge, each namespace one host with
# its own address (10.213.0.<i>/24) and, inside the processes started here, its own
# hostname (unshare --uts): OpenMPI tells hosts apart by hostname, and with one shared
# hostname MPI_Comm_split_type(SHARED) hangs. Nothing here touches an address outside
# these namespaces; the bridge in the root namespace has no address.
#   netns_require            exits 77 (ctest: NOT RUN, never passed) when namespaces cannot be made
#   netns_up N               creates hosts 1..N (names in netns_ns[i], hostnames netns_host[i])
#   netns_exec I cmd...      runs cmd on host I (own netns and hostname)
#   netns_mpirun_cmd I ARGS... sets netns_cmd: scripts/dpo_mpirun on host I, rsh agent, TCP only
#   netns_link I up|down     the link of host I
# Cleanup (every process in the namespaces, namespaces, bridge) is an e2e cleanup hook.

netns_src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
netns_subnet=10.213.0
netns_tag=$(printf 'd%04x' $(($$ % 65536)))  # short: interface names are <= 15 chars
netns_ns=()
netns_host=()

netns_skip() {
  echo "$e2e_name: NOT RUN: $*" >&2
  exit 77
}

netns_require() {
  [ "$(id -u)" = 0 ] || netns_skip "needs root (network namespaces, veth, bridge)"
  local t
  for t in ip unshare pgrep; do command -v $t >/dev/null || netns_skip "$t not found (iproute2, util-linux, procps)"; done
  ip netns add "${netns_tag}probe" 2>/dev/null || netns_skip "cannot create a network namespace (ip netns add: not permitted here)"
  ip netns del "${netns_tag}probe"
  ip link add "${netns_tag}pb" type bridge 2>/dev/null || netns_skip "cannot create a bridge (ip link add type bridge)"
  ip link del "${netns_tag}pb"
  unshare --uts true 2>/dev/null || netns_skip "cannot unshare the UTS namespace (own hostname per host)"
}

netns_down() {
  local ns p
  for ns in "${netns_ns[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  done
  for ns in "${netns_ns[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  ip link del "${netns_tag}br" 2>/dev/null || true
}

netns_up() {
  local n=$1 i ns
  e2e_cleanup_hooks+=(netns_down)
  ip link add "${netns_tag}br" type bridge || fail "ip link add bridge failed"
  ip link set "${netns_tag}br" up
  for ((i = 1; i <= n; i++)); do
    ns="${netns_tag}h$i"
    netns_ns[i]=$ns
    netns_host[i]=$ns
    ip netns add "$ns" || fail "ip netns add $ns failed"
    ip link add "${netns_tag}v$i" type veth peer name eth0 netns "$ns" || fail "veth for $ns failed"
    ip link set "${netns_tag}v$i" master "${netns_tag}br" up
    ip -n "$ns" addr add "$netns_subnet.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
  # Bridged frames must not be dropped by a firewall on the bridge (br_netfilter): host 1
  # connects to a listener on every other host.
  for ((i = 2; i <= n; i++)); do
    netns_can_reach 1 "$i" || netns_skip "host 1 cannot reach host $i over the bridge (a firewall on bridged traffic?)"
  done
  export DPO_NETNS_TAG=$netns_tag DPO_NETNS_SUBNET=$netns_subnet
}

# netns_can_reach I J: host I opens a TCP connection to a listener on host J (5 s limit).
netns_can_reach() {
  local port=47613
  ip netns exec "${netns_ns[$2]}" timeout 6 python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1]))); s.listen(1); s.settimeout(5); s.accept()' $port &
  local lp=$!
  sleep 0.3
  ip netns exec "${netns_ns[$1]}" timeout 5 python3 -c '
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=4).close()' "$netns_subnet.$2" $port
  local rc=$?
  wait $lp 2>/dev/null
  return $rc
}

netns_exec() {
  local i=$1
  shift
  ip netns exec "${netns_ns[i]}" unshare --uts sh -c 'hostname "$0" && exec "$@"' "${netns_host[i]}" "$@"
}

# OpenMPI across the hosts: the rsh agent enters the target host's namespace; TCP only,
# on the bridge subnet (the out-of-band channel too).
netns_mpi_flags() {
  echo --allow-run-as-root --oversubscribe --bind-to none \
    --mca plm_rsh_agent "$netns_src/tests/netns/rsh_agent.sh" --mca plm_rsh_no_tree_spawn 1 \
    --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include "$netns_subnet.0/24" \
    --mca oob_tcp_if_include "$netns_subnet.0/24" -x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS
}

# netns_mpirun_cmd I ARGS...: sets the array netns_cmd to the command that runs
# scripts/dpo_mpirun on host I with the rsh agent and the TCP-only MCA options (a real
# command, so that timeout, setsid and run_bounded can start it).
netns_mpirun_cmd() {
  local i=$1
  shift
  # shellcheck disable=SC2046
  netns_cmd=(ip netns exec "${netns_ns[i]}" unshare --uts sh -c 'hostname "$0" && exec "$@"' "${netns_host[i]}"
    "$netns_src/scripts/dpo_mpirun" --grace "${DPO_MPIRUN_GRACE:-15}" $(netns_mpi_flags) "$@")
}

netns_link() {
  ip link set "${netns_tag}v$1" "$2"
}

# cmp_losses_rel A.jsonl B.jsonl RTOL: the same training steps, |la-lb| / |lb| <= RTOL.
cmp_losses_rel() {
  python3 - "$1" "$2" "$3" <<'PY' || fail "losses of $1 and $2 differ (see above)"
import json, sys
def losses(p):
    return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, open(p))) if "loss" in r}
a, b, rtol = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3])
assert a and sorted(a) == sorted(b), "steps differ: %s vs %s" % (sorted(a), sorted(b))
worst = max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-30) for s in a)
print("losses: %d steps, worst relative diff %.3g" % (len(a), worst))
assert worst <= rtol, "relative loss diff %.3g > %g" % (worst, rtol)
PY
}
