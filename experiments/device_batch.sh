#!/usr/bin/env bash
# Run several benchmark commands in one call on a leased GPU machine, inside a time budget.
#
#   bash experiments/device_batch.sh 560 \
#       "python3 -m experiments.conformance_fla --out=\$OUT/conformance_fla.json" \
#       "python3 -m experiments.bench_kernels --stages --out=\$OUT/bench_kernels.json"
#
# Why: a call ends at its time limit and returns only what is under $OUT, and a fresh
# machine pays minutes of Triton autotuning (FLA) and XLA compilation. So: wheels from
# .whl/ go to /tmp/site; the Triton and JAX caches live in .cache/ (git-ignored) and travel
# between calls as .cache/cache.tgz.* (carry ".cache", copy the returned parts back into
# .cache/); each command gets the time left minus a reserve for packing the caches; every
# command's output goes to $OUT/batch.log with its exit status and elapsed time.
set -u
budget=${1:?usage: device_batch.sh SECONDS "command" ["command" ...]}
shift
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
out=${OUT:-/tmp/out}
mkdir -p "$out" .cache
log="$out/batch.log"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PWD}${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G ".cache/cache.tgz.*" >/dev/null; then
  cat .cache/cache.tgz.* | tar xzf - -C .cache && rm -f .cache/cache.tgz.*
fi
export TRITON_CACHE_DIR="$PWD/.cache/triton" JAX_COMPILATION_CACHE_DIR="$PWD/.cache/jax"
export PYTHONUNBUFFERED=1
# XLA's GEMM/fusion autotuning dominates first compiles of big models on the GPU; its
# results persist per fusion in .cache/xla_autotune when this XLA knows the flag (an
# unknown XLA flag aborts every process, hence the probe). XLA_AUTOTUNE_CACHE=0: off.
autotune="--xla_gpu_per_fusion_autotune_cache_dir=$PWD/.cache/xla_autotune"
if [[ "${XLA_AUTOTUNE_CACHE:-1}" != 0 ]] && XLA_FLAGS="$autotune ${XLA_FLAGS:-}" python3 -c "import jax; jax.devices()" >/dev/null 2>&1; then
  export XLA_FLAGS="$autotune ${XLA_FLAGS:-}"
  echo "== XLA autotune cache on" >>"$log"
fi

reserve=25   # seconds kept for packing the caches
for cmd in "$@"; do
  limit=$(( $(left) - reserve ))
  if (( limit < 10 )); then
    echo "== skipped (no time left): $cmd" | tee -a "$log"
    continue
  fi
  echo "== $(date +%H:%M:%S) start (limit ${limit}s): $cmd" | tee -a "$log"
  timeout -k 5 "$limit" bash -c "$cmd" >>"$log" 2>&1
  echo "== exit $? after $(( $(date +%s) - start ))s: $cmd" | tee -a "$log"
done

# Carried paths are capped at 64 MiB a call (.whl takes 6): past ~40 MB compressed, keep
# the JAX/XLA caches and FLA's autotune verdicts (*.autotune.json: FLA then compiles only the
# chosen configs, not every candidate) and drop the compiled Triton kernels.
tar czf /tmp/cache_full.tgz -C .cache --exclude='cache.tgz.*' .
if (( $(stat -c %s /tmp/cache_full.tgz) > 40000000 )); then
  (cd .cache && find . -path ./triton -prune -o -type f ! -name 'cache.tgz.*' -print
   find ./triton -name '*.autotune.json' 2>/dev/null) > /tmp/cache_keep.txt
  tar czf /tmp/cache_full.tgz -C .cache -T /tmp/cache_keep.txt
  echo "== cache over 40 MB: kept JAX/XLA caches and FLA autotune verdicts only" >>"$log"
fi
if (( $(stat -c %s /tmp/cache_full.tgz) > 40000000 )); then
  (cd .cache && find ./triton -name '*.autotune.json' 2>/dev/null) > /tmp/cache_keep.txt
  tar czf /tmp/cache_full.tgz -C .cache -T /tmp/cache_keep.txt
  echo "== still over 40 MB: dropped the JAX/XLA caches too" >>"$log"
fi
split -b 15M /tmp/cache_full.tgz "$out/cache.tgz."
grep -v -i -e "warning" -e "libtpu" "$log" | tail -n 60
