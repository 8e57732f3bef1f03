"""``pacs-node convert torch|keras|monai-bundle``: export to ONNX, parity checks, fp16 variant,
manifest (a scaffold, or the bundle's).

Exit codes: 0 converted and parity passed; 1 parity above tolerance (files are still written so that
they can be inspected); 2 the conversion could not be done (the message says why).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from converters.common import (
    DEFAULT_OPSET,
    ConversionError,
    ParityResult,
    check_opset,
    check_parity,
    parity_inputs,
    parse_shape,
    prepare_out_dir,
    write_fp16,
    write_parity_json,
)
from converters.scaffold import write_manifest_scaffold
from converters.segmentation import (
    LabelOptions,
    SegmentationOptions,
    parse_code,
    parse_named_codes,
    per_pixel_threshold,
)
from converters.segmentation import plan as plan_segmentation

app = typer.Typer(
    name="convert",
    help="Convert a PyTorch or Keras classifier, a PyTorch segmentation network (2-D or 3-D), or a MONAI "
    "bundle, to ONNX for the node (parity checked).",
    no_args_is_help=True,
    add_completion=False,
)

MODEL_FILE = "model.onnx"
FP16_FILE = "model.fp16.onnx"
OUTPUT_FILES = (MODEL_FILE, FP16_FILE, "manifest.yaml", "parity.json")

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="output folder (usually models/onnx/<id>)")]
IdOpt = Annotated[str | None, typer.Option("--id", help="model id (default: the output folder's name)")]
CamOpt = Annotated[
    bool, typer.Option("--cam", help="add the class-activation-map output (GAP + linear heads)")
]
Fp16Opt = Annotated[bool, typer.Option("--fp16", help="also write model.fp16.onnx with its own parity check")]
AtolOpt = Annotated[float, typer.Option(help="parity tolerance: |diff| <= atol + rtol*|reference|")]
OpsetOpt = Annotated[int, typer.Option(help="ONNX opset (>= 17)")]
PhantomOpt = Annotated[
    str, typer.Option("--phantom", help="phantom kind for the parity input (cxr, mammo, ct, mr; 'none')")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite existing files in the output folder")]
KindOpt = Annotated[
    str,
    typer.Option("--kind", help="classification, or segmentation (per-pixel / per-voxel output)"),
]
LabelsOpt = Annotated[
    str | None,
    typer.Option("--labels", help="label names per output channel, comma-separated (background included)"),
]
CodeOpt = Annotated[
    list[str] | None,
    typer.Option("--code", help="NAME=SCHEME:VALUE:MEANING, e.g. liver=SCT:10200004:Liver (repeatable)"),
]
CategoryOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--category",
        help="segmentation: [NAME=]SCHEME:VALUE:MEANING, e.g. SCT:91723000:Anatomical structure (repeatable)",
    ),
]
ThresholdOpt = Annotated[
    list[str] | None, typer.Option("--threshold", help="NAME=VALUE per-label threshold (repeatable)")
]
BackgroundOpt = Annotated[
    int | None, typer.Option("--background-index", help="segmentation, softmax: the background channel")
]
SegActivationOpt = Annotated[
    str | None,
    typer.Option("--activation", help="segmentation: softmax (argmax), sigmoid (threshold), none (applied)"),
]
MinAreaOpt = Annotated[
    int, typer.Option("--min-area", help="2-D segmentation: smallest kept component (model-input pixels)")
]
MinVolumeOpt = Annotated[
    int, typer.Option("--min-volume", help="3-D segmentation: smallest kept component (model-input voxels)")
]
OverlapOpt = Annotated[float, typer.Option("--overlap", help="3-D segmentation: sliding-window overlap")]
BlendOpt = Annotated[str, typer.Option("--blend", help="3-D segmentation: gaussian or constant")]
RegionOpt = Annotated[
    str | None,
    typer.Option("--region", help="segmentation: anatomic region SCHEME:VALUE:MEANING (SCT:10200004:Liver)"),
]


@dataclass
class Converted:
    """What a conversion produced."""

    out_dir: Path
    onnx_path: Path
    output_names: list[str]
    parity: list[ParityResult]
    manifest_path: Path

    @property
    def ok(self) -> bool:
        """Whether every parity check passed."""
        return all(p.ok for p in self.parity)


def _model_id(out_dir: Path, model_id: str | None) -> str:
    mid = (model_id or out_dir.resolve().name).lower()
    if not mid or not (mid[0].isalnum() and all(ch.isalnum() or ch in "_.-" for ch in mid)):
        raise ConversionError(f"model id {mid!r} is invalid: use lower-case letters, digits, '_', '.', '-'")
    return mid


def finish(
    *,
    out_dir: Path,
    model_id: str,
    onnx_path: Path,
    output_names: Sequence[str],
    reference: Callable[[np.ndarray], Sequence[np.ndarray]],
    shape: Sequence[int],
    layout: str,
    phantom: str | None,
    atol: float,
    rtol: float,
    fp16: bool,
    fp16_atol: float,
    activation: str | None,
    kind: str | None,
    framework: str,
    source: str,
    echo: Callable[[str], None] = print,
    segmentation: SegmentationOptions | None = None,
    label_options: LabelOptions | None = None,
) -> Converted:
    """Parity (fp32, and fp16 when asked), manifest scaffold and parity.json for an exported model.

    ``segmentation``: a per-pixel model (``kind: segmentation``); the parity figures then include the
    per-pixel class agreement, and the scaffold its segmentation section. ``label_options``: label
    names and codes given on the command line."""
    import onnx

    graph = onnx.load(str(onnx_path))
    n_outputs = int(graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value or 1)
    seg_plan = None
    threshold = None
    if segmentation is not None:
        seg_plan = plan_segmentation(
            segmentation, channels=n_outputs, input_shape=shape[1:], detected=activation
        )
        threshold = per_pixel_threshold(seg_plan.activation)
    inputs = parity_inputs(shape, layout, phantom)
    results = [check_parity(onnx_path, reference, inputs, output_names, atol, rtol, threshold)]
    echo(f"parity of {onnx_path.name} (source framework vs ONNX Runtime CPU):")
    for line in results[0].lines():
        echo(line)
    if fp16:
        half = onnx_path.with_name(FP16_FILE)
        write_fp16(onnx_path, half)
        results.append(check_parity(half, reference, inputs, output_names, fp16_atol, fp16_atol, threshold))
        echo(f"parity of {half.name} (fp16 weights and compute, float32 input/output):")
        for line in results[1].lines():
            echo(line)
    metrics = {"parity_max_abs": results[0].max_abs, "parity_max_rel": results[0].max_rel}
    if results[0].agreement is not None:
        metrics["parity_pixel_agreement"] = results[0].agreement
    if fp16:
        metrics |= {"parity_fp16_max_abs": results[1].max_abs, "parity_fp16_max_rel": results[1].max_rel}
        if results[1].agreement is not None:
            metrics["parity_fp16_pixel_agreement"] = results[1].agreement
    labels = None
    if seg_plan is not None:
        labels, activation, kind = seg_plan.labels, seg_plan.activation, "segmentation"
    elif label_options is not None and label_options.names is not None:
        labels = label_options.entries(n_outputs)
    manifest = write_manifest_scaffold(
        out_dir,
        model_id=model_id,
        onnx_path=onnx_path,
        input_name=graph.graph.input[0].name,
        input_shape=list(shape),
        layout=layout,
        probabilities=output_names[0],
        n_outputs=n_outputs,
        cam=output_names[1] if len(output_names) > 1 else None,
        activation=activation,
        kind=kind,
        framework=framework,
        source=source,
        metrics=metrics,
        labels=labels,
        segmentation=seg_plan.section if seg_plan is not None else None,
    )
    write_parity_json(
        out_dir, results, {"source": source, "framework": framework, "outputs": list(output_names)}
    )
    echo(
        f"wrote {onnx_path}{' and ' + FP16_FILE if fp16 else ''}, {manifest.name} "
        "(fill in the TODOs), parity.json"
    )
    return Converted(out_dir, onnx_path, list(output_names), results, manifest)


def convert_torch(
    *,
    out_dir: Path,
    model: str | None = None,
    weights: Path | None = None,
    torchscript: Path | None = None,
    input_shape: Sequence[int],
    model_id: str | None = None,
    cam: bool = False,
    cam_pool: str | None = None,
    cam_linear: str | None = None,
    cam_features: str | None = None,
    fp16: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    fp16_atol: float = 2e-2,
    opset: int = DEFAULT_OPSET,
    phantom: str | None = "cxr",
    force: bool = False,
    threads: int = 1,
    echo: Callable[[str], None] = print,
    segmentation: SegmentationOptions | None = None,
    label_options: LabelOptions | None = None,
) -> Converted:
    """Convert a PyTorch model (``module:factory`` + weights, or TorchScript); see :mod:`converters.cli`.

    ``segmentation``: the model outputs per-pixel (C,H,W input) or per-voxel (C,D,H,W input)
    class scores; a ``kind: segmentation`` manifest is written (no CAM)."""
    from converters import torch_convert as tc

    check_opset(opset)
    mid = _model_id(out_dir, model_id)
    if (model is None) == (torchscript is None):
        raise ConversionError("give either --model module:factory (with --weights) or --torchscript FILE")
    if segmentation is not None and cam:
        raise ConversionError(
            "--cam is for classifiers (a class activation map of a global-average-pool + linear head); "
            "a segmentation model's masks are its picture: drop --cam with --kind segmentation"
        )
    if segmentation is None and len(input_shape) == 4 and cam:
        raise ConversionError(
            f"--input-shape {','.join(str(d) for d in input_shape)} is a volume (C,D,H,W): a volume "
            "classifier has no CAM output yet; drop --cam"
        )
    if segmentation is not None:
        segmentation.labels = label_options or segmentation.labels
    prepare_out_dir(out_dir, force, OUTPUT_FILES)
    tc.torch.set_num_threads(max(1, threads))
    if torchscript is not None:
        net = tc.load_torchscript(torchscript)
        source = str(torchscript)
    else:
        assert model is not None
        net = tc.load_factory(model)
        if weights is not None:
            tc.load_weights(net, weights)
        else:
            echo("warning: no --weights given: exporting the factory's initial weights")
        source = f"{model}" + (f" + {weights}" if weights else "")
    onnx_path = out_dir / MODEL_FILE
    module, names = tc.export_torch(
        net,
        onnx_path,
        input_shape,
        cam=cam,
        cam_pool=cam_pool,
        cam_linear=cam_linear,
        cam_features=cam_features,
        opset=opset,
        segmentation=segmentation is not None,
    )
    if segmentation is not None:
        activation, kind = tc.detect_pixel_activation(module, input_shape), "segmentation"
        if phantom == "cxr":
            phantom = "ct"  # a slice (or slices) of a CT phantom, not a radiograph
    else:
        activation, kind = tc.detect_activation(net)
    return finish(
        out_dir=out_dir,
        model_id=mid,
        onnx_path=onnx_path,
        output_names=names,
        reference=tc.reference_fn(module),
        shape=(1, *input_shape),
        layout="NCDHW" if len(input_shape) == 4 else "NCHW",
        phantom=phantom,
        atol=atol,
        rtol=rtol,
        fp16=fp16,
        fp16_atol=fp16_atol,
        activation=activation,
        kind=kind,
        framework=f"torch {tc.torch.__version__} -> ONNX opset {opset}",
        source=source,
        echo=echo,
        segmentation=segmentation,
        label_options=label_options,
    )


def _custom_objects(spec: str | None) -> dict[str, Any] | None:
    if not spec:
        return None
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(spec)
    except Exception as exc:
        raise ConversionError(f"cannot import --custom-objects module {spec!r}: {exc}") from exc
    objects = getattr(module, "CUSTOM_OBJECTS", None)
    if isinstance(objects, dict):
        return objects
    return {k: v for k, v in vars(module).items() if isinstance(v, type) and not k.startswith("_")}


def convert_keras(
    *,
    out_dir: Path,
    model_file: Path,
    model_id: str | None = None,
    input_shape: Sequence[int] | None = None,
    custom_objects: str | None = None,
    cam: bool = False,
    fp16: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    fp16_atol: float = 2e-2,
    opset: int = DEFAULT_OPSET,
    phantom: str | None = "cxr",
    force: bool = False,
    threads: int = 1,
    echo: Callable[[str], None] = print,
) -> Converted:
    """Convert a Keras ``.keras`` / ``.h5`` model; see :mod:`converters.cli`."""
    check_opset(opset)
    mid = _model_id(out_dir, model_id)
    prepare_out_dir(out_dir, force, OUTPUT_FILES)
    from converters import keras_convert as kc

    keras_model = kc.load_keras(model_file, _custom_objects(custom_objects))
    import torch

    torch.set_num_threads(max(1, threads))
    hwc = kc.input_shape(keras_model, input_shape)
    onnx_path = out_dir / MODEL_FILE
    exported, names = kc.export_keras(keras_model, onnx_path, hwc, cam=cam, opset=opset)
    activation, kind = kc.detect_activation(keras_model)
    keras = kc._keras()
    return finish(
        out_dir=out_dir,
        model_id=mid,
        onnx_path=onnx_path,
        output_names=names,
        reference=kc.reference_fn(exported),
        shape=(1, *hwc),
        layout="NHWC",
        phantom=phantom,
        atol=atol,
        rtol=rtol,
        fp16=fp16,
        fp16_atol=fp16_atol,
        activation=activation,
        kind=kind,
        framework=f"keras {keras.__version__} (torch backend) -> ONNX opset {opset}",
        source=str(model_file),
        echo=echo,
    )


def convert_monai_bundle(
    *,
    bundle_dir: Path,
    out_dir: Path,
    model_id: str | None = None,
    cam: bool = False,
    normal: str | None = None,
    activation: str | None = None,
    fp16: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    fp16_atol: float = 2e-2,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    threads: int = 1,
    echo: Callable[[str], None] = print,
    label_options: LabelOptions | None = None,
) -> Converted:
    """Convert a MONAI bundle folder (configs/metadata.json, configs/inference.json, models/model.pt)
    to a model folder whose manifest the node accepts; see :mod:`converters.monai_bundle`.

    A bundle whose output is per pixel (``network_data_format`` output type image/label, or a
    network returning (batch, classes, H, W)) becomes a 2-D ``kind: segmentation`` model: see
    :func:`_convert_segmentation_bundle`. ``label_options``: codes and categories by label name."""
    import yaml

    from converters import monai_bundle as mb
    from converters import torch_convert as tc

    check_opset(opset)
    mid = _model_id(out_dir, model_id)
    bundle = mb.read_bundle(bundle_dir)
    shape_meta = bundle.input_format.get("spatial_shape") or []
    if len(shape_meta) == 3:
        raise ConversionError(
            f"a 3-D bundle (network_data_format spatial_shape {shape_meta}): its volume preprocessing "
            "(LoadImage of a series, Spacing, Orientation, ...) is not mapped onto the node's steps; "
            "convert a 3-D segmentation network with `convert torch --kind segmentation --input-shape "
            "C,D,H,W` and write its preprocessing by hand. Bundle conversion takes 2-D bundles (one "
            "2-D image, N, C, H, W, per slice): classifiers and segmentation models"
        )
    mapped = mb.map_transforms(mb.bundle_transforms(bundle), bundle.input_key)
    mb.describe(mapped, echo)
    channels = int(bundle.input_format.get("num_channels") or mapped.channels)
    if channels != mapped.channels:
        if mapped.channels != 1:
            raise ConversionError(
                f"the bundle's preprocessing gives {mapped.channels} channels; its network takes {channels}"
            )
        mapped.steps.append({"op": "replicate_channels", "channels": channels})
        mapped.notes.append(f"(grey DICOM image replicated into the network's {channels} channels)")
        echo(f"warning: the network takes {channels} channels; grey images are replicated into them")
    prepare_out_dir(out_dir, force, OUTPUT_FILES)
    tc.torch.set_num_threads(max(1, threads))
    net = mb.bundle_network(bundle)
    if not isinstance(net, tc.nn.Module):
        raise ConversionError(f"network_def built a {type(net).__name__}, not a torch.nn.Module")
    weights = bundle_dir / "models" / "model.pt"
    if not weights.is_file():
        raise ConversionError(f"the bundle has no weights file models/model.pt ({weights})")
    tc.load_weights(net, weights)
    h, w = mapped.size  # type: ignore[misc]
    if mb.is_segmentation_output(bundle.output_format) or _per_pixel(net, (channels, w, h)):
        if cam:
            raise ConversionError(
                "--cam is for classifiers; this bundle's network outputs per-pixel classes (a segmentation "
                "model, whose masks are its picture): drop --cam"
            )
        return _convert_segmentation_bundle(
            bundle=bundle,
            net=net,
            mapped=mapped,
            channels=channels,
            out_dir=out_dir,
            model_id=mid,
            activation=activation,
            fp16=fp16,
            atol=atol,
            rtol=rtol,
            fp16_atol=fp16_atol,
            opset=opset,
            echo=echo,
            label_options=label_options or LabelOptions(),
        )
    act = activation or mb.bundle_activation(bundle)
    detected, detected_kind = tc.detect_activation(net)
    if act is None and detected is None:
        raise ConversionError(
            "the bundle's postprocessing has no Activations(d) and the network ends in neither Sigmoid "
            "nor Softmax: give --activation sigmoid|softmax"
        )
    kind = {"sigmoid": "multi_label", "softmax": "multi_class"}.get(act or "", detected_kind)
    onnx_path = out_dir / MODEL_FILE
    input_shape = (channels, h, w)
    module, names = tc.export_torch(net, onnx_path, input_shape, cam=cam, swap_xy=mapped.swap_xy, opset=opset)
    modalities = mb.routing_modalities(bundle.input_format)
    phantom = "ct" if "CT" in modalities else "mr" if "MR" in modalities else "cxr"
    result = finish(
        out_dir=out_dir,
        model_id=mid,
        onnx_path=onnx_path,
        output_names=names,
        reference=tc.reference_fn(module),
        shape=(1, *input_shape),
        layout="NCHW",
        phantom=phantom,
        atol=atol,
        rtol=rtol,
        fp16=fp16,
        fp16_atol=fp16_atol,
        activation=act if act is not None else "none",
        kind=kind,
        framework=f"MONAI {mb._monai().__version__}, torch {tc.torch.__version__} -> ONNX opset {opset}",
        source=f"MONAI bundle {bundle_dir}",
        echo=echo,
    )
    scaffold = yaml.safe_load(result.manifest_path.read_text(encoding="utf-8"))
    labels = mb.label_names(bundle.output_format, len(scaffold["labels"]))
    normal_label = mb.pick_normal(labels, normal) if kind == "multi_class" else None
    data = mb.manifest_from_bundle(
        scaffold,
        bundle=bundle,
        mapped=mapped,
        activation=act if act is not None else "none",
        kind=str(kind),
        labels=labels,
        normal=normal_label,
    )
    mb.write_bundle_manifest(result.manifest_path, data, bundle, mapped)
    echo(f"wrote {result.manifest_path} from the bundle (labels {[n for n, _ in labels]}; codes are private)")
    return result


def _per_pixel(net: Any, shape: Sequence[int]) -> bool:
    """Whether ``net`` returns per-pixel scores (rank >= 4) on one input of ``shape``."""
    import torch

    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(1, *[int(d) for d in shape]))
    except Exception:  # the export reports the failure with its context
        return False
    if isinstance(out, (tuple, list)):
        out = out[0]
    return isinstance(out, torch.Tensor) and out.ndim >= 4


def _convert_segmentation_bundle(
    *,
    bundle: Any,
    net: Any,
    mapped: Any,
    channels: int,
    out_dir: Path,
    model_id: str,
    activation: str | None,
    fp16: bool,
    atol: float,
    rtol: float,
    fp16_atol: float,
    opset: int,
    echo: Callable[[str], None],
    label_options: LabelOptions,
) -> Converted:
    """A 2-D segmentation bundle: the postprocessing (``Activations``, ``AsDiscrete`` argmax or
    threshold, ``RemoveSmallObjects``) and the inferer (``SimpleInferer``, or a
    ``SlidingWindowInferer`` covering the image) mapped onto a ``kind: segmentation`` manifest;
    labels from ``channel_def`` (its background channel the argmax's ``background_index``)."""
    import yaml

    from converters import monai_bundle as mb
    from converters import torch_convert as tc

    post = mb.segmentation_postprocessing(bundle)
    h, w = mapped.size
    mb.check_inferer(bundle, (w, h) if mapped.swap_xy else (h, w), post.notes)
    for note in post.notes:
        echo(f"  {note}")
    mapped.notes.extend(post.notes)
    onnx_path = out_dir / MODEL_FILE
    input_shape = (channels, h, w)
    module, names = tc.export_torch(
        net, onnx_path, input_shape, swap_xy=mapped.swap_xy, opset=opset, segmentation=True
    )
    with tc.torch.no_grad():
        n_out = int(module(tc.torch.zeros(1, *input_shape)).shape[1])
    act = activation or post.activation
    if act is None and post.argmax:
        act = "softmax"  # argmax of the logits is the argmax of their softmax
    if act is None:
        act = tc.detect_pixel_activation(module, input_shape)
    if act is None:
        raise ConversionError(
            "the bundle's postprocessing has neither Activations(d) nor AsDiscrete(d) argmax, and the "
            "network does not end in Sigmoid/Softmax: give --activation sigmoid|softmax"
        )
    background = None
    if act == "softmax" or post.argmax:
        background = mb.background_channel(bundle.output_format, n_out)
    labels = mb.segmentation_labels(bundle.output_format, n_out, background, act == "sigmoid")
    modalities = mb.routing_modalities(bundle.input_format)
    result = finish(
        out_dir=out_dir,
        model_id=model_id,
        onnx_path=onnx_path,
        output_names=names,
        reference=tc.reference_fn(module),
        shape=(1, *input_shape),
        layout="NCHW",
        phantom="mr" if "MR" in modalities else "ct",
        atol=atol,
        rtol=rtol,
        fp16=fp16,
        fp16_atol=fp16_atol,
        activation=act,
        kind="segmentation",
        framework=f"MONAI {mb._monai().__version__}, torch {tc.torch.__version__} -> ONNX opset {opset}",
        source=f"MONAI bundle {bundle.root}",
        echo=echo,
        segmentation=SegmentationOptions(
            background_index=background, activation=act, min_area_px=post.min_area_px
        ),
    )
    scaffold = yaml.safe_load(result.manifest_path.read_text(encoding="utf-8"))
    known = {name for _, name, _ in labels}
    unknown = sorted((set(label_options.codes) | set(label_options.categories)) - known)
    if unknown:
        raise ConversionError(f"--code/--category name {unknown}, not labels of the bundle {sorted(known)}")
    data = mb.segmentation_manifest_from_bundle(
        scaffold,
        bundle=bundle,
        mapped=mapped,
        post=post,
        activation=act,
        background=background,
        labels=labels,
        codes=label_options.codes,
        categories=label_options.categories,
        default_category=label_options.default_category,
    )
    mb.write_bundle_manifest(result.manifest_path, data, bundle, mapped)
    echo(
        f"wrote {result.manifest_path} from the bundle (segments {[n for _, n, _ in labels]}"
        + (f", background channel {background}" if background is not None else "")
        + "; codes and categories are private unless given)"
    )
    return result


def _run(fn: Callable[..., Converted], **kwargs: Any) -> None:
    try:
        result = fn(echo=typer.echo, **kwargs)
    except ConversionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not result.ok:
        typer.echo("error: parity above tolerance; do not deploy this model as converted", err=True)
        raise typer.Exit(1)


@app.command("torch")
def torch_cmd(
    out: OutOpt,
    input_shape: Annotated[
        str,
        typer.Option(
            "--input-shape",
            help="C,H,W of one image, e.g. 1,224,224 (segmentation: or C,D,H,W of a volume window)",
        ),
    ],
    model: Annotated[
        str | None, typer.Option("--model", help="module:factory building the nn.Module")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="state dict (.pt/.pth) for --model")
    ] = None,
    torchscript: Annotated[
        Path | None, typer.Option("--torchscript", help="TorchScript file instead")
    ] = None,
    model_id: IdOpt = None,
    kind: KindOpt = "classification",
    labels: LabelsOpt = None,
    code: CodeOpt = None,
    category: CategoryOpt = None,
    threshold: ThresholdOpt = None,
    background_index: BackgroundOpt = None,
    activation: SegActivationOpt = None,
    min_area: MinAreaOpt = 0,
    min_volume: MinVolumeOpt = 0,
    overlap: OverlapOpt = 0.25,
    blend: BlendOpt = "gaussian",
    region: RegionOpt = None,
    cam: CamOpt = False,
    cam_pool: Annotated[str | None, typer.Option(help="name of the GAP module (default: the last)")] = None,
    cam_linear: Annotated[
        str | None, typer.Option(help="name of the linear head (default: the last)")
    ] = None,
    cam_features: Annotated[
        str | None,
        typer.Option(help="module whose output is the feature map, when the pool is functional"),
    ] = None,
    fp16: Fp16Opt = False,
    atol: AtolOpt = 1e-4,
    rtol: AtolOpt = 1e-3,
    fp16_atol: AtolOpt = 2e-2,
    opset: OpsetOpt = DEFAULT_OPSET,
    phantom: PhantomOpt = "cxr",
    force: ForceOpt = False,
) -> None:
    """PyTorch (module:factory + weights, or TorchScript) -> ONNX (NCHW, or NCDHW for a 3-D
    segmentation model; dynamic batch)."""
    try:
        if kind not in ("classification", "segmentation"):
            raise ConversionError(f"--kind must be classification or segmentation, got {kind!r}")
        shape = parse_shape(input_shape, volume=True)
        label_options = LabelOptions.parse(labels, code or (), category or (), threshold or ())
        seg = None
        if kind == "segmentation":
            seg = SegmentationOptions(
                labels=label_options,
                background_index=background_index,
                activation=activation,
                min_area_px=min_area,
                min_volume_voxels=min_volume,
                overlap=overlap,
                blend=blend,
                anatomic_region=parse_code(region, "--region") if region else None,
            )
        else:
            given = {
                "--background-index": background_index is not None,
                "--activation": activation is not None,
                "--min-area": bool(min_area),
                "--min-volume": bool(min_volume),
                "--region": region is not None,
                "--category": bool(category),
            }
            extra = [k for k, v in given.items() if v]
            if extra:
                raise ConversionError(f"{', '.join(extra)}: only with --kind segmentation")
    except ConversionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _run(
        convert_torch,
        out_dir=out,
        model=model,
        weights=weights,
        torchscript=torchscript,
        input_shape=shape,
        model_id=model_id,
        cam=cam,
        cam_pool=cam_pool,
        cam_linear=cam_linear,
        cam_features=cam_features,
        fp16=fp16,
        atol=atol,
        rtol=rtol,
        fp16_atol=fp16_atol,
        opset=opset,
        phantom=None if phantom == "none" else phantom,
        force=force,
        segmentation=seg,
        label_options=label_options,
    )


@app.command("monai-bundle")
def monai_bundle_cmd(
    bundle_dir: Annotated[Path, typer.Argument(help="MONAI bundle folder (configs/, models/model.pt)")],
    out: OutOpt,
    model_id: IdOpt = None,
    cam: CamOpt = False,
    normal: Annotated[
        str | None, typer.Option("--normal", help="the normal label of a softmax model (default: by name)")
    ] = None,
    activation: Annotated[
        str | None,
        typer.Option("--activation", help="sigmoid|softmax when the bundle's postprocessing does not say"),
    ] = None,
    fp16: Fp16Opt = False,
    atol: AtolOpt = 1e-4,
    rtol: AtolOpt = 1e-3,
    fp16_atol: AtolOpt = 2e-2,
    opset: OpsetOpt = DEFAULT_OPSET,
    force: ForceOpt = False,
    code: CodeOpt = None,
    category: CategoryOpt = None,
) -> None:
    """MONAI bundle -> ONNX + a manifest whose preprocessing is the bundle's mapped transforms (a
    classifier, or a 2-D segmentation model when the bundle's output is per pixel)."""
    if activation not in (None, "sigmoid", "softmax"):
        typer.echo(f"error: --activation must be sigmoid or softmax, got {activation!r}", err=True)
        raise typer.Exit(2)
    try:
        codes, default_code = parse_named_codes(code or (), "--code")
        if default_code is not None:
            raise ConversionError("--code needs NAME=SCHEME:VALUE:MEANING (NAME: a label of the bundle)")
        categories, default_category = parse_named_codes(category or (), "--category")
    except ConversionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    label_options = LabelOptions(codes=codes, categories=categories, default_category=default_category)
    _run(
        convert_monai_bundle,
        bundle_dir=bundle_dir,
        out_dir=out,
        model_id=model_id,
        cam=cam,
        normal=normal,
        activation=activation,
        fp16=fp16,
        atol=atol,
        rtol=rtol,
        fp16_atol=fp16_atol,
        opset=opset,
        force=force,
        label_options=label_options,
    )


@app.command("keras")
def keras_cmd(
    model_file: Annotated[Path, typer.Argument(help=".keras or .h5 model file")],
    out: OutOpt,
    model_id: IdOpt = None,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="H,W,C when the model's input has free dims")
    ] = None,
    custom_objects: Annotated[
        str | None,
        typer.Option("--custom-objects", help="module defining custom layers (CUSTOM_OBJECTS dict)"),
    ] = None,
    cam: CamOpt = False,
    fp16: Fp16Opt = False,
    atol: AtolOpt = 1e-4,
    rtol: AtolOpt = 1e-3,
    fp16_atol: AtolOpt = 2e-2,
    opset: OpsetOpt = DEFAULT_OPSET,
    phantom: PhantomOpt = "cxr",
    force: ForceOpt = False,
) -> None:
    """Keras 3 (.keras / .h5) -> ONNX through the torch backend (NHWC, dynamic batch)."""
    try:
        shape = parse_shape(input_shape) if input_shape else None
    except ConversionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    _run(
        convert_keras,
        out_dir=out,
        model_file=model_file,
        model_id=model_id,
        input_shape=shape,
        custom_objects=custom_objects,
        cam=cam,
        fp16=fp16,
        atol=atol,
        rtol=rtol,
        fp16_atol=fp16_atol,
        opset=opset,
        phantom=None if phantom == "none" else phantom,
        force=force,
    )
