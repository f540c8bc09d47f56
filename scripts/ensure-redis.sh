#!/usr/bin/env bash
# Make sure a Redis answers on COURIER_REDIS (default 127.0.0.1:6379); start a local one if we can.
set -euo pipefail
addr=${COURIER_REDIS:-127.0.0.1:6379}
host=${addr%:*}; port=${addr##*:}
ping() { python3 - "$host" "$port" <<'PY'
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as s:
        s.sendall(b"PING\r\n"); sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}
if ping; then echo "redis: answering on $addr"; exit 0; fi
if ! command -v redis-server >/dev/null; then
  echo "redis: nothing answers on $addr and redis-server is not installed." >&2
  echo "       Install it (Debian/Ubuntu: sudo apt-get install redis-server) or set COURIER_REDIS=host:port." >&2
  exit 1
fi
mkdir -p /tmp/courier-redis
redis-server --daemonize yes --bind "$host" --port "$port" --save "" --appendonly no \
  --dir /tmp/courier-redis --logfile /tmp/courier-redis/redis.log
for _ in $(seq 50); do ping && { echo "redis: started on $addr"; exit 0; }; sleep 0.1; done
echo "redis: started but not answering on $addr; see /tmp/courier-redis/redis.log" >&2; exit 1
