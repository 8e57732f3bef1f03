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

    def lines(self) -> list[str]:
        """Human-readable lines, one per case, then the verdict."""
        out = [
            f"  {c.name:>14s} {c.output:>10s}: max abs {c.max_abs:.3e}  max rel {c.max_rel:.3e}"
            f"{'' if c.ok else '  OVER TOLERANCE'}"
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
            "cases": [asdict(c) for c in self.cases],
        }


def compare(name: str, output: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> ParityCase:
    """Compare one output: max |d|, max |d| / (|ref| + 1e-6), and ``|d| <= atol + rtol |ref|``."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        return ParityCase(name, output, float("inf"), float("inf"), False)
    diff = np.abs(ref - got)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / (np.abs(ref) + 1e-6)).max()) if diff.size else 0.0
    ok = bool(np.all(diff <= atol + rtol * np.abs(ref))) and bool(np.isfinite(got).all())
    return ParityCase(name, output, max_abs, max_rel, ok)


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


def phantom_input(shape: Sequence[int], layout: str, kind: str = "cxr", seed: int = 0) -> np.ndarray:
    """A phantom image (``node.synth``) scaled to 0..1, resized to the input, normalised as
    (x - 0.5) / 0.25 and replicated to the channels: realistic structure for parity, not a
    substitute for the manifest's preprocessing."""
    import cv2

    from node.synth import render_study

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
) -> ParityResult:
    """Run ``reference`` (the source framework) and ONNX Runtime on every input and compare outputs."""
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
            result.cases.append(compare(name, out_name, r, g, atol, rtol))
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


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,224,224"`` -> (1, 224, 224)."""
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError as exc:
        raise ConversionError(f"--input-shape must be comma-separated integers, got {text!r}") from exc
    if len(dims) != 3 or min(dims) <= 0:
        raise ConversionError(f"--input-shape needs three positive dims (without the batch), got {text!r}")
    return dims
