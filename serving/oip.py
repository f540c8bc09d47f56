"""The Open Inference Protocol's wire formats: JSON bodies and the binary tensor data extension.

KServe's `InferenceRESTClient` and Triton's `tritonclient.http` send tensors as raw bytes by default:
a JSON header of `Inference-Header-Content-Length` bytes, then each input whose
`parameters.binary_data_size` is set, in order, little-endian, row-major, no padding. The decoder
turns those bytes back into values and hands the request to `serving.schemas.parse_v2_request`,
so a binary tensor meets exactly the rules a JSON one does (names, datatypes, shapes, ranges).
Responses go out in binary for the outputs the request asks so (`parameters.binary_data_output`
for all, or `outputs[i].parameters.binary_data` for one), as the protocol's extension says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pydantic_core
from starlette.responses import Response

from serving.errors import InvalidInput, MalformedRequest
from serving.schemas import parse_v2_request

HEADER_LENGTH = "inference-header-content-length"
# What `GET /v2` reports under "extensions" (the names Triton and KServe use).
EXTENSIONS = ["binary_tensor_data"]
# Fixed-size datatypes as little-endian numpy types; BYTES (length-prefixed strings) is not decoded.
BINARY_DTYPES = {"BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
                 "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"),
                 "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
                 "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
_NAMES = {dtype.kind + str(dtype.itemsize): name for name, dtype in BINARY_DTYPES.items()}


@dataclass
class InferCall:
    """A validated inference request: its id, tensors, parameters, and which outputs go back how."""

    id: str | None
    tensors: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[tuple[str, bool]] | None = None  # (name, binary) as requested; None: all outputs
    binary_default: bool = False  # `parameters.binary_data_output`


def parse_infer(body: bytes, headers: Mapping[str, str], inputs_spec: list[dict[str, Any]]) -> InferCall:
    """Decode a JSON or binary-tensor body and validate it against the model's inputs."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise MalformedRequest(f"Content-Encoding {encoding!r} is not supported; send the body uncompressed",
                               field="Content-Encoding", rule="identity (uncompressed) bodies only")
    request = decode_body(body, headers.get(HEADER_LENGTH))
    request_id, tensors = parse_v2_request(request, inputs_spec)
    parameters = _object(request.get("parameters"), "parameters")
    binary_default = _flag(parameters, "binary_data_output", "parameters")
    outputs = None
    if request.get("outputs") is not None:  # the schema has checked it is a list of objects
        outputs = [_requested_output(i, wanted, binary_default) for i, wanted in enumerate(request["outputs"])]
    return InferCall(request_id, tensors, parameters, outputs, binary_default)


def decode_body(body: bytes, header_length: str | None) -> dict[str, Any]:
    """The request's JSON object; with `Inference-Header-Content-Length`, each binary input's bytes are
    decoded and put in as its `data` (and `binary_data_size` taken out of its parameters)."""
    if header_length is None:
        return _json_object(body)
    length = _header_length(header_length, len(body))
    request = _json_object(body[:length])
    binary = memoryview(body)[length:]
    offset = 0
    inputs = request.get("inputs")
    for i, tensor in enumerate(inputs if isinstance(inputs, list) else []):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue  # a JSON tensor (or one the schema will refuse)
        where = f"inputs[{i}]"
        size = parameters["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"{where}.parameters.binary_data_size: must be a byte count >= 0, got {size!r}",
                               field=f"{where}.parameters.binary_data_size", rule="integer >= 0")
        if "data" in tensor:
            raise InvalidInput(f"{where}: has both `data` and `parameters.binary_data_size`; send one",
                               field=f"{where}.data", rule="either data or binary_data_size")
        if offset + size > len(binary):
            raise MalformedRequest(
                f"{where}.parameters.binary_data_size: the inputs declare at least {offset + size} bytes of "
                f"binary data, the body has {len(binary)} after the {length}-byte JSON header",
                field=f"{where}.parameters.binary_data_size", rule="binary data sizes must add up to the body")
        values = _values(where, tensor.get("datatype"), binary[offset:offset + size])
        offset += size
        rest = {key: value for key, value in parameters.items() if key != "binary_data_size"}
        inputs[i] = {**tensor, "parameters": rest, "data": values}
    if offset != len(binary):
        raise MalformedRequest(
            f"body: {len(binary)} bytes follow the {length}-byte JSON header, but the inputs' "
            f"binary_data_size add up to {offset}", field="body", rule="binary data sizes must add up to the body")
    return request


def infer_response(head: dict[str, Any], outputs: dict[str, np.ndarray], call: InferCall) -> Response:
    """The `/infer` response: `head` (model_name, model_version, id, ...) plus the outputs the request
    asked for, in binary after the JSON header where it asked so."""
    tensors: list[dict[str, Any]] = []
    raw: list[bytes] = []
    for name, binary in _chosen(outputs, call):
        array = np.asarray(outputs[name])
        tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if binary and array.dtype.kind + str(array.dtype.itemsize) in _NAMES:
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            tensor["data"] = array.reshape(-1)
        tensors.append(tensor)
    header = orjson.dumps({**head, "outputs": tensors}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not raw:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(raw), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def datatype_of(array: np.ndarray) -> str:
    """The protocol's datatype name of a numpy array (FP32, INT64, ...)."""
    return _NAMES.get(array.dtype.kind + str(array.dtype.itemsize), str(array.dtype).upper())


def _chosen(outputs: dict[str, np.ndarray], call: InferCall) -> list[tuple[str, bool]]:
    """(name, binary) of each output to return: the requested ones in their order, else all."""
    if call.outputs is None:
        return [(name, call.binary_default) for name in outputs]
    for i, (name, _) in enumerate(call.outputs):
        if name not in outputs:
            raise InvalidInput(f"outputs[{i}].name: the model has no output {name!r}; its outputs are "
                               f"{sorted(outputs)}", field=f"outputs[{i}].name", rule=f"one of {sorted(outputs)}")
    return call.outputs


def _requested_output(i: int, wanted: dict[str, Any], binary_default: bool) -> tuple[str, bool]:
    where = f"outputs[{i}]"
    name = wanted.get("name")
    if not isinstance(name, str):
        raise InvalidInput(f"{where}.name: must be a string naming an output, got {name!r}", field=f"{where}.name",
                           rule="string")
    parameters = _object(wanted.get("parameters"), f"{where}.parameters")
    if "classification" in parameters:
        raise InvalidInput(f"{where}.parameters.classification: the classification extension is not supported; "
                           "ask for the raw output", field=f"{where}.parameters.classification",
                           rule="not supported")
    binary = _flag(parameters, "binary_data", f"{where}.parameters")
    return name, binary if "binary_data" in parameters else binary_default


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: must be a JSON object, got {value!r}", field=where, rule="JSON object")
    return value


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}.{key}: must be true or false, got {value!r}", field=f"{where}.{key}",
                           rule="boolean")
    return value


def _header_length(declared: str, body_length: int) -> int:
    value = declared.strip()
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= body_length:
        raise MalformedRequest(f"Inference-Header-Content-Length: {declared!r} is not the length of the JSON header "
                               f"within the {body_length}-byte body", field="Inference-Header-Content-Length",
                               rule=f"an integer in 1..{body_length}")
    return int(value)


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = pydantic_core.from_json(data)  # the parser the schemas use: big integers stay exact
    except ValueError as exc:
        raise MalformedRequest(f"request body is not valid JSON: {exc}", field="body",
                               rule="body must be a JSON object (binary tensors after it need "
                                    "Inference-Header-Content-Length)") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"body: must be a JSON object, got {type(value).__name__}", field="body",
                           rule="body must be a JSON object")
    return value


def _values(where: str, datatype: Any, raw: memoryview) -> list[Any]:
    """Decode one input's bytes into plain values for the schema's checks."""
    dtype = BINARY_DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(f"{where}.datatype: binary data of {datatype!r} cannot be decoded; binary tensors take "
                           f"{sorted(BINARY_DTYPES)}", field=f"{where}.datatype",
                           rule=f"one of {sorted(BINARY_DTYPES)} for binary data")
    if len(raw) % dtype.itemsize:
        raise InvalidInput(f"{where}.parameters.binary_data_size: {len(raw)} bytes is not a whole number of "
                           f"{datatype} values ({dtype.itemsize} bytes each)",
                           field=f"{where}.parameters.binary_data_size", rule=f"a multiple of {dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).tolist()
