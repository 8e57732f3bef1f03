"""node.inference.sliding against MONAI's own ``sliding_window_inference`` (a dev dependency)."""

from __future__ import annotations

import numpy as np
import pytest

from node.errors import InferenceError
from node.inference.sliding import importance_map, sliding_window_inference, window_starts

torch = pytest.importorskip("torch")
monai_inferers = pytest.importorskip("monai.inferers")
monai_data = pytest.importorskip("monai.data.utils")


def _net(in_ch: int, out_ch: int, dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(
        conv(in_ch, 4, 3, padding=1), torch.nn.ReLU(), conv(4, out_ch, 3, padding=1)
    ).eval()


def _both(
    volume: np.ndarray, roi: tuple[int, ...], net: torch.nn.Module, **kw: object
) -> tuple[np.ndarray, np.ndarray]:
    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()

    ours = sliding_window_inference(volume, roi, predict, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(
            torch.from_numpy(volume[None]),
            roi,
            int(kw.get("sw_batch_size", 1)),  # type: ignore[call-overload]
            net,
            overlap=kw.get("overlap", 0.25),
            mode=kw.get("mode", "gaussian"),
            sigma_scale=0.125,
        )
    return ours, theirs[0].numpy()


@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "mode", "sw"),
    [
        ((2, 20, 33, 27), (8, 16, 16), 0.25, "gaussian", 4),  # roi smaller than the volume
        ((2, 20, 33, 27), (8, 16, 16), 0.5, "constant", 1),
        ((1, 6, 12, 40), (8, 16, 16), 0.25, "gaussian", 3),  # roi larger along D and H: padded
        ((1, 5, 9, 7), (8, 16, 16), 0.25, "gaussian", 2),  # roi larger than the whole volume
        ((1, 8, 16, 16), (8, 16, 16), 0.6, "gaussian", 1),  # roi equal to the volume
        ((1, 17, 23, 19), (5, 7, 6), 0.0, "gaussian", 5),  # no overlap, odd sizes
    ],
)
def test_matches_monai_3d(
    shape: tuple[int, ...], roi: tuple[int, ...], overlap: float, mode: str, sw: int
) -> None:
    rng = np.random.default_rng(1)
    volume = rng.normal(size=shape).astype(np.float32)
    ours, theirs = _both(volume, roi, _net(shape[0], 3, 3), overlap=overlap, mode=mode, sw_batch_size=sw)
    assert ours.shape == theirs.shape == (3, *shape[1:])
    assert np.abs(ours - theirs).max() < 1e-5


def test_matches_monai_2d() -> None:
    volume = np.random.default_rng(2).normal(size=(1, 50, 37)).astype(np.float32)
    ours, theirs = _both(volume, (16, 16), _net(1, 2, 2), overlap=0.3, mode="gaussian", sw_batch_size=8)
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_importance_map_matches_monai(mode: str) -> None:
    theirs = monai_data.compute_importance_map((7, 12, 9), mode=mode, sigma_scale=0.125).numpy()
    assert np.abs(importance_map((7, 12, 9), mode) - theirs).max() < 1e-7  # type: ignore[arg-type]


def test_window_starts_match_monai() -> None:
    theirs = monai_data.dense_patch_slices((20, 33, 27), (8, 16, 16), (6, 12, 12))
    ours = window_starts((20, 33, 27), (8, 16, 16), (6, 12, 12))
    assert [tuple(s.start for s in w) for w in theirs] == ours


def test_batches_and_errors() -> None:
    seen: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape[0])
        return batch[:, :1] * 2

    volume = np.ones((1, 10, 10, 10), dtype=np.float32)
    out = sliding_window_inference(volume, (4, 4, 4), predict, overlap=0.5, sw_batch_size=7)
    assert np.allclose(out, 2.0) and max(seen) == 7 and sum(seen) == 4**3
    with pytest.raises(InferenceError, match="expected"):
        sliding_window_inference(volume, (4, 4, 4), lambda b: b[:, :, :2], overlap=0.0)
    with pytest.raises(InferenceError, match="overlap"):
        sliding_window_inference(volume, (4, 4, 4), predict, overlap=1.0)
