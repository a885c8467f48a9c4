#!/bin/sh
# An "ssh" for hosts that are network namespaces on this machine (how CI
# simulates two nodes). mpirun calls it as: netns_rsh.sh [ssh options] HOST COMMAND...
#   mpirun --mca plm_rsh_agent launch/netns_rsh.sh --hostfile H ...
# DIST_INFER_NETNS_HOSTS maps hosts: "ADDR=NETNS=HOSTNAME ..." (tests/launchers/hosts.py
# writes it). Each host gets its own hostname (OpenMPI 5 tells nodes apart by it).
while [ $# -gt 0 ]; do
    case "$1" in -*) shift ;; *) break ;; esac   # ssh-style options mpirun may add
done
host=$1; shift
for entry in ${DIST_INFER_NETNS_HOSTS:?set DIST_INFER_NETNS_HOSTS="ADDR=NETNS=HOSTNAME ..."}; do
    addr=${entry%%=*}; rest=${entry#*=}; ns=${rest%%=*}; name=${rest#*=}
    if [ "$host" = "$addr" ] || [ "$host" = "$name" ]; then
        exec nsenter --net=/run/netns/"$ns" unshare --uts /bin/sh -c "hostname $name && $*"
    fi
done
echo "netns_rsh.sh: unknown host $host (known: $DIST_INFER_NETNS_HOSTS)" >&2
exit 255
