#!/usr/bin/env bash
# Make sure PostgreSQL answers on 127.0.0.1:5432 (the registry test on the backend the chart deploys).
set -euo pipefail
if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then echo "postgres: answering on 127.0.0.1:5432"; exit 0; fi
if ! command -v pg_ctlcluster >/dev/null; then
  echo "postgres: nothing answers on 127.0.0.1:5432 and PostgreSQL is not installed; the registry's" >&2
  echo "          PostgreSQL test will be skipped (Debian/Ubuntu: sudo apt-get install postgresql)." >&2
  exit 0
fi
pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && { echo "postgres: started"; exit 0; }; sleep 0.2; done
echo "postgres: started but not answering on 127.0.0.1:5432" >&2; exit 1
