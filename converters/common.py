"""Shared converter pieces: errors, parity checks, fp16 variants, phantom inputs, output folders."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MIN_OPSET = 17
DEFAULT_OPSET = 17


class ConversionError(Exception):
    """A conversion cannot go on; the message says what is wrong and what to do."""


@dataclass
class ParityCase:
    """One input compared between the source framework and ONNX Runtime."""

    name: str
    output: str
    max_abs: float
    max_rel: float
    ok: bool
    #: per-pixel outputs: the fraction of pixels (voxels) whose class is the same (argmax over the
    #: channels; one channel: the same side of the threshold); None for classifier outputs
    agreement: float | None = None


@dataclass
class ParityResult:
    """All compared inputs of one ONNX file."""

    onnx_file: str
    atol: float
    rtol: float
    cases: list[ParityCase] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every case is within tolerance."""
        return all(c.ok for c in self.cases)

    @property
    def max_abs(self) -> float:
        """Largest absolute difference over every case."""
        return max((c.max_abs for c in self.cases), default=0.0)

    @property
    def max_rel(self) -> float:
        """Largest relative difference over every case."""
        return max((c.max_rel for c in self.cases), default=0.0)

    @property
    def agreement(self) -> float | None:
        """Lowest per-pixel class agreement over every case (per-pixel outputs), else None."""
        values = [c.agreement for c in self.cases if c.agreement is not None]
        return min(values) if values else None

    def lines(self) -> list[str]:
        """Human-readable lines, one per case, then the verdict."""
        out = [
            f"  {c.name:>14s} {c.output:>10s}: max abs {c.max_abs:.3e}  max rel {c.max_rel:.3e}"
            + ("" if c.agreement is None else f"  per-pixel class agreement {100 * c.agreement:.4f} %")
            + ("" if c.ok else "  OVER TOLERANCE")
            for c in self.cases
        ]
        verdict = "PASS" if self.ok else "FAIL"
        out.append(
            f"  parity {verdict} for {self.onnx_file} "
            f"(max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e}; "
            f"tolerance |d| <= {self.atol:g} + {self.rtol:g}*|ref|)"
        )
        return out

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "onnx_file": self.onnx_file,
            "atol": self.atol,
            "rtol": self.rtol,
            "ok": self.ok,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            **({} if self.agreement is None else {"pixel_agreement": self.agreement}),
            "cases": [asdict(c) for c in self.cases],
        }


def pixel_agreement(ref: np.ndarray, got: np.ndarray, threshold: float = 0.0) -> float:
    """Fraction of pixels (voxels) of two (N, C, ...) per-pixel outputs with the same class: the
    argmax over C, or for one channel the same side of ``threshold`` (0 for logits)."""
    if ref.shape[1] > 1:
        same = np.argmax(ref, axis=1) == np.argmax(got, axis=1)
    else:
        same = (ref[:, 0] > threshold) == (got[:, 0] > threshold)
    return float(same.mean()) if same.size else 1.0


def compare(
    name: str,
    output: str,
    ref: np.ndarray,
    got: np.ndarray,
    atol: float,
    rtol: float,
    per_pixel_threshold: float | None = None,
) -> ParityCase:
    """Compare one output: max |d|, max |d| / (|ref| + 1e-6), and ``|d| <= atol + rtol |ref|``;
    with ``per_pixel_threshold`` (a per-pixel output) also the class agreement
    (:func:`pixel_agreement`)."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        return ParityCase(name, output, float("inf"), float("inf"), False)
    diff = np.abs(ref - got)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / (np.abs(ref) + 1e-6)).max()) if diff.size else 0.0
    ok = bool(np.all(diff <= atol + rtol * np.abs(ref))) and bool(np.isfinite(got).all())
    agreement = None
    if per_pixel_threshold is not None and ref.ndim >= 4:
        agreement = pixel_agreement(ref, got, per_pixel_threshold)
    return ParityCase(name, output, max_abs, max_rel, ok, agreement)


def ort_session(path: Path):  # noqa: ANN201 - onnxruntime.InferenceSession
    """A CPU ONNX Runtime session on one thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConversionError(f"ONNX Runtime cannot open {path}: {exc}") from exc


def _phantom_volume(shape: Sequence[int], kind: str, seed: int) -> np.ndarray:
    """(1, C, D, H, W): D consecutive phantom slices (CT unless ``kind`` is mr), as in
    :func:`phantom_input`."""
    import cv2

    from node.synth import render_study

    c, d, h, w = (int(v) for v in shape[1:5])
    study = render_study("mr" if kind == "mr" else "ct", seed, None, slices=d, size=128)
    stack = np.stack([im.pixels.astype(np.float32) for im in study.images[:d]])
    lo, hi = np.percentile(stack, [0.5, 99.5])
    stack = np.clip((stack - lo) / max(hi - lo, 1e-6), 0, 1)
    vol = np.stack([cv2.resize(s, (w, h), interpolation=cv2.INTER_AREA) for s in stack])
    if vol.shape[0] < d:  # fewer slices than asked: repeat the last
        vol = np.concatenate([vol, np.repeat(vol[-1:], d - vol.shape[0], axis=0)])
    vol = (vol - 0.5) / 0.25
    return np.ascontiguousarray(np.repeat(vol[None, None], c, axis=1), dtype=np.float32)


def phantom_input(shape: Sequence[int], layout: str, kind: str = "cxr", seed: int = 0) -> np.ndarray:
    """A phantom image (``node.synth``) scaled to 0..1, resized to the input, normalised as
    (x - 0.5) / 0.25 and replicated to the channels: realistic structure for parity, not a
    substitute for the manifest's preprocessing. ``layout`` NCDHW: a stack of slices."""
    import cv2

    from node.synth import render_study

    if layout == "NCDHW":
        return _phantom_volume(shape, kind, seed)
    options = {
        "cxr": {"scale": 0.15},
        "mammo": {"scale": 0.1},
        "ct": {"slices": 1, "size": 128},
        "mr": {"slices": 1, "size": 128},
    }.get(kind, {})
    study = render_study(kind, seed, None, **options)
    pixels = study.images[len(study.images) // 2].pixels.astype(np.float32)
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    img = np.clip((pixels - lo) / max(hi - lo, 1e-6), 0, 1)
    if layout == "NCHW":
        c, h, w = shape[1], shape[2], shape[3]
    else:
        h, w, c = shape[1], shape[2], shape[3]
    img = cv2.resize(img, (int(w), int(h)), interpolation=cv2.INTER_AREA)
    img = (img - 0.5) / 0.25
    stack = np.repeat(img[None], int(c), axis=0)  # C, H, W
    out = stack[None] if layout == "NCHW" else np.transpose(stack, (1, 2, 0))[None]
    return np.ascontiguousarray(out, dtype=np.float32)


def parity_inputs(
    shape: Sequence[int], layout: str, phantom_kind: str | None = "cxr", seed: int = 0
) -> list[tuple[str, np.ndarray]]:
    """Named inputs: random normal (batch 1 and 3, so the dynamic batch is exercised), random
    uniform 0..1, and a phantom image (when ``phantom_kind``)."""
    rng = np.random.default_rng(seed)
    item = tuple(int(d) for d in shape[1:])
    out = [
        ("random-normal", rng.standard_normal((1, *item)).astype(np.float32)),
        ("random-batch3", rng.standard_normal((3, *item)).astype(np.float32)),
        ("random-uniform", rng.random((2, *item)).astype(np.float32)),
    ]
    if phantom_kind:
        out.append((f"phantom-{phantom_kind}", phantom_input((1, *item), layout, phantom_kind, seed)))
    return out


def check_parity(
    onnx_path: Path,
    reference: Callable[[np.ndarray], Sequence[np.ndarray]],
    inputs: Sequence[tuple[str, np.ndarray]],
    output_names: Sequence[str],
    atol: float,
    rtol: float,
    per_pixel_threshold: float | None = None,
) -> ParityResult:
    """Run ``reference`` (the source framework) and ONNX Runtime on every input and compare outputs
    (``per_pixel_threshold``: see :func:`compare`)."""
    sess = ort_session(onnx_path)
    input_name = sess.get_inputs()[0].name
    result = ParityResult(onnx_path.name, atol, rtol)
    for name, x in inputs:
        refs = list(reference(x))
        try:
            got = sess.run(list(output_names), {input_name: x})
        except Exception as exc:
            raise ConversionError(f"ONNX Runtime failed on input {name} {x.shape}: {exc}") from exc
        for out_name, r, g in zip(output_names, refs, got, strict=True):
            result.cases.append(compare(name, out_name, r, g, atol, rtol, per_pixel_threshold))
    return result


def write_fp16(src: Path, dst: Path) -> None:
    """An fp16 copy of ``src`` with float32 inputs and outputs (casts at the edges)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(dst))


def check_opset(opset: int) -> None:
    """Refuse opsets below the node's minimum."""
    if opset < MIN_OPSET:
        raise ConversionError(f"opset {opset} is too old: the node needs opset >= {MIN_OPSET}")


def prepare_out_dir(out_dir: Path, force: bool, files: Sequence[str]) -> None:
    """Create ``out_dir``; refuse when any of ``files`` exists there unless ``force``."""
    existing = [f for f in files if (out_dir / f).exists()]
    if existing and not force:
        raise ConversionError(f"{out_dir} already has {', '.join(existing)}; pass --force to overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)


def write_parity_json(out_dir: Path, results: Sequence[ParityResult], extra: dict | None = None) -> Path:
    """``parity.json`` beside the model: every parity result (and conversion details)."""
    path = out_dir / "parity.json"
    data = {"parity": [r.as_dict() for r in results], **(extra or {})}
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def parse_shape(text: str, volume: bool = False) -> tuple[int, ...]:
    """``"1,224,224"`` -> (1, 224, 224); with ``volume`` also C,D,H,W (``"1,32,64,64"``)."""
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError as exc:
        raise ConversionError(f"--input-shape must be comma-separated integers, got {text!r}") from exc
    allowed = (3, 4) if volume else (3,)
    if len(dims) not in allowed or min(dims) <= 0:
        need = "C,H,W (an image) or C,D,H,W (a volume)" if volume else "three positive dims C,H,W"
        raise ConversionError(f"--input-shape needs {need}, without the batch; got {text!r}")
    return dims
