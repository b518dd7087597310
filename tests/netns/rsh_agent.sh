#!/bin/sh
# rsh agent of the network-namespace tests (tests/netns/netns_lib.sh): OpenMPI runs
#   rsh_agent.sh HOST COMMAND...
# to start its daemon on HOST. HOST is an address 10.213.0.<i> of the test's subnet;
# the command runs in that host's namespace with that host's own hostname.
host=$1
shift
case "$host" in
  "$DPO_NETNS_SUBNET".*) i=${host##*.} ;;
  *) echo "rsh_agent.sh: $host is not a test host ($DPO_NETNS_SUBNET.<i>)" >&2; exit 255 ;;
esac
ns="${DPO_NETNS_TAG}h$i"
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && eval "$1"' "$ns" "$*"
