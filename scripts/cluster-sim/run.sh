#!/usr/bin/env bash
# run.sh: run an MPI command across K simulated hosts, then tear the cluster down.
#
#   scripts/cluster-sim/run.sh --hosts 2 --ranks-per-host 2 -- dpbp train --run-dir /tmp/two-hosts
#
# Options (defaults in brackets):
#   --hosts K             number of hosts [2]
#   --ranks-per-host R    ranks on each host [1]; ranks 0..R-1 on dpbp-h0, R..2R-1 on dpbp-h1, ...
#   --netmod ucx|ofi      MPICH network module between hosts, over TCP on eth0 [ucx]
#   --id ID               cluster id, dpbp-<1-20 of a-z0-9> [dpbp-sim<PID of this script>]
#   --subnet A.B.C        the hosts' /24 [10.213.0]; it exists only inside the namespaces
#   --netem "ARGS"        tc qdisc ... root netem ARGS on every host's eth0 (needs sch_netem)
#   --qdisc "SPEC"        any other egress qdisc, e.g. "tbf rate 1gbit burst 64kb latency 20ms"
#   --rate RATE           hold every host's egress to RATE (1gbit, 10gbit, ...) with a token bucket (tbf)
#   --mtu BYTES           MTU of every host's link [1500]; 9000: jumbo frames, as cluster networks use
#   --tcp-retries2 N      net.ipv4.tcp_retries2 in every namespace (kernel default 15: ~15 min)
#   --no-hostnames        skip the `hostname` probe run that prints which rank runs where
#   --mpiexec-arg ARG     extra mpiexec argument (repeatable), e.g. --mpiexec-arg -verbose
#
# Exit status: the command's (as mpiexec reports it); 2 for a bad option or a failed set-up.
# The cluster is removed on exit, on error and on SIGINT/SIGTERM/SIGHUP (the signal is first
# passed to mpiexec, which stops the job). While it runs, its namespaces are ID-h0, ID-h1, ...
# (printed at start); e.g. cut host 1's link with: ip -n ID-h1 link set eth0 down
set -euo pipefail

here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
cluster=$here/cluster.sh
hosts=2 rpp=1 netmod=ucx id="" subnet=10.213.0 hostnames=1
up_args=() extra=()

die() {
    echo "run.sh: $*" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
        --hosts) hosts=$2; shift 2 ;;
        --ranks-per-host) rpp=$2; shift 2 ;;
        --netmod) netmod=$2; shift 2 ;;
        --id) id=$2; shift 2 ;;
        --subnet) subnet=$2; shift 2 ;;
        --netem | --qdisc | --rate | --mtu | --tcp-retries2) up_args+=("$1" "$2"); shift 2 ;;
        --no-hostnames) hostnames=0; shift ;;
        --mpiexec-arg) extra+=("$2"); shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (the command goes after --)" ;;
    esac
done
[ $# -ge 1 ] || die "no command: run.sh [options] -- COMMAND..."
[[ $hosts =~ ^[0-9]+$ ]] && [ "$hosts" -ge 1 ] || die "--hosts must be a positive integer"
[[ $rpp =~ ^[0-9]+$ ]] && [ "$rpp" -ge 1 ] || die "--ranks-per-host must be a positive integer"
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, veth, bridge)"
for tool in ip unshare mount hostname mpiexec; do
    command -v "$tool" >/dev/null || die "'$tool' not found on PATH"
done
[[ $(mpiexec --version 2>/dev/null || true) == *HYDRA* ]] ||
    die "mpiexec on PATH is not MPICH's hydra (ssh-ns speaks hydra's launcher protocol): $(command -v mpiexec)"
id=${id:-dpbp-sim$$}

# MPICH from PyPI is built with ch4:ucx,ofi. Either works between the hosts if pinned to TCP on
# eth0: left alone, UCX classes ranks on other simulated hosts as intra-node (one kernel, one
# /dev/shm) and moves their data over sysv shared memory and CMA, so the veths carry almost nothing.
# Ranks on the same host still talk over MPICH's own shared memory, as on a real node.
case $netmod in
    ucx)
        export MPIR_CVAR_CH4_NETMOD=ucx
        export UCX_TLS=${UCX_TLS:-self,tcp}
        export UCX_NET_DEVICES=${UCX_NET_DEVICES:-eth0}
        ;;
    ofi)
        export MPIR_CVAR_CH4_NETMOD=ofi
        export FI_PROVIDER=${FI_PROVIDER:-tcp}
        export FI_TCP_IFACE=${FI_TCP_IFACE:-eth0}
        ;;
    *) die "--netmod must be ucx or ofi" ;;
esac
export DPBP_SIM_ID=$id

mpiexec_pid="" owned=0
# shellcheck disable=SC2329  # called by the traps below
teardown() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ -n "$mpiexec_pid" ] && kill -0 "$mpiexec_pid" 2>/dev/null; then
        kill -TERM "$mpiexec_pid" 2>/dev/null || true
    fi
    if [ "$owned" = 1 ]; then
        "$cluster" down "$id" || rc=2
    fi
    exit "$rc"
}
# shellcheck disable=SC2329
on_signal() {
    local sig=$1
    echo "run.sh: caught SIG$sig, stopping the job and removing cluster $id" >&2
    local rc
    case $sig in INT) rc=130 ;; TERM) rc=143 ;; *) rc=129 ;; esac
    if [ -n "$mpiexec_pid" ] && kill -0 "$mpiexec_pid" 2>/dev/null; then
        # hydra passes the signal to the ranks (dpbp then checkpoints and exits 75); give the job
        # 10 s to end on its own and report its status, then the teardown kills what is left.
        kill "-$sig" "$mpiexec_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$mpiexec_pid" 2>/dev/null || break; sleep 0.1; done
        if ! kill -0 "$mpiexec_pid" 2>/dev/null; then
            wait "$mpiexec_pid" && rc=0 || rc=$?
            mpiexec_pid=""
        fi
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

owned=1  # from here on the cluster (or what part of it exists) is ours to remove
"$cluster" up "$id" --hosts "$hosts" --subnet "$subnet" --owner $$ ${up_args[@]+"${up_args[@]}"} || {
    up_rc=$?
    [ "$up_rc" = 3 ] && owned=0  # the id belongs to another cluster: leave it alone
    die "setting up cluster $id failed"
}

host_list=$(seq -s, -f 'dpbp-h%.0f' 0 $((hosts - 1)))
mpiexec_args=(-launcher ssh -launcher-exec "$here/ssh-ns" -iface eth0 -hosts "$host_list"
              -ppn "$rpp" -n $((hosts * rpp)) ${extra[@]+"${extra[@]}"})
echo "cluster-sim: $id: $hosts hosts x $rpp ranks, netmod $netmod over TCP on eth0 ($subnet.0/24);" \
     "mpiexec on dpbp-head ($subnet.254); namespaces $id-h0..$id-h$((hosts - 1)), $id-head, $id-hub" >&2

if [ "$hostnames" = 1 ]; then
    # One short run of `hostname`: which rank landed where, and a check that the launcher works.
    where=$("$cluster" exec "$id" head mpiexec "${mpiexec_args[@]}" -prepend-rank hostname) ||
        die "the hostname probe failed: mpiexec cannot start ranks on the simulated hosts"
    echo "$where" | sed -n 's/^\[\([0-9]*\)\] \(.*\)$/\1 \2/p' | sort -n |
        awk '{h[$2] = h[$2] (h[$2] == "" ? "" : ",") $1; if (!($2 in o)) o[$2] = n++}
             END {for (k in o) s[o[k]] = k; printf "cluster-sim: ranks by host:";
                  for (i = 0; i < n; i++) printf " %s=[%s]", s[i], h[s[i]]; print ""}' >&2
fi

"$cluster" exec "$id" head mpiexec "${mpiexec_args[@]}" "$@" &
mpiexec_pid=$!
set +e
wait "$mpiexec_pid"
rc=$?
set -e
mpiexec_pid=""
exit "$rc"
