#!/bin/sh
# Credentials for compose.yaml, run by its one-shot `init` service before the collector and
# the agents start: a private CA, the collector's certificate, and a certificate and token
# for every agent and hotline. What exists is kept, so it runs on every `up`; a token is
# made again only if the collector's database does not know it (a new collector-data volume).
# `docker compose down -v` discards everything, this included.
#
# Settings (environment of the `init` service):
#   CA_DIR           the CA: ca.pem, ca.key and every certificate issued (only `init` mounts it)
#   CREDENTIALS_DIR  what the collector, the agents and `import` read: ca.pem, collector.pem,
#                    collector.key, and NAME.pem, NAME.key, NAME.token per agent and hotline
#   COLLECTOR_DB     the collector's --db, where `agents add` and `intake-tokens add` store tokens
#   COLLECTOR_DNS    host names clients use to reach the collector (in its certificate)
#   COLLECTOR_IPS    IP addresses clients use to reach the collector (optional)
#   AGENTS           NAME:NETWORK of each agent (its `name` and `network`)
#   HOTLINES         NAME of each hotline that runs `import` (optional)
set -eu
umask 077

tab=$(printf '\t')

# publish NAME...: copy CA_DIR/NAME into CREDENTIALS_DIR unless it is there.
publish() {
    for file in "$@"; do
        if [ ! -f "$CREDENTIALS_DIR/$file" ]; then
            cp "$CA_DIR/$file" "$CREDENTIALS_DIR/.$file.tmp"
            mv "$CREDENTIALS_DIR/.$file.tmp" "$CREDENTIALS_DIR/$file"
        fi
    done
}

# certificate NAME: a client certificate for an agent (its `name`) or a hotline, published.
certificate() {
    if [ ! -f "$CA_DIR/$1.pem" ]; then
        takedown-collector ca issue "$CA_DIR" --name "$1"
    fi
    publish "$1.pem" "$1.key"
}

# token agents|intake-tokens NAME [OPTION...]: CREDENTIALS_DIR/NAME.token, unless the file
# holds a token the database lists (live or revoked: a revoked one stays revoked).
token() {
    token_kind=$1 token_name=$2
    shift 2
    token_file="$CREDENTIALS_DIR/$token_name.token"
    if [ -s "$token_file" ]; then
        token_id=$(cut -d _ -f 2 "$token_file")
        if takedown-collector "$token_kind" list --db "$COLLECTOR_DB" \
            | grep -q -F "$tab$token_id$tab"; then
            return 0
        fi
    fi
    takedown-collector "$token_kind" add "$token_name" "$@" --replace --db "$COLLECTOR_DB" \
        > "$token_file.tmp"
    mv "$token_file.tmp" "$token_file"
}

if [ ! -f "$CA_DIR/ca.pem" ]; then
    takedown-collector ca init "$CA_DIR"
fi
publish ca.pem

if [ ! -f "$CA_DIR/collector.pem" ]; then
    set --
    for host in $COLLECTOR_DNS; do set -- "$@" --dns "$host"; done
    for address in ${COLLECTOR_IPS:-}; do set -- "$@" --ip "$address"; done
    takedown-collector ca issue "$CA_DIR" --server --name collector "$@"
fi
publish collector.pem collector.key

for agent in $AGENTS; do
    name=${agent%%:*} network=${agent#*:}
    certificate "$name"
    token agents "$name" --network "$network"
done

for name in ${HOTLINES:-}; do
    certificate "$name"
    token intake-tokens "$name"
done
echo "init-credentials: ready in $CREDENTIALS_DIR"
