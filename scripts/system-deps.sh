#!/usr/bin/env bash
# Install the Debian packages the tests use as real peers, when missing: DCMTK (storescu, echoscu,
# storescp, dsrdump), dicom3tools (dciodvfy), Orthanc with its DICOMweb plugin (the PACS in end-to-end
# tests, read by OHIF) and PixelMed
# (the SR validator, with a JDK), Chromium (headless, for the page tests), PostgreSQL (a
# throw-away server on loopback for the database tests), rsyslog with its TLS driver (the audit
# record repository of tests/audit), Prometheus (promtool, for the alerting rules) and HAProxy (in
# front of two receivers in tests/scale). Needs root
# for apt-get; otherwise says what to run.
set -euo pipefail
missing=()
command -v storescu >/dev/null 2>&1 || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)  # OHIF reads Orthanc over DICOMweb
[ -f /usr/share/java/pixelmed.jar ] || missing+=(pixelmed-apps)
command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)  # runs the SR validator launcher from source
command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)  # renders the status pages in tests
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)  # the suite also runs against PostgreSQL
command -v rsyslogd >/dev/null 2>&1 || [ -x /usr/sbin/rsyslogd ] || missing+=(rsyslog)  # the audit repository (tests/audit)
compgen -G "/usr/lib/*/rsyslog/lmnsd_gtls.so" >/dev/null || missing+=(rsyslog-gnutls)  # its TLS driver (RFC 5425)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)  # promtool: deploy/prometheus/alerts.yml and its tests
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)  # TCP load balancer in front of two receivers (tests/scale/test_haproxy.py)
command -v keepalived >/dev/null 2>&1 || [ -x /usr/sbin/keepalived ] || missing+=(keepalived)  # checks deploy/'s keepalived configuration (tests/deploy/test_deploy.py)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (apt-get)" >&2
  apt-get update -qq
  # the orthanc package starts its own service on 4242/8042 where an init system runs; the tests
  # start their own instances on free ports, so stop it from starting here (policy-rc.d 101)
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ "$created_policy" -eq 1 ] && rm -f "$policy"
  exit 0
else
  echo "the tests need: ${missing[*]} — run: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
