#!/usr/bin/env bash
# What a chip nobody measured gets: bench_e2e in fresh processes with no profile anywhere (the shipped ones moved
# aside, an empty user cache), so fl_patch starts from the prior and calibrates on the benchmark's own calls.
#
#   bash benchmarks/untuned_device.sh OUT_DIR [first|second|trace|trace_slow|tuned|fast_vs_public]   (GPU; default: first and second)
#
# first:  a fresh process on an empty cache: it calibrates while it runs (its JSON says how many calls each key
#         took, under "calibration").
# second: a fresh process on the cache the first one left: it starts calibrated.
# trace:  benchmarks/decode_trace.py on a fresh cache (decode b1: each step's time from the first, and where the
#         host time goes), then at decode b16 in a process that starts from what the first one learned.
# trace_slow: decode b1 first processes, each on its own fresh cache: the 20 steps after the first profiled; with
#         gc.freeze() after the first step; and HF alone after FlagGems' first call (no fl_patch).
# tuned:  `fl-patch tune` into OUT_DIR/tuned.json (unless it is there), then a process with both fl_patch (calibrated) and
#         fl_patch_tuned (routed by that profile) in the same run.
# fast_vs_public: that profile (TUNED_PROFILE, or `fl-patch tune` into OUT_DIR/tuned.json) with the fast launch path
#         (fl_patch_tuned) and without it (fl_patch_tuned_public), and fl_patch_public calibrating without it.
# The user cache is OUT_DIR/cache (XDG_CACHE_HOME), so a later call can carry it back. BENCH_SECONDS (default
# 1.0): seconds each shape is timed per round; BENCH_ROUNDS (default 2); BENCH_MODELS (default llama,qwen3).
set -euo pipefail
out=${1:?usage: untuned_device.sh OUT_DIR [first|second|trace|trace_slow|tuned|fast_vs_public]}
steps=${2:-first,second}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out/cache"
export XDG_CACHE_HOME="$out/cache" PYTHONUNBUFFERED=1
aside="$here/fl_patch/profiles.aside"
if compgen -G "$here/fl_patch/profiles/*.json" > /dev/null; then
  mkdir -p "$aside" && mv "$here"/fl_patch/profiles/*.json "$aside"/
fi
trap 'mv "$aside"/*.json "$here/fl_patch/profiles/" 2>/dev/null; rmdir "$aside" 2>/dev/null || true' EXIT
bench=(python "$here/benchmarks/bench_e2e.py" --models "${BENCH_MODELS:-llama,qwen3}" --parts prefill,decode --rounds "${BENCH_ROUNDS:-2}" --seconds "${BENCH_SECONDS:-1.0}" --out "$out")
for step in ${steps//,/ }; do
  echo "== $step $(date -u +%H:%M:%S)"
  case $step in
    first) "${bench[@]}" --variants hf_sdpa,fl_patch,fl_patch_public,liger --name untuned_first ;;
    second) "${bench[@]}" --variants hf_sdpa,fl_patch --name untuned_second ;;
    trace)
      python "$here/benchmarks/decode_trace.py" --out "$out" --name decode_trace_b1
      python "$here/benchmarks/decode_trace.py" --out "$out" --name decode_trace_b16_second --batch 16 ;;
    trace_slow)  # the first process's slow phase: profiled; with gc.freeze(); HF alone after FlagGems' first call
      for run in "early --early-profile" "gc_freeze --gc-freeze" "control --control"; do
        XDG_CACHE_HOME="$out/cache_${run%% *}" python "$here/benchmarks/decode_trace.py" --out "$out" \
          --name "decode_trace_b1_${run%% *}" ${run#* }
      done ;;
    tuned)  # OUT_DIR/tuned.json when there (a tune made earlier in the call), else `fl-patch tune` makes it here
      [ -f "$out/tuned.json" ] || python -m fl_patch tune --out "$out/tuned.json" 2>&1 | tail -n 25
      "${bench[@]}" --variants hf_sdpa,fl_patch,fl_patch_tuned,liger --tuned-profile "$out/tuned.json" --name untuned_tuned ;;
    fast_vs_public)  # a tune profile measured on the fast path, run with and without it, beside the calibrating
      # fl_patch without it (issue 25's e2e); TUNED_PROFILE: that profile, else `fl-patch tune` makes it here
      profile=${TUNED_PROFILE:-$out/tuned.json}
      [ -f "$profile" ] || python -m fl_patch tune --out "$profile" 2>&1 | tail -n 25
      "${bench[@]}" --variants hf_sdpa,fl_patch_tuned,fl_patch_tuned_public,fl_patch_public --tuned-profile "$profile" \
        --name untuned_fast_vs_public ;;
    *) echo "unknown step $step; accepted: first, second, trace, trace_slow, tuned, fast_vs_public" >&2; exit 2 ;;
  esac
done
