#!/usr/bin/env bash
# Runs N processes of COMMAND on this machine as one multi-process jax job (how a pod or cluster runs it).
#
#   scripts/launch_local.sh N COMMAND [ARGS...]
#   scripts/launch_local.sh 2 python train.py --config=configs/default.py --workdir=runs/mh
#
# Each process gets JAX_COORDINATOR_ADDRESS (localhost and a free port), JAX_NUM_PROCESSES=N and its own
# JAX_PROCESS_ID, and DEVICES_PER_PROCESS fake CPU devices (default 2; JAX_PLATFORMS defaults to cpu).
# Process i logs to LOG_DIR/process_i.log (default: a new directory under ${TMPDIR:-/tmp}, printed at the
# start); process 0's output is also shown here. When one process fails, the others are stopped and the
# script exits with the failing status and the tail of its log.
set -uo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N COMMAND [ARGS...]   (N >= 1 processes; env: DEVICES_PER_PROCESS, LOG_DIR, PYTHON)" >&2
  exit 2
fi
num=$1
shift
devices=${DEVICES_PER_PROCESS:-2}
if [[ ! "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: DEVICES_PER_PROCESS=$devices must be a positive integer." >&2
  exit 2
fi
log_dir=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/launch_local.XXXXXX")}
mkdir -p "$log_dir"
port=$("${PYTHON:-python3}" -c \
  'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
# Replace any device count already in XLA_FLAGS with this one.
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")"
xla_flags="$xla_flags --xla_force_host_platform_device_count=$devices"
echo "launch_local: $num processes x $devices devices, coordinator localhost:$port, logs in $log_dir" >&2

pids=()
stop_all() {
  # Each process leads its own process group (setsid): stop it with anything it started.
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  sleep 2
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
  wait 2>/dev/null
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  log="$log_dir/process_$i.log"
  if [[ $i -eq 0 ]]; then
    exec {out}>&1
  else
    exec {out}>/dev/null
  fi
  JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES=$num JAX_PROCESS_ID=$i \
    JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} XLA_FLAGS="$xla_flags" \
    setsid "$@" > >(tee "$log" >&$out) 2>&1 &
  pids+=($!)
  exec {out}>&-
done

declare -A running  # pid -> process id
for i in "${!pids[@]}"; do running[${pids[$i]}]=$i; done
while [[ ${#running[@]} -gt 0 ]]; do
  wait -n -p finished "${!running[@]}"
  rc=$?
  failed=${running[$finished]:-}
  unset "running[$finished]"
  if [[ $rc -ne 0 ]]; then
    echo "launch_local: process ${failed:-?} exited with status $rc; stopping the others. Its log" \
         "($log_dir/process_${failed:-?}.log) ends:" >&2
    sleep 0.2  # let tee flush
    tail -n 20 "$log_dir/process_${failed:-0}.log" >&2
    stop_all
    exit "$rc"
  fi
done
wait  # the tee processes
echo "launch_local: all $num processes finished; logs in $log_dir" >&2
