#!/usr/bin/env bash
# Sets up a local CUDA 13 toolkit (13.0 by default) for `cargo build --features cuda`, without a system CUDA
# install, root, or a GPU: NVIDIA's PyPI wheels (nvcc, the runtime headers and libraries, CCCL,
# NVVM, NVRTC, cuBLAS, cuRAND) go into <repo>/.cuda/pip, and <repo>/.cuda/root is assembled from
# them as the CUDA root the build scripts expect (bin/nvcc, include/, lib64/, nvvm/).
#
#   eval "$(scripts/cuda-env.sh)"              # install if needed, then export the variables
#   scripts/cuda-env.sh --build-only           # skip cuBLAS/cuRAND (~0.8 GB; only needed to run)
#   scripts/cuda-env.sh --cuda 13.4            # CUDA 13.4 instead of 13.0 (needs a newer driver)
#
# stdout carries only `export` lines (for eval); progress goes to stderr. Re-running is fast: the
# wheels are installed again only when the pinned set below changes (or --force is given).
# CUDA_COMPUTE_CAP (the GPU architecture the kernels are compiled for) defaults to 90 (H100/H200);
# set it before running to override (e.g. 80 for A100, 89 for L4/RTX 40xx).
#
# At run time the binary needs an NVIDIA driver (libcuda.so.1) supporting the CUDA release built
# with (13.0: R580 or newer) and finds libcudart/libcublas/libcurand through the LD_LIBRARY_PATH
# printed here (or a system CUDA 13 install).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/.cuda"
pip_dir="$dest/pip"
root="$dest/root"

build_only=0
force=0
release="${DERM_CUDA_RELEASE:-13.0}"
while [ $# -gt 0 ]; do
    arg="$1"
    shift
    case "$arg" in
        --build-only) build_only=1 ;;
        --cuda) release="${1:?--cuda needs a version}"; shift ;;
        --cuda=*) release="${arg#--cuda=}" ;;
        --force) force=1 ;;
        -h | --help)
            sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "cuda-env.sh: unknown argument $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

# One CUDA release: the wheel versions NVIDIA published together. 13.0 (update 1, 2025-09) is
# the default: its PTX is JIT-compiled by any driver from R580 on, while PTX from a newer nvcc
# needs a driver at least as new as that nvcc. --cuda 13.4 (2026-09) is the newest release
# cudarc 0.19.10 knows.
case "$release" in
    13.0)
        build_pkgs=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
            nvidia-cuda-runtime==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88)
        run_pkgs=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)
        ;;
    13.4)
        build_pkgs=(nvidia-cuda-nvcc==13.4.92 nvidia-cuda-crt==13.4.92 nvidia-nvvm==13.4.92
            nvidia-cuda-runtime==13.4.92 nvidia-cuda-cccl==13.3.4.3.1 nvidia-cuda-nvrtc==13.4.92)
        run_pkgs=(nvidia-cublas==13.8.0.4 nvidia-curand==10.4.4.72)
        ;;
    *)
        echo "cuda-env.sh: --cuda must be 13.0 or 13.4, not $release" >&2
        exit 2
        ;;
esac
pkgs=("${build_pkgs[@]}")
[ "$build_only" = 1 ] || pkgs+=("${run_pkgs[@]}")

stamp="$pip_dir/.derm-installed"
want="${pkgs[*]}"
have=""
[ -f "$stamp" ] && have="$(cat "$stamp")"
# A full install also satisfies --build-only.
if [ "$force" = 1 ] || { [ "$have" != "$want" ] && { [ "$build_only" = 0 ] || [ "$have" != "${build_pkgs[*]} ${run_pkgs[*]}" ]; }; }; then
    py="${PYTHON:-python3}"
    command -v "$py" >/dev/null || { echo "cuda-env.sh: $py not found (needed for pip)" >&2; exit 1; }
    "$py" -m pip --version >/dev/null 2>&1 || { echo "cuda-env.sh: '$py -m pip' does not work; install pip" >&2; exit 1; }
    echo "cuda-env.sh: installing ${pkgs[*]} into $pip_dir" >&2
    rm -rf "$pip_dir"
    mkdir -p "$pip_dir"
    PIP_ROOT_USER_ACTION=ignore "$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
        --target "$pip_dir" "${pkgs[@]}" >&2
    echo "$want" >"$stamp"
fi

cu="$pip_dir/nvidia/cu13"
[ -x "$cu/bin/nvcc" ] || { echo "cuda-env.sh: $cu/bin/nvcc missing after install (try --force)" >&2; exit 1; }

# The CUDA root: directories linked from the wheels; lib64 holds links to each library plus the
# unversioned names the linker looks for (candle-kernels links -lcudart).
rm -rf "$root"
mkdir -p "$root/lib64"
for d in bin include nvvm; do ln -s "$cu/$d" "$root/$d"; done
ln -s lib64 "$root/lib"
for f in "$cu"/lib/*; do
    name="$(basename "$f")"
    ln -s "$f" "$root/lib64/$name"
    case "$name" in
        *.so.*) base="${name%%.so.*}.so"; [ -e "$root/lib64/$base" ] || ln -s "$f" "$root/lib64/$base" ;;
    esac
done
version="$("$root/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
read -r major minor <<<"$version"
echo "cuda-env.sh: CUDA $major.$minor toolkit at $root" >&2

cat <<EOF
export CUDA_ROOT="$root"
export CUDA_PATH="$root"
export CUDA_HOME="$root"
export CUDA_TOOLKIT_ROOT_DIR="$root"
export NVCC="$root/bin/nvcc"
export PATH="$root/bin:\${PATH}"
export LD_LIBRARY_PATH="$root/lib64\${LD_LIBRARY_PATH:+:\${LD_LIBRARY_PATH}}"
export LIBRARY_PATH="$root/lib64\${LIBRARY_PATH:+:\${LIBRARY_PATH}}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION="${major}0${minor}0"
EOF
