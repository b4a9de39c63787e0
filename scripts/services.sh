#!/usr/bin/env bash
# Starts the local services the tests use (PostgreSQL on 127.0.0.1:5432 and
# NATS with JetStream on 127.0.0.1:4222) if they are not already answering.
set -euo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! up 5432; then
  echo "starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
if ! up 4222 && command -v nats-server >/dev/null; then
  echo "starting NATS" >&2
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
fi
for _ in $(seq 1 50); do
  up 5432 && break
  sleep 0.2
done
up 5432 || { echo "PostgreSQL is not answering on 127.0.0.1:5432" >&2; exit 1; }
