#!/usr/bin/env bash
# fl_patch's FlagCX default on two GPUs, three ways: the NCCL-backed stand-in (tests/gpu/flagcx_nccl_standin),
# FL_PATCH_DIST=native, and, given a FlagCX checkout, real FlagCX built here against torch's NCCL wheel.
#
#   bash tests/gpu/distributed_gpu.sh OUT_DIR [FLAGCX_SOURCE_DIR]
#
# Each run is tests/gpu/distributed_gpu.py under torchrun (2 processes) with the bootstrap on PYTHONPATH; it
# writes OUT_DIR/distributed-{standin,native,flagcx}.json. The FlagCX source needs third-party/json (nlohmann's
# single header) in place; nothing is downloaded. Build: FlagCX's own `pip install . --no-build-isolation`.
set -u
out=$(realpath "$1"); source_dir=${2:-}
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
base=$PWD:$PWD/sitecustomize${PYTHONPATH:+:$PYTHONPATH}

run() {  # name, PYTHONPATH prefix, port, env assignments...
  local name=$1 prefix=$2 port=$3
  shift 3
  env "$@" PYTHONPATH="$prefix$base" timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 \
    --master-addr 127.0.0.1 --master-port "$port" tests/gpu/distributed_gpu.py --out "$out/$name.json" \
    > "$out/$name.log" 2>&1
  echo "$name: exit $?"
}

run distributed-standin "$PWD/tests/gpu/flagcx_nccl_standin:" 29511
run distributed-native "$PWD/tests/gpu/flagcx_nccl_standin:" 29512 FL_PATCH_DIST=native
[ -n "$source_dir" ] || exit 0

nccl=$(python3 -c "import importlib.util as u; print(list(u.find_spec('nvidia.nccl').submodule_search_locations)[0])")
mkdir -p /tmp/nccl/lib && ln -sfn "$nccl/include" /tmp/nccl/include
ln -sf "$(ls "$nccl"/lib/libnccl.so.* | head -1)" /tmp/nccl/lib/libnccl.so
rm -rf /tmp/flagcx-src && cp -r "$source_dir" /tmp/flagcx-src
(cd /tmp/flagcx-src && CCL_HOME=/tmp/nccl USE_NVIDIA=1 timeout 400 python3 -m pip install -v --no-build-isolation \
  --no-deps --no-index --target /tmp/flagcx . > "$out/flagcx-build.log" 2>&1)
echo "flagcx build: exit $?"
run distributed-flagcx /tmp/flagcx: 29513 LD_LIBRARY_PATH="$nccl/lib"
