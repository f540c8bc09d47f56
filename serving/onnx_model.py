"""An ONNX Runtime session for one model artifact, tuned for small models on few cores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.artifact import ONNX_FILE, ModelManifest, load_manifest
from serving.errors import InvalidInput

ORT_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


def session_options(threads: int = 1) -> ort.SessionOptions:
    """One thread, no spinning, all graph optimizations.

    Measured in docs/benchmarks.md (`make bench-onnx`): for a model this small, more
    threads only add synchronisation, and spinning threads steal the CPU that HTTP,
    JSON and Feast need on a 2-core machine.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxModel:
    """A loaded artifact: its manifest, its session and its Open Inference Protocol metadata."""

    def __init__(self, directory: str | Path, threads: int = 1):
        self.directory = Path(directory).resolve()  # follow `current` once, so a later switch can't mix files
        self.manifest: ModelManifest = load_manifest(self.directory)
        self.session = ort.InferenceSession(str(self.directory / ONNX_FILE), sess_options=session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def version(self) -> str:
        return self.manifest.version

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on named input arrays; returns named outputs."""
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))

    def input_specs(self) -> list[dict[str, Any]]:
        """Inputs as the validator needs them: name, datatype, shape and the allowed value range."""
        ranges = self.manifest.extra.get("input_ranges", {})
        return [{**_describe(node), "range": tuple(ranges.get(node.name, (None, None)))}
                for node in self.session.get_inputs()]

    def metadata(self) -> dict[str, Any]:
        """`GET /v2/models/{name}` body, read from the session itself."""
        return {
            "name": self.manifest.name,
            "versions": [self.manifest.version],
            "platform": "onnxruntime_onnx",
            "inputs": [_describe(node) for node in self.session.get_inputs()],
            "outputs": [_describe(node) for node in self.session.get_outputs()],
            "parameters": {"feature_service": self.manifest.feature_service,
                           "training_window": self.manifest.training_window},
        }


def _describe(node: Any) -> dict[str, Any]:
    """Open Inference Protocol tensor metadata of a session input or output (-1 = dynamic)."""
    shape = [dim if isinstance(dim, int) else -1 for dim in node.shape]
    return {"name": node.name, "datatype": ORT_TYPES.get(node.type, node.type), "shape": shape}


class ServedOnnxModel:
    """The Open Inference Protocol side of a deployment that holds an `OnnxModel` in `self.model`."""

    model: OnnxModel

    def infer(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw model inference; the ingress has already validated names, datatypes, shapes and ranges."""
        try:
            return self.model.run(tensors)
        except Exception as exc:  # ONNX Runtime refusing what the validator could not foresee: the input's fault
            raise InvalidInput(f"inputs: the model refused these tensors: {exc}", field="inputs",
                               rule="must be valid input for the model") from exc

    def metadata(self) -> dict[str, Any]:
        """Open Inference Protocol model metadata."""
        return self.model.metadata()

    def input_specs(self) -> list[dict[str, Any]]:
        """Input names, datatypes, shapes and value ranges, for the ingress's validator."""
        return self.model.input_specs()

    def check_health(self) -> None:
        """Ray Serve restarts the replica if this raises: the session must still answer."""
        zeros = {spec["name"]: np.zeros([1 if d == -1 else d for d in spec["shape"]],
                                        dtype=np.int64 if spec["datatype"] == "INT64" else np.float32)
                 for spec in self.model.input_specs()}
        low = {spec["name"]: spec["range"][0] for spec in self.model.input_specs() if spec["range"][0] is not None}
        for name, value in low.items():
            zeros[name][...] = value  # e.g. a 1-based position must not be 0
        self.model.run(zeros)
