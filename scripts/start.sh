#!/usr/bin/env bash
# The main job: set everything up, then start podflared in the background on
# 127.0.0.1:7070 and wait until it answers. Idempotent: a running daemon is left as it is.
# Stop it with: kill "$(cat /var/lib/podflare/podflared.pid)"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

state=${PODFLARE_STATE_DIR:-/var/lib/podflare}
port=${PODFLARE_PORT:-7070}
host=${PODFLARE_BIND_HOST:-127.0.0.1}
url="http://$host:$port"
# The log and the pid file are the daemon's alone (the log names sandboxes, tenants and
# errors): umask 077, and a log an older run left readable is narrowed. The state dir is
# made 0700; the daemon opens it to 0711 itself when VMs run under uids of their own.
umask 077
[ -d "$state" ] || mkdir -p -m 0700 "$state"
touch "$state/podflared.log"
chmod 0600 "$state/podflared.log"
if curl -fsS "$url/v1/healthz" >/dev/null 2>&1; then
  echo "podflared is already running at $url"
  exit 0
fi
nohup node packages/cli/dist/main.js serve >>"$state/podflared.log" 2>&1 </dev/null &
echo $! > "$state/podflared.pid"
for _ in $(seq 1 600); do
  if curl -fsS "$url/v1/healthz" >/dev/null 2>&1; then
    echo "podflared is running at $url (pid $(cat "$state/podflared.pid"), log $state/podflared.log)"
    echo "try: PYTHONPATH=python python3 examples/hello.py   or   node examples/dist/hello.js"
    exit 0
  fi
  if ! kill -0 "$(cat "$state/podflared.pid")" 2>/dev/null; then
    echo "podflared exited during start-up; the end of its log:" >&2
    tail -n 30 "$state/podflared.log" >&2
    exit 1
  fi
  sleep 0.2
done
echo "podflared did not answer within 120 s; see $state/podflared.log" >&2
exit 1
