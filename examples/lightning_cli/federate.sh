#!/usr/bin/env bash
# A federation on one machine: `fedharmony serve` and three LightningCLI clients (train.py + client.yaml) over a
# temporary folder. Run from anywhere; uses `python` and `fedharmony` found on PATH. Extra arguments go to the server
# as dotted overrides, e.g. `federate.sh federation.num_rounds=3`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(mktemp -d "${TMPDIR:-/tmp}/fedharmony.XXXXXX")"
out="${FEDHARMONY_OUT:-fedharmony_runs/federate}"
pids=()

cleanup() {
  local code=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  sleep 1
  for pid in "${pids[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$root"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "shared folder: $root"
fedharmony serve --config "$here/server.yaml" --method fedharmony --root "$root" --quiet out_dir="$out" "$@" &
server=$!
pids+=("$server")

for client in 0 1 2; do
  python "$here/train.py" fit --config "$here/client.yaml" \
    --data.init_args.client "$client" \
    --trainer.callbacks.init_args.root "$root" \
    --trainer.callbacks.init_args.client_id "$client" \
    --trainer.default_root_dir "$root/client_$client" \
    >"$root/client_$client.log" 2>&1 &
  pids+=("$!")
done

status=0
wait "$server" || status=$?
if [ "$status" -ne 0 ]; then
  echo "the server failed (exit $status); client logs:" >&2
  tail -n 20 "$root"/client_*.log >&2 || true
  exit "$status"
fi
# the server sent every client its stop message: they end their fit on their own
for pid in "${pids[@]:1}"; do
  wait "$pid" || { echo "a client exited with an error:" >&2; tail -n 20 "$root"/client_*.log >&2; status=1; }
done
exit "$status"
