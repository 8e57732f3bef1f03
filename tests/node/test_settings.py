"""Configuration: file + NODE_* overrides, and refusal of invalid values with the field named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.errors import ConfigError
from node.settings import load_settings


def test_defaults_are_embedded_and_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config/node.yaml here
    settings = load_settings()
    assert settings.dicom.port == 11112
    assert settings.storage.url.startswith("sqlite:///")
    assert settings.storage.url.endswith("data/node.db")
    assert settings.web.host == "127.0.0.1"


def test_shipped_config_is_valid():
    settings = load_settings(__import__("pathlib").Path("config/node.yaml"))
    assert settings.dicom.ae_title == "PACSNODE"


def test_env_overrides_file(tmp_path, monkeypatch):
    config = tmp_path / "node.yaml"
    config.write_text("dicom:\n  port: 11113\n  ae_title: FROMFILE\n")
    monkeypatch.setenv("NODE_DICOM__PORT", "11999")
    monkeypatch.setenv("NODE_DICOM__ALLOWED_CALLING_AETS", '["CT1", "PACS"]')
    settings = load_settings(config)
    assert settings.dicom.port == 11999
    assert settings.dicom.ae_title == "FROMFILE"
    assert settings.dicom.allowed_calling_aets == ["CT1", "PACS"]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("dicom:\n  port: 70000\n", ["dicom.port", "70000"]),
        ("dicom:\n  port: abc\n", ["dicom.port", "'abc'"]),
        ("dicom:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n", ["dicom.ae_title", "THIS_TITLE_IS_TOO_LONG"]),
        ("dicom:\n  max_pdu: 12\n", ["dicom.max_pdu", "12"]),
        ("dicom:\n  allowed_calling_aets: ['OK', 'BAD\\\\AE']\n", ["dicom.allowed_calling_aets.1"]),
        ("assembly:\n  series_quiet_s: -1\n", ["assembly.series_quiet_s", "-1"]),
        ("assembly:\n  group_by: patient\n", ["assembly.group_by", "'patient'"]),
        ("storage:\n  min_free_mb: -5\n", ["storage.min_free_mb"]),
        ("dicom:\n  prot: 104\n", ["dicom.prot", "Extra inputs"]),
        ("- just\n- a list\n", ["mapping"]),
        ("dicom: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_invalid_value_names_field_and_value(tmp_path, yaml_text, expected):
    config = tmp_path / "node.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    for fragment in expected:
        assert fragment in str(info.value)


def test_invalid_env_value_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NODE_WEB__PORT", "eighty")
    with pytest.raises(ConfigError, match=r"web\.port.*'eighty'"):
        load_settings()


def test_serve_refuses_to_start_on_invalid_config(tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text("dicom:\n  port: 0x\n")
    result = subprocess.run(
        [sys.executable, "-m", "node", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "dicom.port" in result.stderr and "0x" in result.stderr


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_unreadable_config_file_is_named(tmp_path):
    """A folder (or a file without read permission) given as the configuration: a ConfigError
    naming it, not a traceback."""
    with pytest.raises(ConfigError, match=f"configuration file {tmp_path} cannot be read"):
        load_settings(tmp_path)


def test_defaults_find_the_bundled_rules_and_models_outside_the_checkout(tmp_path, monkeypatch):
    """`pacs-node serve` started from another folder (no config/, no models/ there) still gets the
    project's routing rules and bundled models; a folder's own files of those names win."""
    from node.settings import load_settings
    from tests.helpers import REPO

    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.routing.rules_file == REPO / "config" / "routes.yaml"
    assert settings.models.directory == REPO / "models" / "onnx"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "routes.yaml").write_text("version: 1\nrules: []\n")
    assert load_settings().routing.rules_file == Path("config/routes.yaml")
