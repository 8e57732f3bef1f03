"""PyTorch -> ONNX: parity, CAM output, scaffold -> registry -> analyse, and clear failures."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import need_module

torch = need_module("torch")

from converters.cli import convert_torch  # noqa: E402
from converters.common import ConversionError  # noqa: E402
from node.errors import ManifestError  # noqa: E402
from node.inference.registry import load_model  # noqa: E402
from node.inference.runtime import CPU, RuntimeConfig, create_session  # noqa: E402
from node.runner.analyse import Stopwatch, analyse  # noqa: E402
from node.synth import generate_study  # noqa: E402
from tests.byom.conftest import fill_manifest  # noqa: E402

NET_SOURCE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, n)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MaxHead(Net):
    def forward(self, x):
        return self.fc(torch.amax(self.features(x), dim=(2, 3)))


class Weird(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        s = torch.linalg.svdvals(x[:, 0])
        return self.fc(s[:, :4])


class BnNet(nn.Module):
    # what real CNNs have and the first networks here did not: BatchNorm (with running statistics
    # far from a batch's own) and Dropout, ResNet-style residual blocks, GAP + linear head

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, n)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.fc(self.drop(torch.flatten(self.pool(h), 1)))


def bn_net() -> BnNet:
    torch.manual_seed(1)
    net = BnNet()
    for m in net.modules():  # trained-looking running statistics, far from any batch's own
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net


def build(n: int = 2) -> Net:
    torch.manual_seed(0)
    return Net(n)


def max_head() -> MaxHead:
    return MaxHead()


def weird() -> Weird:
    return Weird()
"""


@pytest.fixture
def tnet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``byom_tnet`` importable from the working directory, and its weights file."""
    (tmp_path / "byom_tnet.py").write_text(NET_SOURCE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("byom_tnet", None)
    import byom_tnet  # type: ignore[import-not-found]

    torch.save(byom_tnet.build().state_dict(), tmp_path / "w.pt")
    return tmp_path


def test_torch_convert_with_cam_runs_in_node(tnet: Path) -> None:
    out = tnet / "models" / "tnet"
    result = convert_torch(
        out_dir=out,
        model="byom_tnet:build",
        weights=tnet / "w.pt",
        input_shape=(1, 64, 64),
        cam=True,
        fp16=True,
        echo=lambda s: None,
    )
    assert result.ok
    assert result.output_names == ["logits", "cam"]
    assert result.parity[0].max_abs < 1e-4 and result.parity[1].ok
    assert {c.name for c in result.parity[0].cases} >= {"random-batch3", "phantom-cxr"}
    assert (out / "model.fp16.onnx").is_file() and (out / "parity.json").is_file()

    # the scaffold is refused until filled in, naming a field
    with pytest.raises(ManifestError, match="TODO|scheme_designator|activation|kind"):
        load_model(out)
    fill_manifest(out, labels=["finding_a", "finding_b"])
    model = load_model(out)
    assert model.manifest.outputs.cam == "cam"
    session = create_session(model, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    study = tnet / "study"
    truth = generate_study("cxr", study, seed=3, write_masks=False, scale=0.1)
    result_, _ = analyse(
        model,
        session,
        [study / i.file for i in truth.instances],
        level="image",
        uid_seed="t",
        watch=Stopwatch(deadline=time.monotonic() + 60),
    )
    assert [f.label for f in result_.findings] == ["finding_a", "finding_b"]
    assert all(0.0 <= f.probability <= 1.0 for f in result_.findings)
    assert result_.images[0].heatmaps and result_.images[0].heatmaps[0].method == "cam"


def test_torchscript_input(tnet: Path) -> None:
    import byom_tnet  # type: ignore[import-not-found]

    scripted = torch.jit.trace(byom_tnet.build().eval(), torch.randn(1, 1, 32, 32))
    scripted.save(str(tnet / "net.ts"))
    result = convert_torch(
        out_dir=tnet / "ts",
        torchscript=tnet / "net.ts",
        input_shape=(1, 32, 32),
        phantom=None,
        echo=lambda s: None,
    )
    assert result.ok and result.output_names == ["logits"]


def test_refuses_overwrite_without_force(tnet: Path) -> None:
    kwargs = dict(model="byom_tnet:build", input_shape=(1, 32, 32), phantom=None, echo=lambda s: None)
    convert_torch(out_dir=tnet / "o", **kwargs)
    with pytest.raises(ConversionError, match="--force"):
        convert_torch(out_dir=tnet / "o", **kwargs)
    assert convert_torch(out_dir=tnet / "o", force=True, **kwargs).ok


def test_wrong_weights_file(tnet: Path) -> None:
    import byom_tnet  # type: ignore[import-not-found]

    torch.save(byom_tnet.build(n=3).state_dict(), tnet / "w3.pt")
    with pytest.raises(ConversionError, match=r"does not match the model: shape mismatch fc\.weight"):
        convert_torch(
            out_dir=tnet / "a", model="byom_tnet:build", weights=tnet / "w3.pt", input_shape=(1, 32, 32)
        )
    (tnet / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="cannot read weights file"):
        convert_torch(
            out_dir=tnet / "b", model="byom_tnet:build", weights=tnet / "junk.pt", input_shape=(1, 32, 32)
        )


def test_unsupported_layer_and_bad_cam_head(tnet: Path) -> None:
    with pytest.raises(ConversionError, match="ONNX export failed"):
        convert_torch(out_dir=tnet / "c", model="byom_tnet:weird", input_shape=(1, 8, 8), phantom=None)
    with pytest.raises(ConversionError, match="not global-average-pool \\+ linear|never called"):
        convert_torch(
            out_dir=tnet / "d", model="byom_tnet:max_head", input_shape=(1, 32, 32), cam=True, phantom=None
        )


def test_cli_exit_codes(tnet: Path) -> None:
    from typer.testing import CliRunner

    from node.cli import app

    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "convert",
            "torch",
            "--model",
            "byom_tnet:build",
            "--input-shape",
            "1,32,32",
            "--out",
            str(tnet / "cli"),
            "--phantom",
            "none",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "parity PASS" in ok.output
    again = runner.invoke(
        app,
        [
            "convert",
            "torch",
            "--model",
            "byom_tnet:build",
            "--input-shape",
            "1,32,32",
            "--out",
            str(tnet / "cli"),
            "--phantom",
            "none",
        ],
    )
    assert again.exit_code == 2 and "--force" in again.output
    # an impossible tolerance makes the parity check fail with exit code 1
    strict = runner.invoke(
        app,
        [
            "convert",
            "torch",
            "--model",
            "byom_tnet:build",
            "--input-shape",
            "1,32,32",
            "--out",
            str(tnet / "cli"),
            "--phantom",
            "none",
            "--force",
            "--atol",
            "0",
            "--rtol",
            "0",
            "--fp16",
        ],
    )
    assert strict.exit_code == 1, strict.output
    assert "OVER TOLERANCE" in strict.output
    data = yaml.safe_load((tnet / "cli" / "manifest.yaml").read_text())
    assert data["input"]["shape"] == [None, 1, 32, 32]
    assert np.isfinite(data["provenance"]["metrics"]["parity_max_abs"])


@pytest.mark.parametrize("cam", [False, True], ids=["plain", "cam"])
def test_batchnorm_dropout_network_passes_parity(tnet: Path, cam: bool) -> None:
    """The parity reference runs the network in eval mode, as ONNX Runtime does. (The export
    wrappers are new modules, created in training mode, and torch.onnx.export restores that mode
    recursively: without ``.eval()`` on the wrapper, BatchNorm used batch statistics and Dropout
    dropped, and every real CNN was refused with a parity failure of ~0.8.)"""
    import byom_tnet  # type: ignore[import-not-found]

    torch.save(byom_tnet.bn_net().state_dict(), tnet / "bn.pt")
    result = convert_torch(
        out_dir=tnet / f"bn-{cam}",
        model="byom_tnet:BnNet",
        weights=tnet / "bn.pt",
        input_shape=(1, 64, 64),
        cam=cam,
        echo=lambda s: None,
    )
    assert result.ok, result.parity
    assert result.parity[0].max_abs < 1e-4
    with torch.no_grad():  # the reference really is the eval-mode network (not batch statistics)
        net = byom_tnet.bn_net().eval()
        x = torch.randn(3, 1, 64, 64)
        assert torch.allclose(net(x), net(x)), "Dropout active: the test network is not in eval mode"
