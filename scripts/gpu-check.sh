#!/usr/bin/env bash
# The GPU check of derm, in two halves: `build` on a machine with the Rust toolchain (no GPU
# needed), `run` on a machine with an NVIDIA GPU (no Rust toolchain needed).
#
#   scripts/gpu-check.sh build            # here: derm and xtask built with --features cuda (release)
#                                         # into target/gpu-check/ (gzipped, with libcudart), < 64 MiB
#   scripts/gpu-check.sh run [OUT]        # there, from the repository root with target/gpu-check/
#                                         # copied over: results into OUT (default gpu-check-out/)
#
# `run` does, in order, and stops at the first failure of steps 2-3:
#   1. nvidia-smi (when present) into OUT/nvidia-smi.txt;
#   2. `derm info`: the build's features and the GPU it sees (OUT/derm-info.txt);
#   3. `xtask device-check --device cuda`: every pooling/resize/conv/batch-norm op and one
#      training step's gradients of the U-Net, ResNet-50, the partial-conv U-Net and the DCGAN on
#      the GPU against derm's CPU kernels in f64 (tolerances in xtask/src/gpu.rs: 1e-5 pooling and
#      resizing, 1e-4 other ops, 1e-3 networks, or 10x the CPU's own f32 error), and the host reads
#      of one optimiser step (0 expected) -> OUT/device_check.json;
#   4. `xtask bench --device cuda`: the rows unet_train_step b8 128/256, resnet50_infer b64 224,
#      resnet50_train_step b32 224, pconv_train_step b8 256, dcgan_joint_step b64 64
#      -> OUT/bench_cuda.json;
#   5. PyTorch on the same GPU, the same rows (bench/peer/cuda_bench.py), when python3 has torch
#      with CUDA -> OUT/torch_cuda.json;
#   6. the pipeline on phantoms on the GPU (`xtask pipeline --device cuda --budget tiny`)
#      -> OUT/pipeline/report.html.
# The files and their formats: docs/gpu-check.md.
#
# The binaries need an NVIDIA driver for CUDA 13 (R580 or newer) and, at run time, cuBLAS and
# cuRAND 13 (libcublas.so.13, libcublasLt.so.13, libcurand.so.10): from a system CUDA 13, the
# LD_LIBRARY_PATH already set, or the `nvidia-*` wheels of the python3 found here (torch's cu13
# wheels bring them); `run` looks in all three. libcudart.so.13 travels in the pack.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pack="$repo/target/gpu-check"
cmd="${1:-}"

case "$cmd" in
build)
    eval "$("$repo/scripts/cuda-env.sh" --build-only)"
    export CARGO_TARGET_DIR="$repo/target/cuda"
    start=$(date +%s)
    (cd "$repo" && cargo build --release --locked -p derm-cli -p xtask --features derm-cli/cuda,xtask/cuda)
    echo "gpu-check: built in $(($(date +%s) - start)) s" >&2
    rm -rf "$pack"
    mkdir -p "$pack/bin" "$pack/lib"
    for b in derm xtask; do
        strip -o "$pack/bin/$b" "$CARGO_TARGET_DIR/release/$b" 2>/dev/null || cp "$CARGO_TARGET_DIR/release/$b" "$pack/bin/$b"
        gzip -9 "$pack/bin/$b"
    done
    cp -L "$CUDA_ROOT/lib64/libcudart.so.13" "$pack/lib/"
    du -sh "$pack" >&2
    echo "gpu-check: pack ready in $pack; on the GPU machine run: scripts/gpu-check.sh run [OUT]" >&2
    ;;
run)
    out="$(realpath -m "${2:-$repo/gpu-check-out}")"
    [ -d "$pack/bin" ] || { echo "gpu-check: $pack/bin missing: run 'scripts/gpu-check.sh build' first and copy target/gpu-check over" >&2; exit 1; }
    mkdir -p "$out" "$pack/run"
    for b in derm xtask; do
        gzip -dc "$pack/bin/$b.gz" >"$pack/run/$b"
        chmod +x "$pack/run/$b"
    done
    libs="$pack/lib"
    # cuBLAS/cuRAND from pip wheels of the python3 here (torch's CUDA 13 wheels), if any.
    if command -v python3 >/dev/null; then
        for d in $(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "nvidia", "cu13", "lib")):
        print(d)
PY
        ); do
            libs="$libs:$d"
        done
    fi
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "gpu-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
    (nvidia-smi || true) >"$out/nvidia-smi.txt" 2>&1
    echo "== derm info" >&2
    "$pack/run/derm" --device cuda info | tee "$out/derm-info.txt"
    echo "== device-check" >&2
    "$pack/run/xtask" device-check --device cuda --json "$out/device_check.json" | tee "$out/device_check.md"
    echo "== bench (derm, cuda)" >&2
    status=0
    for g in unet_train resnet50 pconv_train dcgan_train; do
        "$pack/run/xtask" bench --device cuda --only "$g" --repeats 10 --warmup 3 --json "$out/bench_cuda_$g.json" \
            | tee "$out/bench_cuda_$g.md" || status=1
    done
    if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "== bench (PyTorch, cuda)" >&2
        python3 "$repo/bench/peer/cuda_bench.py" --json "$out/torch_cuda.json" >/dev/null || status=1
    else
        echo "gpu-check: no python3 with CUDA torch here: PyTorch rows skipped" >&2
    fi
    echo "== pipeline on phantoms (tiny budget)" >&2
    "$pack/run/xtask" pipeline --device cuda --budget tiny --derm-bin "$pack/run/derm" --out "$out/pipeline" --quiet \
        || status=1
    echo "gpu-check: results in $out" >&2
    exit $status
    ;;
*)
    sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [ "$cmd" = "-h" ] || [ "$cmd" = "--help" ] || exit 2
    ;;
esac
