#!/usr/bin/env bash
# Single-node recipe: start a Ray head on 127.0.0.1, submit ONE mer job to it through the Jobs API (exactly
# what happens on a cluster: `ray job submit` with this checkout as the working_dir), then stop Ray.
# Run it from anywhere; it works in the repository root. docs/cluster.md explains each step.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: cluster/local.sh [--num-cpus N] [--num-gpus N] [--overlay FILE] [--keep] JOB [JOB ARGS...]

  JOB        one of jobs/*.py: extract enrich train relabel pseudolabel score evaluate demo
  JOB ARGS   the job's flags (the `mer JOB` flags, plus --overlay/--set/--cpu/--profile), after the
             `--config ray_config.yaml` this script always passes

options:
  --num-cpus N     CPUs Ray may use (default: all cores of this machine)
  --num-gpus N     GPUs Ray may use (default: what Ray detects)
  --overlay FILE   a config overlay layered over ray_config.yaml (e.g. a copy of
                   cluster/ray_config.gpu.yaml scaled to this machine)
  --keep           leave Ray running afterwards (default: `ray stop` when the job ends)
  -h, --help       this text

Steps: ray start --head --num-cpus N --dashboard-host 127.0.0.1 ...; wait for the Jobs API on
http://127.0.0.1:8265; ray job submit --address http://127.0.0.1:8265 --working-dir . --
python -m jobs.JOB --config ray_config.yaml [--overlay FILE] JOB ARGS...; ray stop.
The exit status is the job's (0 = SUCCEEDED). The job runs in an uploaded copy of this checkout: give
local paths (outputs, storage.tiny_models_dir) as absolute paths ("$PWD/runs/...") or use s3:// URIs;
--overlay FILE is relative to the repository root. S3: export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(and AWS_ENDPOINT_URL for an S3-compatible store) before running this script: Ray and the job inherit
them from this shell; the job log shows only whether they are set. `ray stop` stops every Ray instance
of this user on this machine, so the script refuses to start when one is already running.
Ports: RAY_PORT (default 6379), RAY_DASHBOARD_PORT (default 8265).

examples:
  cluster/local.sh --num-cpus 8 demo --workdir "$PWD/runs/local-demo"
  cluster/local.sh extract --cpu --profile tiny --set storage.tiny_models_dir="$PWD/.cache/mer/tiny-models" \
      --manifest s3://mer-data/mer2025/manifest.parquet --out s3://mer-data/mer2025/features
  cluster/local.sh --num-gpus 1 train --features s3://mer-data/mer2025/features --out "$PWD/runs/ecmf" \
      --set train.use_gpu=true --set train.num_workers=1
EOF
}

num_cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
num_gpus=""
overlay=""
keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --num-cpus) num_cpus=${2:?--num-cpus needs a value}; shift 2 ;;
    --num-gpus) num_gpus=${2:?--num-gpus needs a value}; shift 2 ;;
    --overlay) overlay=${2:?--overlay needs a file}; shift 2 ;;
    --keep) keep=1; shift ;;
    --) shift; break ;;
    -*) echo "local.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
job=$1
shift

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! "$job" =~ ^[a-z][a-z_]*$ || ! -f "jobs/$job.py" ]]; then
  echo "local.sh: unknown job '$job' (jobs/*.py: $(cd jobs && ls [a-z]*.py | sed 's/\.py$//' | tr '\n' ' '))" >&2
  exit 2
fi
if [[ ! "$num_cpus" =~ ^[0-9]+$ || ( -n "$num_gpus" && ! "$num_gpus" =~ ^[0-9]+$ ) ]]; then
  echo "local.sh: --num-cpus / --num-gpus take whole numbers" >&2
  exit 2
fi
if [[ -n "$overlay" && ! -f "$overlay" ]]; then
  echo "local.sh: overlay $overlay not found" >&2
  exit 2
fi

# Use the project's venv when no `ray` is on PATH: Ray's workers and the job's `python` then come from it.
if ! command -v ray >/dev/null 2>&1; then
  if [[ -x .venv/bin/ray ]]; then
    export PATH="$PWD/.venv/bin:$PATH"
  else
    echo "local.sh: no 'ray' on PATH and no .venv (run: make venv)" >&2
    exit 2
  fi
fi

port=${RAY_PORT:-6379}
dashboard_port=${RAY_DASHBOARD_PORT:-8265}
address="http://127.0.0.1:$dashboard_port"
if ray status --address "127.0.0.1:$port" >/dev/null 2>&1; then
  echo "local.sh: a Ray cluster already runs at 127.0.0.1:$port; submit to it with" \
       "'ray job submit --address $address ...' or stop it first" >&2
  exit 1
fi

start=(ray start --head --port "$port" --num-cpus "$num_cpus" --node-ip-address 127.0.0.1
       --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --disable-usage-stats)
if [[ -n "$num_gpus" ]]; then
  start+=(--num-gpus "$num_gpus")
fi
"${start[@]}"
if [[ $keep -eq 0 ]]; then
  trap 'ray stop || true' EXIT
fi

# The head answers before its job agent does: wait until the Jobs API lists jobs (up to 2 minutes).
for _ in $(seq 1 60); do
  if ray job list --address "$address" >/dev/null 2>&1; then
    break
  fi
  sleep 2
done

entrypoint=(python -m "jobs.$job" --config ray_config.yaml)
if [[ -n "$overlay" ]]; then
  entrypoint+=(--overlay "$overlay")
fi
rc=0
ray job submit --address "$address" --working-dir . \
  --runtime-env-json '{"excludes": [".git", ".venv", ".cache", "runs"]}' \
  -- "${entrypoint[@]}" "$@" || rc=$?
exit "$rc"
