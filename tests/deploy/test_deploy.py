"""Deploy files: every YAML parses, the compose stack and the unit say what docs/deploy.md promises,
the chart's templates only use values that exist, and `systemd-analyze verify` accepts the unit
(when it is installed). No container engine or Kubernetes runs here; see docs/deploy.md."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "pacs-node.service"
CHART = DEPLOY / "helm" / "pacs-node"


def _plain_yaml() -> list[Path]:
    return [p for p in DEPLOY.rglob("*.yaml") if "templates" not in p.parts]


def test_every_plain_yaml_parses():
    files = _plain_yaml()
    assert len(files) >= 3
    for path in files:
        assert yaml.safe_load(path.read_text()) is not None, path


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_is_hardened_and_restarts():
    unit = _unit()
    service = unit["Service"]
    assert service["User"] == "pacs-node" and service["Group"] == "pacs-node"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "true"
    assert service["PrivateTmp"] == "true"
    assert service["ProtectHome"] == "true"
    assert "/var/lib/pacs-node" in service["ReadWritePaths"]
    assert service["Restart"] == "on-failure"
    assert "/healthz" in service["ExecStartPost"]  # started only when healthy
    assert service["ExecStart"].endswith("pacs-node serve")
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    sysusers = (DEPLOY / "systemd" / "pacs-node.sysusers.conf").read_text()
    assert re.search(r"^u pacs-node ", sysusers, re.M)


def test_unit_health_check_script_is_valid_python():
    command = _unit()["Service"]["ExecStartPost"]
    script = command.split(" -c ", 1)[1].strip().strip('"').replace("\\n", "\n")
    compile(script, "ExecStartPost", "exec")


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # the unit's binaries live in /opt/pacs-node/venv when installed; point them at this venv
    venv = Path(sys.executable).parent.parent
    units = []
    for source in sorted((DEPLOY / "systemd").glob("*.service")) + sorted(
        (DEPLOY / "systemd").glob("*.timer")
    ):
        unit = tmp_path / source.name
        unit.write_text(source.read_text().replace("/opt/pacs-node/venv", str(venv)))
        units.append(str(unit))
    assert len(units) == 3
    result = subprocess.run(
        [tool, "verify", *units], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_compose_stack_wires_orthanc_node_and_postgres():
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"node", "orthanc", "postgres"}
    node = services["node"]
    assert node["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (DEPLOY / "compose" / node["build"]["context"] / node["build"]["dockerfile"]).is_file()
    env = node["environment"]
    assert env["NODE_STORAGE__DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in env["NODE_STORAGE__DATABASE_URL"]
    destinations = yaml.safe_load(env["NODE_DESTINATIONS"])
    assert destinations[0]["host"] == "orthanc" and destinations[0]["ae_title"] == "ORTHANC"
    assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
    import json

    orthanc = json.loads((DEPLOY / "compose" / "orthanc" / "orthanc.json").read_text())
    assert orthanc["DicomAet"] == "ORTHANC"
    assert orthanc["DicomModalities"]["pacsnode"] == [env["NODE_DICOM__AE_TITLE"], "node", 11112]
    for volume in services["orthanc"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (DEPLOY / "compose" / source).is_file(), source


def test_dockerfiles_are_multistage_non_root_with_healthcheck():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DEPLOY / "docker" / name).read_text()
        assert len(re.findall(r"^FROM ", text, re.M)) >= 2, f"{name}: multi-stage"
        assert re.search(r"^USER pacs-node$", text, re.M), f"{name}: non-root"
        assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.M), f"{name}: healthcheck"
        assert "COPY pyproject.toml" in text, f"{name}: built from the project's pyproject"
        for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
            assert (REPO / source).exists(), f"{name}: COPY {source} is not in the repository"


def _value_paths(values: object, prefix: str = "") -> set[str]:
    paths = {prefix} if prefix else set()
    if isinstance(values, dict):
        for key, value in values.items():
            paths |= _value_paths(value, f"{prefix}.{key}" if prefix else key)
    return paths


def test_chart_templates_use_only_defined_values():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "pacs-node"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    known = _value_paths(values)
    used: set[str] = set()
    for template in (CHART / "templates").iterdir():
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()))
    assert used, "templates use no values"
    assert not used - known, f"templates use undefined values: {sorted(used - known)}"
    text = (CHART / "templates" / "statefulset.yaml").read_text()
    for needed in ("kind: StatefulSet", "volumeClaimTemplates", "/healthz", "/readyz", "secretKeyRef"):
        assert needed in text
    services = (CHART / "templates" / "services.yaml").read_text()
    assert ".Values.dicom.service.type" in services and values["dicom"]["service"]["type"] in (
        "LoadBalancer",
        "NodePort",
    )
    assert values["gpu"]["resource"] == "nvidia.com/gpu"


def test_helm_lint_when_available():
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("helm is not installed")
    result = subprocess.run([helm, "lint", str(CHART)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    # the scale-out mode renders receivers (>= 2), a PodDisruptionBudget and a GPU worker
    cluster = [
        "--set",
        "cluster.enabled=true,database.url=postgresql+psycopg://u:p@db/x,objectStore.bucket=pacs,"
        "objectStore.endpointUrl=http://s3:8333,objectStore.accessKey=a,objectStore.secretKey=b",
    ]
    result = subprocess.run([helm, "lint", str(CHART), *cluster], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = subprocess.run(
        [helm, "template", "r", str(CHART), *cluster], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered) if d}
    assert ("StatefulSet", "r-pacs-node") not in docs
    assert docs[("Deployment", "r-pacs-node-receiver")]["spec"]["replicas"] == 2
    assert docs[("PodDisruptionBudget", "r-pacs-node-receiver")]["spec"]["maxUnavailable"] == 1
    worker = docs[("Deployment", "r-pacs-node-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"] == ["serve", "--role", "worker"]
    dicom = docs[("Service", "r-pacs-node-dicom")]["spec"]["selector"]
    assert dicom["app.kubernetes.io/component"] == "receiver"
    # one receiver is refused
    one = [*cluster[:1], cluster[1] + ",cluster.receiver.replicas=1"]
    refused = subprocess.run(
        [helm, "template", "r", str(CHART), *one], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "at least 2" in refused.stderr


def test_scale_compose_runs_receivers_behind_haproxy_on_seaweedfs():
    """deploy/compose/scale.yaml: two receivers behind HAProxy on the repository's haproxy.cfg,
    a worker and a sender, PostgreSQL and SeaweedFS as the object store (storage.object_store)."""
    compose = yaml.safe_load((DEPLOY / "compose" / "scale.yaml").read_text())
    services = compose["services"]
    roles = {name: s["command"][-1] for name, s in services.items() if s.get("command", [""])[0] == "serve"}
    assert roles == {
        "receiver-1": "receiver",
        "receiver-2": "receiver",
        "worker": "worker",
        "sender": "sender",
    }
    envs = [services[name]["environment"] for name in roles]
    assert len({e["NODE_CLUSTER__NODE_ID"] for e in envs}) == 4  # one node id per process
    assert len({e["NODE_DICOM__AE_TITLE"] for e in envs}) == 1  # identical receivers
    for env in envs:
        assert env["NODE_STORAGE__DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["NODE_STORAGE__OBJECT_STORE__ENDPOINT_URL"] == "http://seaweedfs:8333"
        assert env["NODE_STORAGE__OBJECT_STORE__BUCKET"] and env["NODE_STORAGE__OBJECT_STORE__SECRET_KEY"]
    assert "-s3" in services["seaweedfs"]["command"]
    s3 = json.loads((DEPLOY / "compose" / "seaweedfs" / "s3.json").read_text())
    keys = s3["identities"][0]["credentials"][0]
    assert keys == {
        "accessKey": envs[0]["NODE_STORAGE__OBJECT_STORE__ACCESS_KEY"],
        "secretKey": envs[0]["NODE_STORAGE__OBJECT_STORE__SECRET_KEY"],
    }
    proxy = services["haproxy"]
    mounted = proxy["volumes"][0].split(":")[0]
    assert (DEPLOY / "compose" / mounted).resolve() == DEPLOY / "haproxy" / "haproxy.cfg"
    config = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    # every variable the config reads without a default is set for it
    needed = set(re.findall(r"\$\{(\w+)\}", config))
    assert needed and needed <= set(proxy["environment"]), needed - set(proxy["environment"])
    assert proxy["environment"]["PACS_RECEIVER_1"].startswith("receiver-1:")


def test_haproxy_config_checks_readyz_and_is_valid_when_haproxy_is_installed(tmp_path):
    config = DEPLOY / "haproxy" / "haproxy.cfg"
    text = config.read_text()
    assert re.search(r"^\s*mode tcp$", text, re.M) and re.search(r"^\s*balance leastconn$", text, re.M)
    assert "option httpchk GET /readyz" in text
    servers = re.findall(r"^\s*server (\S+) .* check port ", text, re.M)
    assert len(servers) == 2
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    env = {
        "PACS_HAPROXY_STATS_SOCKET": str(tmp_path / "admin.sock"),
        "PACS_RECEIVER_1": "10.0.0.11:11112",
        "PACS_RECEIVER_1_WEB": "8080",
        "PACS_RECEIVER_2": "10.0.0.12:11112",
        "PACS_RECEIVER_2_WEB": "8080",
    }
    result = subprocess.run(
        [haproxy, "-c", "-f", str(config)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_chart_scale_out_mode_has_receivers_pdb_and_gpu_workers():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    cluster = values["cluster"]
    assert cluster["enabled"] is False  # the embedded one-pod default stays
    assert cluster["receiver"]["replicas"] >= 2 and cluster["receiver"]["maxUnavailable"] == 1
    assert cluster["worker"]["gpu"] >= 1
    assert set(values["objectStore"]) >= {"endpointUrl", "bucket", "accessKey", "secretKey", "existingSecret"}
    text = (CHART / "templates" / "cluster.yaml").read_text()
    assert 'range $role := list "receiver" "worker" "sender"' in text
    for needed in (
        "kind: Deployment",
        "kind: PodDisruptionBudget",
        '"--role"',
        "path: /readyz",
        "$.Values.gpu.resource $spec.gpu",
        "NODE_STORAGE__OBJECT_STORE__ENDPOINT_URL",
        "NODE_STORAGE__OBJECT_STORE__SECRET_KEY",
        "fieldPath: metadata.name",  # one cluster.node_id per pod
        "at least 2",
    ):
        assert needed in text, needed
    stateful = (CHART / "templates" / "statefulset.yaml").read_text()
    assert stateful.startswith("{{- if not .Values.cluster.enabled }}")
    # the DICOM Service sends associations to the receivers only
    assert "app.kubernetes.io/component: receiver" in (CHART / "templates" / "services.yaml").read_text()


def test_keepalived_example_follows_haproxy_and_passes_its_config_test():
    """The keepalived example (not run: VRRP needs two hosts) moves the virtual IP with a running
    HAProxy, and `keepalived -t` accepts it where keepalived is installed (exit 0, no message)."""
    config = DEPLOY / "keepalived" / "keepalived.conf"
    text = config.read_text()
    assert "haproxy" in re.search(r"vrrp_script \w+ \{(.*?)\}", text, re.S).group(1)
    assert re.search(r"track_script \{\s*haproxy_running\s*\}", text)
    assert re.search(r"virtual_ipaddress \{\s*\S+/\d+", text)
    tool = shutil.which("keepalived") or (
        "/usr/sbin/keepalived" if Path("/usr/sbin/keepalived").exists() else None
    )
    if tool is None:
        pytest.skip("keepalived is not installed")
    result = subprocess.run(
        [tool, "-t", "-f", str(config), "-l", "-D"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
