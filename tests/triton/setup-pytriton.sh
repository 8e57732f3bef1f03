#!/usr/bin/env bash
# The PyTriton server of tests/triton, in a venv of its own: nvidia-pytriton 0.7 needs numpy<2 and
# protobuf<7, which the node's venv does not have. About 55 MB of wheels (tritonserver is inside
# nvidia-pytriton), ~510 MB installed, ~1 min. Idempotent; prints the venv's python on success.
# PACS_NODE_PYTRITON_VENV overrides where it goes (default ~/.cache/pacs-node/venv-pytriton).
set -euo pipefail
venv="${PACS_NODE_PYTRITON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pacs-node/venv-pytriton}"
py="${PYTHON:-python3}"
reqs="nvidia-pytriton==0.7.0 onnxruntime>=1.18,<1.24 numpy<2"
stamp="$venv/.installed-$(echo "$reqs" | tr -c 'A-Za-z0-9.=<>,\n' '_')"
if [ ! -f "$stamp" ]; then
  "$py" -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $reqs
  touch "$stamp"
fi
echo "$venv/bin/python"
