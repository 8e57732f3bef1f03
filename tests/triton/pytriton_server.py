"""A PyTriton server for the tests: serves ONNX models through onnxruntime on loopback.

Run with the PyTriton environment's Python (not the node's venv: nvidia-pytriton needs numpy<2):

    python tests/triton/pytriton_server.py SPEC.json

SPEC.json: ``{"http_port": int, "grpc_port": int, "metrics_port": int, "models": [{"name", "onnx",
"input": {"name", "dtype", "dims"}, "outputs": [{"name", "dtype", "dims"}], "max_batch_size"}],
"failing": [{"name", "message", "input": {...}, "outputs": [...]}]}``. A "failing" model raises
its message from its inference function (a server-side error the client must pass on). Prints
``PYTRITON-SPEC-READY`` on stdout once the server answers, then serves until SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

log = logging.getLogger("pytriton_server")
_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}


#: markers the test fixture looks for anywhere in a line (tritonserver's own log lines are
#: interleaved with ours on the same pipe, even inside a line)
READY = "PYTRITON-SPEC-READY"
BATCHES = "PYTRITON-SPEC-BATCHES "


def _tensor(spec: dict[str, Any]) -> Tensor:
    return Tensor(name=spec["name"], dtype=_DTYPES[spec["dtype"]], shape=tuple(spec["dims"]))


def _onnx_function(spec: dict[str, Any]) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(spec["onnx"], sess_options=options, providers=["CPUExecutionProvider"])
    input_name = spec["input"]["name"]
    output_names = [o["name"] for o in spec["outputs"]]
    sizes: list[int] = []
    spec_sizes = spec.setdefault("_sizes", sizes)

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        x = inputs[input_name]
        spec_sizes.append(int(x.shape[0]))
        values = session.run(output_names, {input_name: x})
        return dict(zip(output_names, values, strict=True))

    return infer


def _failing_function(message: str) -> Any:
    @batch
    def infer(**_inputs: np.ndarray) -> dict[str, np.ndarray]:
        raise ValueError(message)

    return infer


def main() -> None:
    """Bind every model of the spec and serve."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=spec["http_port"],
        grpc_address="127.0.0.1",
        grpc_port=spec["grpc_port"],
        metrics_port=spec["metrics_port"],
        allow_metrics=False,
        exit_on_error=True,
        exit_timeout_secs=5,
        log_verbose=0,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Triton(config=config) as triton:
        for m in spec["models"]:
            triton.bind(
                model_name=m["name"],
                infer_func=_onnx_function(m),
                inputs=[_tensor(m["input"])],
                outputs=[_tensor(o) for o in m["outputs"]],
                config=ModelConfig(
                    max_batch_size=m["max_batch_size"],
                    batcher=DynamicBatcher(max_queue_delay_microseconds=m.get("queue_delay_us", 2000)),
                ),
                strict=True,
            )
        for m in spec.get("failing", []):
            triton.bind(
                model_name=m["name"],
                infer_func=_failing_function(m["message"]),
                inputs=[_tensor(m["input"])],
                outputs=[_tensor(o) for o in m["outputs"]],
                config=ModelConfig(max_batch_size=m["max_batch_size"]),
            )
        triton.run()
        print(f"\n{READY}", flush=True)  # own line: tritonserver writes to the same pipe
        stop.wait()
        sizes = {m["name"]: m.get("_sizes", []) for m in spec["models"]}
        print(f"\n{BATCHES}" + json.dumps(sizes), flush=True)


if __name__ == "__main__":
    main()
