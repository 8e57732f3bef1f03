#!/usr/bin/env bash
# The GPU checks of issue 16 (item 3), prepared to run in one go on a lent device machine
# (NVIDIA H200, Python 3.12, CUDA 13, CuPy, torch and opencv there; no network, no project deps).
#
#   scripts/gpu-check.sh prepare   here, in the repo root: downloads onnxruntime-gpu in 40 MB parts
#                                  (.ortgpu-1 .. .ortgpu-N, ../shared/gpu/prepare-ort-gpu.sh) and the
#                                  node's other Python 3.12 wheels that the device lacks into
#                                  .gpuwhl-1 (git-ignored), then prints the device calls to make.
#   scripts/gpu-check.sh device    there, in the last call (carry [".gpuwhl-1"]): joins the parts
#                                  copied to /tmp/ort by the earlier calls, installs everything into
#                                  /tmp/site and runs the checks, logs under $OUT.
#
# The checks: the gpu-marked tests (CUDA provider, IO binding from device arrays, CUDA graphs, FP16,
# CuPy preparation and nvImageCodec decode against the CPU path), run with --noconftest since the
# suite's conftest needs the whole node (web, database, DICOM networking), and
# bench/inference.py --real --models resnet50-224 on the CUDA provider, with the GPU preparation on
# and off (--cpu-prepare) (node ÷ bare onnxruntime, the issue's CUDA figure).
set -euo pipefail
cd "$(dirname "$0")/.."

# the node's runtime dependencies that the device image lacks (its own numpy, opencv, scipy, torch,
# onnx, cupy, typer, prometheus-client, requests and pytest are used), pinned to this venv's versions
WHEELS=(
  pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection
  pydicom pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg pylibjpeg-rle pyjpegls
  SQLAlchemy greenlet sqlmodel onnxconverter-common
  nvidia-nvimgcodec-cu13 nvidia-nvjpeg2k-cu13
  # the tests' real files and HTJ2K writer
  pydicom-data itkwasm itkwasm-htj2k itkwasm-htj2k-wasi wasmtime
)
#: MB of wheels per carried folder (beside the ~9 MB working tree, under the 64 MiB a call carries)
PACK_MB=50

pinned() {  # NAME==VERSION as installed in .venv, else NAME
  local name=$1 version
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name" 2>/dev/null || true)
  if [[ -n $version ]]; then echo "$name==$version"; else echo "$name"; fi
}

prepare() {
  # 52 MiB parts: each call carries the ~9 MB working tree beside its part, under the 64 MiB limit
  ORT_PART_SIZE=${ORT_PART_SIZE:-52M} bash ../shared/gpu/prepare-ort-gpu.sh
  grep -qx '/.gpuwhl-\*/' .git/info/exclude 2>/dev/null || echo '/.gpuwhl-*/' >> .git/info/exclude
  local cache=${TMPDIR:-/tmp}/gpuwhl
  rm -rf "$cache" .gpuwhl-* && mkdir -p "$cache"
  for name in "${WHEELS[@]}"; do  # one by one: a wheel missing for 3.12 must not stop the others
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d "$cache" "$(pinned "$name")" 2>/dev/null ||
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$cache" "$name" 2>/dev/null ||  # this venv's version has no 3.12 wheel: the newest that has
      echo "warning: no Python 3.12 wheel for $name" >&2
  done
  # packed into folders of at most PACK_MB: largest first, each into the first that has room
  local used=() k size
  for wheel in $(ls -S "$cache"/*.whl); do
    size=$(du -m "$wheel" | cut -f1)
    for ((k = 0; ; k++)); do
      if ((${used[k]:-0} + size <= PACK_MB || ${used[k]:-0} == 0)); then break; fi
    done
    mkdir -p ".gpuwhl-$((k + 1))" && cp "$wheel" ".gpuwhl-$((k + 1))/"
    used[k]=$((${used[k]:-0} + size))
  done
  local parts packs
  parts=$(ls -d .ortgpu-* | wc -l)
  packs=$(ls -d .gpuwhl-* | wc -l)
  basename "$(ls "${TMPDIR:-/tmp}"/ortgpu-*/onnxruntime_gpu-*.whl | head -n 1)" > ".gpuwhl-$packs/ort-wheel-name"
  du -sh .gpuwhl-*
  echo "device calls, back to back (the machine goes back 30 s after each):"
  local extra=""
  if (($(du -sm ".ortgpu-$parts" | cut -f1) + $(du -sm ".gpuwhl-$packs" | cut -f1) <= 52)); then
    extra=", \".ortgpu-$parts\""  # the last part rides with the last pack
    parts=$((parts - 1))
  fi
  for k in $(seq 1 "$parts"); do
    echo "  run carry=[\".ortgpu-$k\"] command='mkdir -p /tmp/ort && cp .ortgpu-$k/* /tmp/ort/'"
  done
  for k in $(seq 1 $((packs - 1))); do
    echo "  run carry=[\".gpuwhl-$k\"] command='mkdir -p /tmp/whl && cp .gpuwhl-$k/* /tmp/whl/'"
  done
  echo "  run carry=[\".gpuwhl-$packs\"$extra] timeout_s=540 command='bash scripts/gpu-check.sh device'"
}

device() {
  : "${OUT:=/tmp/gpu-check-out}"
  mkdir -p "$OUT"
  mkdir -p /tmp/ort /tmp/whl
  cp .gpuwhl-*/* /tmp/whl/  # the last pack, carried by this call
  for part in .ortgpu-*/part-*; do [[ -e $part ]] && cp "$part" /tmp/ort/; done  # and a part with it
  local wheel
  wheel=/tmp/$(cat /tmp/whl/ort-wheel-name)  # pip reads the version and platform from the name
  cat /tmp/ort/part-* > "$wheel"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheel" /tmp/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  # cuDNN and cuBLAS from the image's nvidia-* packages, nvJPEG2000 from the carried wheel
  local libs
  libs=$(python3 - <<'EOF'
import glob, os, site, sys
roots = ["/tmp/site", *site.getsitepackages()]
found = {os.path.dirname(p) for r in roots for p in glob.glob(f"{r}/nvidia/**/lib*/lib*.so*", recursive=True)}
print(":".join(sorted(found)))
EOF
)
  export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    python3 -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'device(s)')" || true
    python3 -c "from nvidia import nvimgcodec; print('nvimgcodec', getattr(nvimgcodec, '__version__', '?'))" || true
  } 2>&1 | tee "$OUT/versions.txt"
  set +e
  local gpu_tests=(tests/inference/test_gpu_prepare.py tests/inference/test_device_binding.py tests/inference/test_fp16.py)
  timeout 240 python3 -m pytest --noconftest -m gpu -q -p no:cacheprovider -rs "${gpu_tests[@]}" 2>&1 | tee "$OUT/gpu-tests.txt"
  local bench=(python3 bench/inference.py --real --models resnet50-224 --images 64 --repeat 3 --provider all)
  timeout 150 "${bench[@]}" 2>&1 | tee "$OUT/bench-inference.txt"
  timeout 100 "${bench[@]}" --cpu-prepare 2>&1 | tee "$OUT/bench-inference-cpu-prepare.txt"
  set -e
}

case ${1:-} in
  prepare) prepare ;;
  device) device ;;
  *) echo "usage: $0 prepare|device" >&2; exit 2 ;;
esac
