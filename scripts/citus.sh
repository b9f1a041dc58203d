#!/usr/bin/env bash
# A local Citus cluster for tests and for trying the scale-out: one coordinator and two workers
# (or more), each a PostgreSQL 15 cluster with Citus and PostGIS, listening on 127.0.0.1 only.
#
#   scripts/citus.sh start [--workers N] [--tarball citus-X.Y.Z.tar.gz]
#                                 build Citus if needed, start N workers (default 2), print the URL
#   scripts/citus.sh stop         stop every node (nothing left running)
#   scripts/citus.sh status       each node, and the URL while running
#
# Citus is built from ../shared/vendor/citus (or --tarball) when the server has no citus.so; that
# needs root (apt packages and `make install` into the PostgreSQL directories). The nodes live in
# $SPATIALDB_CITUS_HOME (default ~/.spatialdb-citus; /var/lib/spatialdb-citus as root) on ports
# $SPATIALDB_CITUS_PORT (default 9700) and the next ones; as root they run as the unprivileged
# account $SPATIALDB_SERVER_USER (spatialdb). Safe to run again: a running node is left as it is
# and the worker list is only ever completed (a worker once added stays; move its shards with
# citus_rebalance_start() after adding one).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
root=false
[ "$(id -u)" = 0 ] && root=true
if $root; then default_home=/var/lib/spatialdb-citus; else default_home="$HOME/.spatialdb-citus"; fi
home="${SPATIALDB_CITUS_HOME:-$default_home}"
port="${SPATIALDB_CITUS_PORT:-9700}"
pg_bin=/usr/lib/postgresql/15/bin
server_user="${SPATIALDB_SERVER_USER:-spatialdb}"
nodes=(coordinator)

set_nodes() {  # set_nodes N: the coordinator and N workers, and every worker already on disk
    local count="$1" i=1
    while [ -f "$home/worker$((count + 1))/PG_VERSION" ]; do count=$((count + 1)); done
    nodes=(coordinator)
    while [ "$i" -le "$count" ]; do nodes+=("worker$i"); i=$((i + 1)); done
}
database=spatialdb

fail() { echo "citus.sh: error: $*" >&2; exit 1; }
log() { echo "citus.sh: $*" >&2; }

as_server() {
    if $root; then runuser -u "$server_user" -- "$@"; else "$@"; fi
}

node_port() { echo $((port + $1)); }

url() { echo "postgresql+psycopg2://$database@127.0.0.1:$port/$database"; }

sql() {  # sql PORT DATABASE STATEMENT
    PGOPTIONS='-c client_min_messages=warning' "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U "$database" -d "$2" -At -c "$3"
}

citus_installed() {
    [ -f "$("$pg_bin/pg_config" --pkglibdir)/citus.so" ] &&
        [ -f "$("$pg_bin/pg_config" --sharedir)/extension/citus.control" ]
}

install_citus() (  # install_citus TARBALL; a subshell, so that its EXIT trap removes the build
    local tarball="$1" build
    [ -f "$tarball" ] || fail "no Citus source at $tarball (give one with --tarball)"
    $root || fail "building Citus needs root (apt packages, make install)"
    local version
    version="$(dpkg-query -W -f='${Version}' postgresql-15)"
    # The headers pinned to the installed server: unpinned, apt upgrades the server binaries.
    local packages=("postgresql-server-dev-15=$version" libkrb5-dev liblz4-dev libzstd-dev
        libssl-dev libxslt1-dev libreadline-dev libicu-dev make gcc)
    local missing=()
    for package in "${packages[@]}"; do
        dpkg -s "${package%%=*}" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]} with apt"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    build="$(mktemp -d)"
    trap 'rm -rf "$build"' EXIT
    log "building Citus from $tarball"
    tar -xzf "$tarball" -C "$build" --strip-components=1
    (
        cd "$build"
        PG_CONFIG="$pg_bin/pg_config" ./configure --without-libcurl >"$build/configure.log" 2>&1 ||
            { tail -20 "$build/configure.log" >&2; exit 1; }
        make -j"$(nproc)" with_llvm=no >"$build/make.log" 2>&1 || { tail -20 "$build/make.log" >&2; exit 1; }
        make install with_llvm=no >>"$build/make.log" 2>&1 || { tail -20 "$build/make.log" >&2; exit 1; }
    ) || fail "building Citus failed (see the lines above)"
    citus_installed || fail "make install did not install citus.so into $("$pg_bin/pg_config" --pkglibdir)"
    log "Citus installed"
)

init_node() {  # init_node INDEX
    local name="${nodes[$1]}" data="$home/${nodes[$1]}"
    [ -f "$data/PG_VERSION" ] && return
    rm -rf "$data"
    mkdir -p "$data"
    if $root; then chown "$server_user:" "$data"; fi
    chmod 700 "$data"
    as_server "$pg_bin/initdb" -D "$data" -U "$database" --auth=trust --encoding=UTF8 \
        --no-locale >"$home/$name.initdb.log" 2>&1 || { cat "$home/$name.initdb.log" >&2; fail "initdb of $name failed"; }
    cat >>"$data/postgresql.auto.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $(node_port "$1")
unix_socket_directories = ''
shared_preload_libraries = 'citus'
max_connections = 200
shared_buffers = '256MB'
work_mem = '32MB'
jit = off
wal_level = logical
max_prepared_transactions = 200
log_min_messages = warning
EOF
    # Trust only loopback TCP: no socket, no other address.
    printf 'host all all 127.0.0.1/32 trust\n' >"$data/pg_hba.conf"
}

node_running() { [ -f "$home/${nodes[$1]}/PG_VERSION" ] && as_server "$pg_bin/pg_ctl" -D "$home/${nodes[$1]}" status >/dev/null 2>&1; }

start_node() {
    local name="${nodes[$1]}"
    node_running "$1" && return
    # 9>&-: the server must not inherit the lock, or it would hold it for as long as it runs.
    as_server "$pg_bin/pg_ctl" -D "$home/$name" -w -t 60 -l "$home/$name.log" start >/dev/null 9>&- ||
        { tail -20 "$home/$name.log" >&2; fail "$name did not start"; }
}

prepare_node() {
    local p
    p="$(node_port "$1")"
    if [ -z "$(sql "$p" postgres "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
        sql "$p" postgres "CREATE DATABASE $database"
    fi
    # Only where missing: a worker already in the cluster refuses DDL, even IF NOT EXISTS.
    for extension in citus postgis; do
        if [ -z "$(sql "$p" "$database" "SELECT 1 FROM pg_extension WHERE extname = '$extension'")" ]; then
            sql "$p" "$database" "CREATE EXTENSION $extension"
        fi
    done
}

start() {
    local tarball="$here/../shared/vendor/citus/citus-13.2.2.tar.gz" workers=2
    while [ $# -gt 0 ]; do
        case "$1" in
            --tarball) tarball="${2:?--tarball needs a path}"; shift 2 ;;
            --workers)
                workers="${2:?--workers needs a count}"; shift 2
                [[ "$workers" =~ ^[1-9][0-9]?$ ]] || fail "--workers must be a count from 1 to 99" ;;
            *) fail "unknown option $1" ;;
        esac
    done
    [ -x "$pg_bin/postgres" ] || fail "PostgreSQL 15 is not installed (bash scripts/setup.sh)"
    [ -f "$("$pg_bin/pg_config" --sharedir)/extension/postgis.control" ] ||
        fail "PostGIS is not installed (apt-get install postgresql-15-postgis-3)"
    citus_installed || install_citus "$tarball"
    if $root && ! id "$server_user" >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin "$server_user"
    fi
    mkdir -p "$home"
    chmod 755 "$home"
    if $root; then chown "$server_user:" "$home"; fi
    exec 9>"$home/.lock"
    flock 9
    # Every node up before any DDL: the coordinator propagates extensions to its workers.
    set_nodes "$workers"
    local i
    for i in "${!nodes[@]}"; do init_node "$i"; start_node "$i"; done
    for i in "${!nodes[@]}"; do prepare_node "$i"; done
    sql "$port" "$database" "SELECT citus_set_coordinator_host('127.0.0.1', $port)" >/dev/null
    for i in $(seq 1 $((${#nodes[@]} - 1))); do
        local p
        p="$(node_port "$i")"
        if [ -z "$(sql "$port" "$database" "SELECT 1 FROM pg_dist_node WHERE nodeport = $p")" ]; then
            sql "$port" "$database" "SELECT citus_add_node('127.0.0.1', $p)" >/dev/null
        fi
    done
    url
}

stop() {
    [ -d "$home" ] || return 0
    set_nodes 0
    local i
    for i in $(seq $((${#nodes[@]} - 1)) -1 0); do
        if node_running "$i"; then
            # fast first; a node still busy after 30 s (Citus's maintenance daemon) is stopped
            # immediately, which its WAL recovers from at the next start.
            as_server "$pg_bin/pg_ctl" -D "$home/${nodes[$i]}" -m fast -w -t 30 stop >/dev/null 2>&1 ||
                as_server "$pg_bin/pg_ctl" -D "$home/${nodes[$i]}" -m immediate -w stop >/dev/null
            log "${nodes[$i]} stopped"
        fi
    done
}

status() {
    local down=0 i
    set_nodes 0
    for i in "${!nodes[@]}"; do
        if node_running "$i"; then
            echo "${nodes[$i]}: running on 127.0.0.1:$(node_port "$i")"
        else
            echo "${nodes[$i]}: stopped"
            down=1
        fi
    done
    [ "$down" = 0 ] && url
    return "$down"
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
    start) start "$@" ;;
    stop) stop ;;
    status) status ;;
    *) fail "usage: scripts/citus.sh start [--workers N] [--tarball PATH] | stop | status" ;;
esac
