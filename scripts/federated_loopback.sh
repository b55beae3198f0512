#!/usr/bin/env bash
# Real Flower deployment of the stochvit app on 127.0.0.1: one SuperLink and N SuperNodes as separate processes,
# the app submitted with `flwr run`, everything stopped by PID at the end (also on error or Ctrl-C).
#
#   scripts/federated_loopback.sh --out runs/fed-loopback [--nodes 3] [--min-clients 2] [--rounds 3]
#       [--run-config 'partition="dirichlet:0.5" local-epochs=2 stochastic=false'] [--workdir DIR]
#       [--kill-node I --kill-after-round R]   # failure drill: SIGKILL SuperNode I once round R is done
#                                              # (R=0: as soon as node I runs its first ClientApp, i.e. mid-round 1)
#       [--timeout SECONDS]
#
# Exit status 0 only when the run reports finished:completed and the run directory is complete (`flwr run`
# itself returns as soon as the run is submitted, and `--stream` exits 0 even for failed runs).
# Logs: <out>/logs/{superlink,supernode-I,serverapp}.log. The same commands with real addresses scale out to
# several machines: see docs/federated.md.
set -euo pipefail

NODES=3 MIN=2 ROUNDS=3 OUT="" WORK="" KILL_NODE="" KILL_AFTER=1 TIMEOUT=1800 EXTRA=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES=$2; shift 2 ;;
    --min-clients) MIN=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --workdir) WORK=$2; shift 2 ;;
    --run-config) EXTRA=$2; shift 2 ;;
    --kill-node) KILL_NODE=$2; shift 2 ;;
    --kill-after-round) KILL_AFTER=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$OUT" ]] || { echo "--out RUN_DIR is required" >&2; exit 2; }
if [[ -d "$OUT" && -n "$(ls -A "$OUT")" ]]; then echo "$OUT is not empty" >&2; exit 2; fi
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
OWN_WORK=0
if [[ -z "$WORK" ]]; then WORK=$(mktemp -d /tmp/stochvit-loopback.XXXXXX); OWN_WORK=1; fi
mkdir -p "$WORK"
APP=$(cd "$(dirname "$0")/.." && pwd)/stochvit/federated/app

export FLWR_HOME=$WORK/flwr-home FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 \
       FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$FLWR_HOME"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
json_field() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)" 2>/dev/null || true; }

PIDS=()  # every process we start leads its own process group (setsid), so a group kill also ends its children
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.2
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # children that left our process groups (ServerApp/ClientApp runtimes) still carry our FLWR_HOME: stop them by PID
  env -u FLWR_HOME python3 - "$FLWR_HOME" "$$" <<'PY'
import os, signal, sys, time
entry, skip = b"\0FLWR_HOME=" + sys.argv[1].encode() + b"\0", {int(sys.argv[2]), os.getpid()}
def ours():
    found = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(d) not in skip and entry in b"\0" + open(f"/proc/{d}/environ", "rb").read() + b"\0":
                found.append(int(d))
        except OSError:
            pass
    return found
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in ours():
        print(f"stopping leftover PID {pid}")
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    for _ in range(50):
        if not ours():
            break
        time.sleep(0.1)
PY
  [[ $OWN_WORK == 1 ]] && rm -rf "$WORK"
  echo "stopped PIDs ${PIDS[*]}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

LINK_PORT=$(free_port)
setsid flower-superlink --insecure --host 127.0.0.1 --port "$LINK_PORT" --disable-runtime-dependency-installation \
  > "$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
echo "SuperLink PID $! on 127.0.0.1:$LINK_PORT"
for _ in $(seq 600); do (echo > "/dev/tcp/127.0.0.1/$LINK_PORT") 2>/dev/null && break; sleep 0.2; done

NODE_PIDS=()
for ((i = 0; i < NODES; i++)); do
  setsid flower-supernode --insecure --superlink "127.0.0.1:$LINK_PORT" --host 127.0.0.1 --port "$(free_port)" \
    --node-config "partition-id=$i num-partitions=$NODES" > "$LOGS/supernode-$i.log" 2>&1 &
  PIDS+=($!)
  NODE_PIDS+=($!)
  echo "SuperNode $i PID $!"
done

cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$LINK_PORT"
insecure = true
EOF

RUN_CONFIG="out-dir=\"$OUT\" clients=$NODES min-clients=$MIN rounds=$ROUNDS $EXTRA"
flwr run "$APP" loopback --run-config "$RUN_CONFIG" --format json > "$LOGS/flwr-run.log" 2>&1 || true
RUN_ID=$(json_field 'd["run-id"]' < "$LOGS/flwr-run.log")
[[ -n "$RUN_ID" ]] || { echo "flwr run failed:" >&2; cat "$LOGS/flwr-run.log" >&2; exit 1; }
echo "run $RUN_ID submitted ($RUN_CONFIG)"

status() { flwr ls loopback --run-id "$RUN_ID" --format json 2>/dev/null | json_field 'd["runs"][0]["status"]'; }
START=$SECONDS LAST=0 STATUS="" KILLED=0 SEEN=0
while (( SECONDS - START < TIMEOUT )); do
  ROUNDS_DONE=0
  [[ -f "$OUT/metrics.jsonl" ]] && ROUNDS_DONE=$(wc -l < "$OUT/metrics.jsonl")
  if (( ROUNDS_DONE > SEEN )); then echo "round $ROUNDS_DONE/$ROUNDS done ($((SECONDS - START)) s)"; SEEN=$ROUNDS_DONE; fi
  if [[ -n "$KILL_NODE" && $KILLED == 0 ]] && (( ROUNDS_DONE >= KILL_AFTER )); then
    VICTIM=${NODE_PIDS[$KILL_NODE]}
    if (( KILL_AFTER > 0 )) || pgrep -P "$VICTIM" > /dev/null; then  # R=0: wait until its ClientApp process runs
      kill -KILL -- "-$VICTIM"
      KILLED=1
      echo "SIGKILL SuperNode $KILL_NODE (PID $VICTIM) after round $ROUNDS_DONE ($((SECONDS - START)) s into the run)"
    fi
  fi
  if [[ -f "$OUT/summary.json" ]] || (( SECONDS - LAST >= 15 )); then
    LAST=$SECONDS
    STATUS=$(status)
    [[ "$STATUS" == finished* ]] && break
  fi
  sleep 1
done
flwr log "$RUN_ID" loopback --show > "$LOGS/serverapp.log" 2>&1 || true
echo "run $RUN_ID: ${STATUS:-timed out after $TIMEOUT s}"
if [[ "$STATUS" == "finished:completed" && -f "$OUT/summary.json" ]]; then
  python3 -c "import json, sys; f = json.load(open(sys.argv[1]))['federated']; print('rounds with fewer clients:', f['rounds_with_fewer_clients'] or 'none', '| clients per round:', f['clients_per_round'])" "$OUT/summary.json"
  exit 0
fi
exit 1
