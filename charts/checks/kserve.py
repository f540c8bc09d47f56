"""How KServe picks the serving runtime of an InferenceService, checked on the rendered chart.

An InferenceService without `predictor.model.runtime` gets the runtime KServe's controller picks
(pkg/apis/serving/v1beta1/predictor_model.go, `GetSupportingRuntimes`): among enabled,
single-model, single-node runtimes that list the model format with `autoSelect: true` and the
exact protocol version, namespace ServingRuntimes come before ClusterServingRuntimes, and within
each list the higher `priority` for that format wins. With a runtime named, KServe uses it if it
lists the format at all (autoSelect does not matter then).

The runtimes below are KServe's own ClusterServingRuntimes (config/runtimes/*.yaml), as recorded
from the kserve/kserve sources of the v0.21 line (the CRDs are pinned at aaac4e29): only the
fields the selection reads. `kserve-openvino` (onnx priority 2) outranks `kserve-tritonserver`
(onnx priority 1) wherever both are installed, so the chart names its runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KSERVE_COMMIT = "aaac4e294dae2c7b1aa1886447793f3aa1c30912"


@dataclass(frozen=True)
class ModelFormat:
    """One entry of a runtime's supportedModelFormats."""

    name: str
    version: str | None = None
    auto_select: bool = False
    priority: int | None = None


@dataclass(frozen=True)
class Runtime:
    """The parts of a (Cluster)ServingRuntime the selection reads."""

    name: str
    formats: tuple[ModelFormat, ...]
    protocols: tuple[str, ...]
    cluster_scoped: bool = True
    disabled: bool = False
    multi_model: bool = False

    def priority(self, format_name: str) -> int | None:
        """GetPriority: the priority of the first entry with that name (version and autoSelect ignored)."""
        return next((f.priority for f in self.formats if f.name == format_name), None)

    def supports(self, format_name: str, protocol: str, named: bool) -> bool:
        """RuntimeSupportsModel and IsProtocolVersionSupported, as GetSupportingRuntimes filters."""
        lists_format = any(f.name == format_name and (named or f.auto_select) for f in self.formats)
        protocol_ok = not self.protocols or protocol in self.protocols
        return not self.disabled and not self.multi_model and lists_format and protocol_ok


# config/runtimes/kserve-tritonserver.yaml and kserve-openvino.yaml (onnx-relevant fields).
KSERVE_RUNTIMES: tuple[Runtime, ...] = (
    Runtime("kserve-tritonserver",
            (ModelFormat("tensorrt", "8", True, 1), ModelFormat("tensorflow", "1", True, 1),
             ModelFormat("tensorflow", "2", True, 1), ModelFormat("onnx", "1", True, 1),
             ModelFormat("pytorch", "1"), ModelFormat("triton", "2", True, 1)),
            ("v2", "grpc-v2")),
    Runtime("kserve-openvino",
            (ModelFormat("openvino", "10", True, 1), ModelFormat("onnx", "1", True, 2),
             ModelFormat("tensorflow", "1", True, 3), ModelFormat("huggingface", None, True)),
            ("v1", "v2", "grpc-v2")),
    Runtime("kserve-ovms", (ModelFormat("onnx", "1"),), ("v1", "v2", "grpc-v2")),
)


def model_spec(isvc: dict[str, Any]) -> tuple[str, str, str | None]:
    """(format, protocol, named runtime) of an InferenceService's predictor.model."""
    model = isvc["spec"]["predictor"]["model"]
    return model["modelFormat"]["name"], model.get("protocolVersion", "v1"), model.get("runtime")


def select_runtime(isvc: dict[str, Any], runtimes: tuple[Runtime, ...] = KSERVE_RUNTIMES) -> str | None:
    """The runtime KServe would run this InferenceService with, or None ("No runtime found")."""
    fmt, protocol, named = model_spec(isvc)
    if named:
        runtime = next((r for r in runtimes if r.name == named), None)
        return named if runtime and runtime.supports(fmt, protocol, named=True) else None
    ordered: list[Runtime] = []
    for scope in (False, True):  # namespace runtimes first, then cluster runtimes, each sorted by priority
        eligible = [r for r in runtimes if r.cluster_scoped == scope and r.supports(fmt, protocol, named=False)]
        ordered += sorted(eligible, key=lambda r: (r.priority(fmt) is None, -(r.priority(fmt) or 0)))
    return ordered[0].name if ordered else None
