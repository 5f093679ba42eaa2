#!/usr/bin/env bash
# Installs what walbridge's tests and demo need on a Debian bookworm machine with Rust:
#   - Postgres 15 server binaries (the tests start their own throwaway clusters),
#   - build dependencies of rdkafka's bundled librdkafka (C compiler, make, zlib, pkg-config),
#   - the tansu Kafka-protocol broker (cargo install, ~15 minutes on 2 cores the first time).
# Idempotent: installs only what is missing and prints nothing when everything is present.
set -euo pipefail

PG_BIN=/usr/lib/postgresql/15/bin
TANSU_VERSION=0.6.0
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a noisy command quietly, showing its output only when it fails.
quietly() {
    local log
    log="$(mktemp)"
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "install-prereqs: failed: $*" >&2
        return 1
    fi
    rm -f "$log"
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# --- Debian packages --------------------------------------------------------------------------

packages=()
installing_postgres=false
if [ ! -x "$PG_BIN/postgres" ]; then
    packages+=(postgresql-15 postgresql-client-15)
    installing_postgres=true
fi
# librdkafka is built from source by rdkafka-sys (./configure && make); zlib is found through
# pkg-config (libz-sys would otherwise compile its own copy); libssl-dev gives it OpenSSL for
# Kafka TLS and SASL/SCRAM (rdkafka's `ssl` feature). The TLS tests make their certificates
# with the openssl CLI.
for p in gcc make pkg-config zlib1g-dev libssl-dev openssl; do
    is_installed "$p" || packages+=("$p")
done

if [ "${#packages[@]}" -gt 0 ]; then
    echo "install-prereqs: installing ${packages[*]}"
    if $installing_postgres; then
        # The tests start their own clusters; the package's default cluster on port 5432 is not
        # wanted. postgresql-common reads this before creating it.
        as_root mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false" |
            as_root tee /etc/postgresql-common/createcluster.d/walbridge.conf >/dev/null
    fi
    quietly as_root apt-get update -q
    quietly as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${packages[@]}"
    if $installing_postgres && command -v pg_lsclusters >/dev/null; then
        # Should a default cluster exist anyway (e.g. created before the setting above), stop
        # it and keep it from starting on boot so it does not hold port 5432.
        while read -r version cluster _port status _rest; do
            [ "$version" = 15 ] && [ "$cluster" = main ] || continue
            if [ "$status" = online ]; then
                quietly as_root pg_ctlcluster 15 main stop
            fi
            echo manual | as_root tee /etc/postgresql/15/main/start.conf >/dev/null
        done < <(pg_lsclusters --no-header 2>/dev/null || true)
    fi
fi

if [ ! -x "$PG_BIN/postgres" ]; then
    echo "install-prereqs: $PG_BIN/postgres is still missing after installing postgresql-15" >&2
    exit 1
fi

# --- tansu ------------------------------------------------------------------------------------

if ! command -v tansu >/dev/null && [ ! -x "$CARGO_BIN/tansu" ]; then
    echo "install-prereqs: building tansu $TANSU_VERSION with cargo install (takes about 15 minutes on 2 cores)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,postgres --quiet
    if [ ! -x "$CARGO_BIN/tansu" ] && ! command -v tansu >/dev/null; then
        echo "install-prereqs: tansu was built but is neither on PATH nor in $CARGO_BIN" >&2
        exit 1
    fi
fi

# --- Confluent's Python client ----------------------------------------------------------------

# tests/e2e/confluent_client.rs checks the registry and topics with a client nobody here wrote.
# The wheel bundles librdkafka. 2.16.0, not 2.16.1: 2.16.1's schemaregistry extra needs a
# certifi newer than the package index here has.
CONFLUENT_KAFKA_VERSION=2.16.0
if ! python3 -c 'import confluent_kafka.schema_registry.avro' 2>/dev/null; then
    echo "install-prereqs: installing confluent-kafka $CONFLUENT_KAFKA_VERSION (Python)"
    quietly python3 -m pip install --quiet "confluent-kafka[avro,schemaregistry]==$CONFLUENT_KAFKA_VERSION"
fi

# --- psycopg (Python) -------------------------------------------------------------------------

# tests/e2e/views.rs queries the SQL endpoint with psycopg 3 (binary build: bundles libpq).
PSYCOPG_VERSION=3.3.6
if ! python3 -c 'import psycopg' 2>/dev/null; then
    echo "install-prereqs: installing psycopg $PSYCOPG_VERSION (Python)"
    quietly python3 -m pip install --quiet "psycopg[binary]==$PSYCOPG_VERSION"
fi
