#!/usr/bin/env bash
# cluster.sh: a simulated cluster of K "hosts" on one Linux box, built from network namespaces.
#
#   hub namespace  ID-hub : bridge br0 (no address), one veth port per host (h0, h1, ..., head)
#   host namespace ID-hN  : eth0 = 10.213.0.(N+1)/24, lo; runs as hostname dpbp-hN
#   head namespace ID-head: eth0 = 10.213.0.254/24, lo; runs mpiexec as hostname dpbp-head
#
# Nothing is added to the root namespace: every interface, address and route lives in the
# namespaces, so the subnet cannot clash with the machine's own and all traffic stays inside.
# Processes enter a host with `cluster.sh exec ID HOST CMD...`: its network namespace, a fresh
# UTS namespace with the host's name, and (in the mount namespace that `ip netns exec` makes) an
# /etc/hosts that lists the simulated hosts and an /etc/resolv.conf with no outside DNS server.
#
# Usage:
#   cluster.sh up ID --hosts K [--subnet 10.213.0] [--owner PID] [--netem ARGS] [--qdisc ARGS]
#                              [--rate RATE] [--mtu BYTES] [--tcp-retries2 N]
#   cluster.sh exec ID HOST CMD...      HOST: dpbp-hN, hN, dpbp-head or head
#   cluster.sh down ID                  kill what runs in ID's namespaces, delete them and the state
#   cluster.sh list                     simulated clusters on this machine and their owners
#   cluster.sh cleanup-stale            `down` every cluster whose owner process has exited
#
# ID is `dpbp-` plus 1-20 letters/digits, unique per invocation (run.sh uses dpbp-sim<its PID>).
# Exit status: 0, 2 for errors, 3 when `up` finds the id taken.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
STATE_ROOT=${DPBP_SIM_STATE:-/run/dpbp-cluster-sim}

die() {
    echo "cluster.sh: $*" >&2
    exit 2
}

check_id() {
    [[ $1 =~ ^dpbp-[a-z0-9]{1,20}$ ]] || die "bad cluster id '$1' (want dpbp- and 1-20 of a-z0-9)"
}

# Namespace name for HOST (dpbp-h3, h3, dpbp-head, head) in cluster ID.
ns_of() {
    local id=$1 host=${2#dpbp-}
    [[ $host =~ ^(h[0-9]+|head)$ ]] || die "unknown host '$2' (want dpbp-hN or dpbp-head)"
    echo "$id-$host"
}

# Run a command inside namespace NS (network only; for ip, tc, sysctl).
in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

# A token-bucket qdisc that holds a host's egress to RATE (tc units: 1gbit, 10gbit, 500mbit): the bucket
# holds 10 ms at that rate (tbf needs at least rate/HZ), the queue 100 ms before packets drop.
rate_qdisc() {
    local rate=$1 bits
    [[ $rate =~ ^([0-9]+)(k|m|g)bit$ ]] || die "up: --rate must look like 500mbit, 1gbit or 10gbit, got '$rate'"
    case ${BASH_REMATCH[2]} in k) bits=1000 ;; m) bits=1000000 ;; g) bits=1000000000 ;; esac
    bits=$((BASH_REMATCH[1] * bits))
    echo "tbf rate $rate burst $((bits / 800 > 65536 ? bits / 800 : 65536)) latency 100ms"
}

cmd_up() {
    local id=$1 hosts="" subnet=10.213.0 owner=$PPID qdisc="" retries2="" mtu=""
    shift
    check_id "$id"
    while [ $# -gt 0 ]; do
        case $1 in
            --hosts) hosts=$2; shift 2 ;;
            --subnet) subnet=$2; shift 2 ;;
            --owner) owner=$2; shift 2 ;;
            --netem) qdisc="netem $2"; shift 2 ;;
            --qdisc) qdisc=$2; shift 2 ;;
            --rate) qdisc=$(rate_qdisc "$2"); shift 2 ;;
            --mtu) mtu=$2; shift 2 ;;
            --tcp-retries2) retries2=$2; shift 2 ;;
            *) die "up: unknown option '$1'" ;;
        esac
    done
    [[ $hosts =~ ^[0-9]+$ ]] && [ "$hosts" -ge 1 ] && [ "$hosts" -le 200 ] || die "up: --hosts must be 1..200"
    [[ $subnet =~ ^10\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "up: --subnet must be the first 3 octets of a 10.x /24"
    [ -z "$mtu" ] || { [[ $mtu =~ ^[0-9]+$ ]] && [ "$mtu" -ge 576 ] && [ "$mtu" -le 65535 ]; } ||
        die "up: --mtu must be 576..65535"
    local state=$STATE_ROOT/$id
    # mkdir claims the id atomically; exit status 3 tells run.sh that the id is someone else's.
    mkdir -p "$STATE_ROOT"
    if [ -e "/run/netns/$id-hub" ] || [ -e "/run/netns/$id-head" ] || ! mkdir "$state" 2>/dev/null; then
        echo "cluster.sh: cluster $id exists already; pick another id or remove it: $SELF down $id" >&2
        exit 3
    fi
    echo "$owner" > "$state/owner"
    echo "$hosts" > "$state/hosts_count"
    echo "$subnet" > "$state/subnet"
    : > "$state/netns"
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost"
        echo "$subnet.254 dpbp-head"
        for ((i = 0; i < hosts; i++)); do echo "$subnet.$((i + 1)) dpbp-h$i"; done
    } > "$state/hosts"
    # No nameserver line: glibc then asks 127.0.0.1 of the namespace, so no query leaves it.
    printf '# dpbp cluster-sim %s: no DNS inside the simulated cluster\noptions attempts:1 timeout:1\n' \
        "$id" > "$state/resolv.conf"

    local hub=$id-hub
    ip netns add "$hub"
    echo "$hub" >> "$state/netns"
    ip -n "$hub" link set lo up
    ip -n "$hub" link add br0 type bridge forward_delay 0 stp_state 0
    ip -n "$hub" link set br0 up

    local names=(head) i name ns addr
    for ((i = 0; i < hosts; i++)); do names+=("h$i"); done
    for name in "${names[@]}"; do
        ns=$id-$name
        if [ "$name" = head ]; then addr=$subnet.254; else addr=$subnet.$((${name#h} + 1)); fi
        ip netns add "$ns"
        echo "$ns" >> "$state/netns"
        # IPv6 off: one address family keeps libfabric/UCX address lists short and unambiguous.
        in_ns "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 \
            2>/dev/null || true
        ip -n "$hub" link add "$name" type veth peer name eth0 netns "$ns"
        if [ -n "$mtu" ]; then
            ip -n "$hub" link set "$name" mtu "$mtu"
            ip -n "$ns" link set eth0 mtu "$mtu"
        fi
        ip -n "$hub" link set "$name" master br0 up
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        if [ -n "$retries2" ]; then
            in_ns "$ns" sysctl -qw "net.ipv4.tcp_retries2=$retries2"
        fi
        if [ -n "$qdisc" ] && [ "$name" != head ]; then
            # shellcheck disable=SC2086  # the qdisc spec is a word list on purpose
            in_ns "$ns" tc qdisc add dev eth0 root $qdisc ||
                die "up: 'tc qdisc add dev eth0 root $qdisc' failed (is the kernel module, e.g. sch_netem, there?)"
        fi
    done
}

# Kill everything in ID's namespaces, delete them, remove the state. Touches nothing else.
cmd_down() {
    local id=$1
    check_id "$id"
    local state=$STATE_ROOT/$id ns pids left=() listed
    listed=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$id-(hub|head|h[0-9]+)$" || true)
    # The recorded names first, then any of ours that a crash kept out of the record.
    local all
    all=$( { cat "$state/netns" 2>/dev/null || true; echo "$listed"; } | awk 'NF && !seen[$0]++')
    for ns in $all; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
    done
    local order
    # Hosts before the hub (deleting a host's namespace deletes its veth pair, then the bridge).
    order=$(printf '%s\n' "$all" | awk -v hub="$id-hub" '$0 == hub {h = 1; next} {print} END {if (h) print hub}')
    for ns in $order; do
        local tries=0
        while [ -n "$(ip netns pids "$ns" 2>/dev/null || true)" ] && [ $tries -lt 50 ]; do
            sleep 0.1
            tries=$((tries + 1))
        done
        tries=0
        until ip netns del "$ns" 2>/dev/null || [ ! -e "/run/netns/$ns" ]; do
            tries=$((tries + 1))
            if [ $tries -ge 20 ]; then left+=("$ns"); break; fi
            sleep 0.1
        done
    done
    rm -rf "$state"
    [ ${#left[@]} -eq 0 ] || die "down: could not delete namespaces: ${left[*]}"
}

cmd_exec() {
    [ $# -ge 3 ] || die "exec: want ID HOST CMD..."
    local id=$1 host=$2
    shift 2
    check_id "$id"
    local ns state=$STATE_ROOT/$id
    ns=$(ns_of "$id" "$host")
    [ -e "/run/netns/$ns" ] || die "exec: no namespace $ns (is cluster $id up?)"
    case $host in dpbp-*) ;; *) host=dpbp-$host ;; esac
    # ip netns exec already gives the command its own mount namespace, a slave of the root one:
    # the bind mounts of _enter stay inside it, and unmounts such as `ip netns del` still reach it.
    exec ip netns exec "$ns" unshare --uts -- "$SELF" _enter "$state" "$host" "$@"
}

# Inside the new UTS namespace (and ip netns exec's mount namespace): name the host, give it the cluster's hosts file.
cmd_enter() {
    local state=$1 host=$2
    shift 2
    mount --bind "$state/hosts" /etc/hosts
    mount --bind "$state/resolv.conf" /etc/resolv.conf
    hostname "$host"
    exec "$@"
}

cmd_list() {
    local dir id owner alive
    for dir in "$STATE_ROOT"/dpbp-*; do
        [ -d "$dir" ] || continue
        id=${dir##*/}
        owner=$(cat "$dir/owner" 2>/dev/null || echo "?")
        alive=exited
        [[ $owner =~ ^[0-9]+$ ]] && kill -0 "$owner" 2>/dev/null && alive=running
        echo "$id hosts=$(cat "$dir/hosts_count" 2>/dev/null || echo "?") owner=$owner ($alive)"
    done
}

cmd_cleanup_stale() {
    local dir id owner
    for dir in "$STATE_ROOT"/dpbp-*; do
        [ -d "$dir" ] || continue
        id=${dir##*/}
        owner=$(cat "$dir/owner" 2>/dev/null || echo "")
        if [[ $owner =~ ^[0-9]+$ ]] && kill -0 "$owner" 2>/dev/null; then continue; fi
        echo "cluster.sh: removing stale cluster $id (owner ${owner:-unknown} has exited)" >&2
        cmd_down "$id"
    done
}

[ $# -ge 1 ] || die "usage: cluster.sh up|exec|down|list|cleanup-stale ... (see the header of $SELF)"
sub=$1
shift
case $sub in
    up) [ $# -ge 1 ] || die "up: want ID"; cmd_up "$@" ;;
    down) [ $# -eq 1 ] || die "down: want ID"; cmd_down "$1" ;;
    exec) cmd_exec "$@" ;;
    _enter) cmd_enter "$@" ;;
    list) cmd_list ;;
    cleanup-stale) cmd_cleanup_stale ;;
    -h | --help) sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command '$sub' (up, exec, down, list, cleanup-stale)" ;;
esac
