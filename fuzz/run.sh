#!/usr/bin/env bash
# Fuzz campaigns of the targets in fuzz/fuzz_targets (cargo fuzz, nightly toolchain).
#
#   fuzz/run.sh [ci]          build, then a short run of every target (CI: FUZZ_SECONDS each,
#                             default 30), starting from the committed corpora; new inputs go
#                             to a scratch directory, so the tree stays clean
#   fuzz/run.sh long [N]      N executions (default 10,000,000) of every target, or
#                             FUZZ_SECONDS each if set, growing fuzz/work/<target>
#   fuzz/run.sh cmin          minimize fuzz/work/<target> plus the committed corpus back into
#                             fuzz/corpus/<target>
#   fuzz/run.sh seed          write the hand-made seeds (fuzz/seeds/make.py) into the corpora
#
# FUZZ_TARGETS="a b" narrows any mode to those targets; FUZZ_JOBS (default 1) runs that many
# targets at once. Every run is bounded: -rss_limit_mb (whole process) and any single
# allocation above 64 MiB (the targets' global allocator, fuzz/src/lib.rs; -malloc_limit_mb too
# when a sanitizer gives libFuzzer its hooks), so a parser that allocates in proportion to a
# length it read, not to the bytes it got, is a crash. A crash leaves its input in
# fuzz/artifacts/<target>/ and fails the script. FUZZ_SANITIZER (default none: our code holds
# no unsafe, and the address sanitizer costs two to three times the executions) picks
# cargo fuzz's sanitizer, e.g. address.
set -euo pipefail
cd "$(dirname "$0")"

mode=${1:-ci}
targets=${FUZZ_TARGETS:-"mqtt_frames topic_acl csv_import release_manifest certificate"}
jobs=${FUZZ_JOBS:-1}
# Well above what any target needs for inputs of -max_len bytes (tens of MiB), well below the
# machine's memory, and the same in CI and in long runs.
limits=(-rss_limit_mb=1024 -malloc_limit_mb=64 -max_len=8192 -timeout=10)
toolchain=+nightly
sanitizer=(--sanitizer "${FUZZ_SANITIZER:-none}")
# Extra `cargo fuzz build` flags, e.g. `--codegen-units 16` for a quicker build of slower code.
build_flags=${FUZZ_BUILD_FLAGS:-}

log() { printf '\n== %s\n' "$*"; }

build() {
  log "building the fuzz targets (cargo fuzz, nightly, sanitizer ${FUZZ_SANITIZER:-none})"
  local start=$SECONDS
  CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo $toolchain fuzz build "${sanitizer[@]}" $build_flags
  echo "built in $((SECONDS - start)) s"
}

# The libFuzzer summary line of a log: executions, coverage, features, corpus.
stats() {
  local log=$1
  local done_line
  # -a: a log holds raw bytes where libFuzzer prints an input.
  done_line=$(grep -aE '^Done [0-9]+ runs' "$log" | tail -n 1 || true)
  local last
  last=$(grep -aE '#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$log" | tail -n 1 || true)
  printf '%s | %s\n' "${done_line:-no Done line}" "$(sed -E 's/^#[0-9]+[[:space:]]+[A-Z]+[[:space:]]+//' <<<"$last")"
}

run_one() {
  local target=$1 how=$2 corpus_dirs=("${@:3}")
  # One log per mode, so that a CI run never overwrites a long campaign's log.
  local log="logs/$target.$mode.log"
  mkdir -p logs
  local start=$SECONDS
  if cargo $toolchain fuzz run "${sanitizer[@]}" $build_flags "$target" "${corpus_dirs[@]}" -- \
      "${limits[@]}" $how -print_final_stats=1 >"$log" 2>&1; then
    printf '%-18s %4d s  %s\n' "$target" $((SECONDS - start)) "$(stats "$log")"
  else
    printf '%-18s FAILED after %d s; log: fuzz/%s\n' "$target" $((SECONDS - start)) "$log"
    grep -aE 'panicked|ERROR: libFuzzer|SUMMARY|artifact_prefix|Test unit written' "$log" | head -n 20
    return 1
  fi
}

# Runs `run_one` for every target, FUZZ_JOBS at a time; fails if any failed.
each() {
  local failed=0 pids=() names=()
  for t in $targets; do
    "$@" "$t" &
    pids+=($!)
    names+=("$t")
    if [ ${#pids[@]} -ge "$jobs" ]; then
      wait "${pids[0]}" || failed=1
      pids=("${pids[@]:1}")
    fi
  done
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  return $failed
}

ci_one() {
  local t=$1 scratch rc=0
  scratch=$(mktemp -d)
  run_one "$t" "-max_total_time=${FUZZ_SECONDS:-30}" "$scratch" "corpus/$t" || rc=$?
  rm -rf "$scratch"
  return $rc
}

long_one() {
  local t=$1
  mkdir -p "work/$t"
  local how="-runs=$runs"
  [ -n "${FUZZ_SECONDS:-}" ] && how="-max_total_time=$FUZZ_SECONDS"
  run_one "$t" "$how" "work/$t" "corpus/$t"
}

cmin_one() {
  local t=$1 merged
  merged=$(mktemp -d)
  mkdir -p "work/$t"
  cargo $toolchain fuzz run "${sanitizer[@]}" $build_flags "$t" "$merged" "corpus/$t" "work/$t" -- "${limits[@]}" -merge=1 \
    >"logs/$t.cmin.log" 2>&1
  rm -rf "corpus/$t"
  mv "$merged" "corpus/$t"
  chmod 755 "corpus/$t"
  printf '%-18s %4d inputs, %s\n' "$t" "$(ls "corpus/$t" | wc -l)" "$(du -sh "corpus/$t" | cut -f1)"
}

command -v cargo-fuzz >/dev/null 2>&1 || { echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 1; }
mkdir -p logs
case "$mode" in
  ci)
    total=$SECONDS
    cargo fmt -- --check
    build
    log "a short run of every target (${FUZZ_SECONDS:-30} s each)"
    each ci_one
    echo "fuzzing took $((SECONDS - total)) s in all"
    ;;
  long)
    runs=${2:-10000000}
    build
    if [ -n "${FUZZ_SECONDS:-}" ]; then per="$FUZZ_SECONDS s"; else per="$runs executions"; fi
    log "long runs: $per per target"
    each long_one
    ;;
  cmin)
    build
    log "minimizing the corpora"
    each cmin_one
    du -sh corpus
    ;;
  seed)
    python3 seeds/make.py
    ;;
  *)
    echo "usage: fuzz/run.sh [ci|long [runs]|cmin|seed]" >&2
    exit 2
    ;;
esac
