#!/usr/bin/env bash
# Makes sure a Redis answers at OAL_REDIS_PORT (default 6379) on 127.0.0.1; starts one when none does.
# A Redis we start keeps nothing on disk and writes its pid to .run/redis-PORT.pid.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${OAL_REDIS_PORT:-6379}
if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
    exit 0
fi
mkdir -p .run
echo "redis: none answers on 127.0.0.1:$port, starting one"
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$PWD/.run/redis-$port.pid" --logfile "$PWD/.run/redis-$port.log"
for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG && exit 0
    sleep 0.1
done
echo "redis: failed to start on port $port; see .run/redis-$port.log" >&2
exit 1
