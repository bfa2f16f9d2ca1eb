#!/bin/sh
# Writes docker/.env from .env.example with a random value for every required variable, and
# secrets/metrics_token with the same metrics token, both for their owner only. Refuses
# to overwrite either: an existing .env holds the passwords the volumes were created with.
set -eu
cd "$(dirname "$0")"
if [ -e .env ] || [ -e secrets/metrics_token ]; then
    echo "new-env.sh: .env or secrets/metrics_token exists already; edit it or remove it first" >&2
    exit 1
fi
random_value() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
mkdir -p secrets
token=$(random_value)
while IFS= read -r line; do
    case "$line" in
        CAPWORKS_METRICS_TOKEN=) echo "CAPWORKS_METRICS_TOKEN=$token" ;;
        [A-Z]*=) echo "$line$(random_value)" ;;
        *) echo "$line" ;;
    esac
done < .env.example > .env
printf '%s' "$token" > secrets/metrics_token
# Prometheus reads it as its own user (nobody) through a bind mount: the file is readable, the
# folder around it (0700) keeps the host's other users out.
chmod 644 secrets/metrics_token
echo "new-env.sh: wrote $(pwd)/.env and $(pwd)/secrets/metrics_token"
