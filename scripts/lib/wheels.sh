# shellcheck shell=bash
# Sourced by scripts/setup and scripts/setup-train: one sha256-pinned wheel download.
# Needs $dl (download folder) and $PY (python3) set by the caller.

# Wheels are fetched for CPython 3.11 on x86-64 Linux whatever the host's pip would pick, and
# every manylinux tag these wheels use is listed: pip's --platform accepts only the tags given
# (manylinux_2_28 alone refuses the manylinux2014 nvidia-cuda-runtime wheel).
WHEEL_PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_25_x86_64
  manylinux_2_17_x86_64 manylinux2014_x86_64 linux_x86_64)

# fetch_wheel NAME==VER SHA256: download one wheel (no deps) into $dl, check its hash, print its path.
fetch_wheel() {
  local spec=$1 sha=$2 name=${1%%==*} ver=${1##*==}
  local pat="${name//-/_}-${ver}-"
  local whl
  whl=$(ls "$dl"/"$pat"*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    echo "setup: downloading $spec from PyPI" >&2
    local platform_args=()
    local p
    for p in "${WHEEL_PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      "${platform_args[@]}" -d "$dl" "$spec" >&2; then
      echo "setup: pip could not download $spec (is PyPI reachable?)" >&2
      exit 1
    fi
    whl=$(ls "$dl"/"$pat"*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$whl" ]; then
      echo "setup: pip reported success but no $pat*.whl is in $dl" >&2
      exit 1
    fi
  fi
  local got
  got=$(sha256sum "$whl" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    echo "setup: sha256 mismatch for $whl: got $got, want $sha" >&2
    rm -f "$whl"
    exit 1
  fi
  echo "$whl"
}
