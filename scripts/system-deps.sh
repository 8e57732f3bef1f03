#!/usr/bin/env bash
# Install the Debian packages the tests use as real peers, when missing: DCMTK (storescu, echoscu,
# storescp, dsrdump) and dicom3tools (dciodvfy). Needs root for apt-get; otherwise says what to run.
set -euo pipefail
declare -A pkg_of=([storescu]=dcmtk [dciodvfy]=dicom3tools)
missing=()
for tool in "${!pkg_of[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${pkg_of[$tool]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "the tests need: ${missing[*]} — run: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
