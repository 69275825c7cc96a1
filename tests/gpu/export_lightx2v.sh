#!/usr/bin/env bash
# Exports into ./.lightx2v/ of the current checkout the LightX2V files tests/gpu/lightx2v_quant_gpu.py imports
# (about 3.5 MB: the op modules, utils, the platform package, base_model, the Wan model and its scheduler), at the
# commit the stand-in matches, and writes that commit to .lightx2v/COMMIT. Never committed: /.lightx2v/ goes to
# the repository's info/exclude. Carry it to the device with the wheels: carry [".whl", ".lightx2v"].
#   bash tests/gpu/export_lightx2v.sh <a LightX2V clone, bare or not> [commit]
set -eu
src=$1
commit=${2:-f8aee98b5462cca8d7288888146ebd95592bf266}
top=$(git rev-parse --show-toplevel)
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.lightx2v/' "$exclude" 2>/dev/null || echo '/.lightx2v/' >> "$exclude"
rm -rf "$top/.lightx2v"
mkdir -p "$top/.lightx2v"
git -C "$src" archive "$commit" \
  lightx2v/__init__.py lightx2v/common lightx2v/utils lightx2v_platform \
  lightx2v/models/__init__.py lightx2v/models/networks/__init__.py lightx2v/models/networks/base_model.py \
  lightx2v/models/networks/wan lightx2v/models/schedulers/__init__.py lightx2v/models/schedulers/scheduler.py \
  lightx2v/models/schedulers/wan/scheduler.py | tar -x -C "$top/.lightx2v"
git -C "$src" rev-parse "$commit^{commit}" > "$top/.lightx2v/COMMIT"
du -sh "$top/.lightx2v"
