"""The Open Inference Protocol as standard clients speak it: binary tensors, versions, repository index.

The codec tests encode with KServe's and Triton's own client code and decode our responses with it;
the integration tests drive the served app with both clients at their defaults (binary tensors on).
"""

from __future__ import annotations

import asyncio
import json
import struct

import httpx
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from serving.errors import CourierError, InvalidInput, MalformedRequest
from serving.oip import decode_body, infer_response, parse_infer

SPECS = [
    {"name": "dense", "datatype": "FP32", "shape": [-1, 3], "range": (None, None)},
    {"name": "areas", "datatype": "INT64", "shape": [-1, 2], "range": (0, 10)},
]
DENSE = np.array([[0.5, -1.25, 3.0], [1e-3, 2.5, 7.0]], dtype=np.float32)
AREAS = np.array([[1, 2], [3, 10]], dtype=np.int64)


def triton_body(dense: np.ndarray = DENSE, areas: np.ndarray = AREAS, outputs=None) -> tuple[bytes, dict]:
    """A request body and headers exactly as tritonclient.http builds them (binary inputs by default)."""
    from tritonclient.http import InferInput
    from tritonclient.http._utils import _get_inference_request

    inputs = []
    for name, array, datatype in (("dense", dense, "FP32"), ("areas", areas, "INT64")):
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    body, json_size = _get_inference_request(inputs, "r-7", outputs, 0, False, False, 0, None, None)
    return body, ({} if json_size is None else {"inference-header-content-length": str(json_size)})


def kserve_body(**parameters) -> tuple[bytes, dict]:
    """A request body and headers exactly as KServe's InferRequest.to_rest builds them (binary by default)."""
    from kserve import InferInput, InferRequest

    inputs = []
    for name, array, datatype in (("dense", DENSE, "FP32"), ("areas", AREAS, "INT64")):
        tensor = InferInput(name=name, shape=list(array.shape), datatype=datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    body, json_length = InferRequest(model_name="eta", infer_inputs=inputs, parameters=parameters or None).to_rest()
    assert json_length is not None, "KServe's defaults send binary tensors"
    return body, {"inference-header-content-length": str(json_length)}


def binary(header: dict, *chunks: bytes, length: int | None = None) -> tuple[bytes, dict]:
    """A hand-built binary body: the JSON header, then the raw chunks."""
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"inference-header-content-length": str(len(head) if length is None else length)}


def tensor(name: str, datatype: str, shape: list[int], size: int) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


# --- the codec ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("encode", [triton_body, kserve_body], ids=["tritonclient", "kserve"])
def test_clients_binary_requests_decode_to_the_same_arrays(encode):
    """What either client sends by default becomes the arrays it started from, with their dtypes."""
    body, headers = encode()
    call = parse_infer(body, headers, SPECS)
    assert call.tensors["dense"].dtype == np.float32 and call.tensors["areas"].dtype == np.int64
    np.testing.assert_array_equal(call.tensors["dense"], DENSE)
    np.testing.assert_array_equal(call.tensors["areas"], AREAS)


def test_a_json_body_still_parses_and_defaults_to_json_outputs():
    """Without the header the body is plain JSON, as before; outputs come back as JSON data."""
    body = json.dumps({"id": "j", "inputs": [
        {"name": "dense", "datatype": "FP32", "shape": [2, 3], "data": DENSE.reshape(-1).tolist()},
        {"name": "areas", "datatype": "INT64", "shape": [2, 2], "data": AREAS.tolist()}]}).encode()
    call = parse_infer(body, {}, SPECS)
    assert call.id == "j" and call.outputs is None and call.binary_default is False
    response = infer_response({"model_name": "m"}, {"y": np.array([1.5, 2.5], dtype=np.float32)}, call)
    assert response.media_type == "application/json" and "inference-header-content-length" not in response.headers
    assert json.loads(response.body)["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]}]


def test_json_and_binary_inputs_mix_in_one_request():
    """One input as JSON data, the other as binary: both decode."""
    body, headers = binary({"inputs": [
        {"name": "dense", "datatype": "FP32", "shape": [2, 3], "data": DENSE.reshape(-1).tolist()},
        tensor("areas", "INT64", [2, 2], AREAS.nbytes)]}, AREAS.tobytes())
    call = parse_infer(body, headers, SPECS)
    np.testing.assert_array_equal(call.tensors["areas"], AREAS)


def test_binary_values_meet_the_json_rules():
    """Binary tensors go through the same validator: out-of-range integers and NaN are 422s naming the input."""
    areas = np.array([[1, 2], [3, 2**62]], dtype=np.int64)
    with pytest.raises(InvalidInput) as caught:
        parse_infer(*triton_body(areas=areas), SPECS)
    assert caught.value.field == "inputs[1].data" and "[0, 10]" in caught.value.message
    dense = DENSE.copy()
    dense[1, 1] = np.nan
    with pytest.raises(InvalidInput) as caught:
        parse_infer(*triton_body(dense=dense), SPECS)
    assert caught.value.field == "inputs[0].data" and "nan" in caught.value.message.lower()


def test_binary_outputs_read_back_with_tritons_result_parser():
    """Triton's default (`binary_data_output`) gets the header and raw bytes its own parser reads back."""
    from tritonclient.http import InferResult

    call = parse_infer(*triton_body(), SPECS)
    assert call.binary_default is True
    outputs = {"eta_minutes": np.array([12.5, 30.25], dtype=np.float32), "ids": np.array([[7, 8]], dtype=np.int64)}
    response = infer_response({"model_name": "eta", "model_version": "v1", "id": call.id}, outputs, call)
    length = int(response.headers["inference-header-content-length"])
    assert response.media_type == "application/octet-stream" and length < len(response.body)
    result = InferResult.from_response_body(response.body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("eta_minutes"), outputs["eta_minutes"])
    np.testing.assert_array_equal(result.as_numpy("ids"), outputs["ids"])
    assert result.get_response()["id"] == "r-7"


def test_requested_outputs_choose_which_and_how():
    """`outputs` returns only those named, each binary or JSON as its `binary_data` says."""
    from kserve.protocol.infer_type import InferResponse
    from tritonclient.http import InferRequestedOutput

    call = parse_infer(*triton_body(outputs=[InferRequestedOutput("b", binary_data=False),
                                             InferRequestedOutput("a")]), SPECS)
    outputs = {"a": np.array([1.0, 2.0]), "b": np.array([3, 4], dtype=np.int32), "c": np.array([5.0])}
    response = infer_response({"model_name": "m"}, outputs, call)
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.body[:length])
    assert [o["name"] for o in header["outputs"]] == ["b", "a"]
    assert header["outputs"][0]["data"] == [3, 4] and header["outputs"][1]["parameters"] == {"binary_data_size": 16}
    parsed = InferResponse.from_bytes(response.body, length)  # KServe's client reads it too
    np.testing.assert_array_equal(parsed.outputs[1].as_numpy(), outputs["a"])
    with pytest.raises(InvalidInput, match="no output 'zz'"):
        unknown = parse_infer(*triton_body(outputs=[InferRequestedOutput("zz")]), SPECS)
        infer_response({"model_name": "m"}, outputs, unknown)


def test_kserve_binary_data_output_parameter():
    """KServe's request-level `binary_data_output` turns every output binary."""
    call = parse_infer(*kserve_body(binary_data_output=True), SPECS)
    response = infer_response({"model_name": "m"}, {"y": np.array([1.0], dtype=np.float32)}, call)
    assert response.headers["inference-header-content-length"]
    assert response.body.endswith(struct.pack("<f", 1.0))


HEADER = {"inputs": [tensor("dense", "FP32", [2, 3], 24), tensor("areas", "INT64", [2, 2], 32)]}
RAW = DENSE.tobytes() + AREAS.tobytes()


BAD_BINARY = [
        ("header longer than the body", *binary(HEADER, RAW, length=10_000), MalformedRequest,
         "Inference-Header-Content-Length"),
        ("header length not a number", binary(HEADER, RAW)[0], {"inference-header-content-length": "ab"},
         MalformedRequest, "Inference-Header-Content-Length"),
        ("header length zero", *binary(HEADER, RAW, length=0), MalformedRequest, "Inference-Header-Content-Length"),
        ("header cut inside the JSON", *binary(HEADER, RAW, length=20), MalformedRequest, "body"),
        ("bytes missing", *binary(HEADER, RAW[:-8]), MalformedRequest, "inputs[1].parameters.binary_data_size"),
        ("bytes left over", *binary(HEADER, RAW + b"\0"), MalformedRequest, "body"),
        ("size not a whole number of values",
         *binary({"inputs": [tensor("dense", "FP32", [1, 3], 10)]}, b"\0" * 10), InvalidInput,
         "inputs[0].parameters.binary_data_size"),
        ("negative size", *binary({"inputs": [tensor("dense", "FP32", [1, 3], -4)]}), InvalidInput,
         "inputs[0].parameters.binary_data_size"),
        ("size a boolean", *binary({"inputs": [tensor("dense", "FP32", [1, 3], True)]}, b"\0"), InvalidInput,
         "inputs[0].parameters.binary_data_size"),
        ("data and binary both", *binary({"inputs": [{**tensor("dense", "FP32", [1, 3], 12), "data": [1, 2, 3]}]},
                                         b"\0" * 12), InvalidInput, "inputs[0].data"),
        ("BYTES tensor", *binary({"inputs": [tensor("dense", "BYTES", [1], 5)]}, b"\1\0\0\0a"), InvalidInput,
         "inputs[0].datatype"),
        ("wrong datatype for the model", *binary({"inputs": [tensor("dense", "FP64", [1, 3], 24)]}, b"\0" * 24),
         InvalidInput, "inputs[0].datatype"),
        ("values do not fill the shape", *binary({"inputs": [tensor("dense", "FP32", [2, 3], 12),
                                                              tensor("areas", "INT64", [2, 2], 32)]},
                                                  b"\0" * 12, AREAS.tobytes()), InvalidInput, "inputs[0].data"),
        ("header is a list", *binary([1, 2]), InvalidInput, "body"),  # type: ignore[arg-type]
        ("binary_data_output not a boolean", *binary({**HEADER, "parameters": {"binary_data_output": "yes"}}, RAW),
         InvalidInput, "parameters.binary_data_output"),
        ("classification asked", *binary({**HEADER, "outputs": [{"name": "y", "parameters": {"classification": 3}}]},
                                         RAW), InvalidInput, "outputs[0].parameters.classification"),
        ("compressed body", b"\x1f\x8b", {"content-encoding": "gzip"}, MalformedRequest, "Content-Encoding"),
]


@pytest.mark.parametrize("case, body, headers, error, field", BAD_BINARY, ids=[c[0] for c in BAD_BINARY])
def test_malformed_binary_bodies_are_4xx_naming_the_field(case, body, headers, error, field):
    """Every malformed binary body is a 400 or 422 that names what is wrong, never a crash."""
    with pytest.raises(error) as caught:
        parse_infer(body, headers, SPECS)
    assert caught.value.field == field, caught.value.message
    assert caught.value.status in (400, 422)


@settings(max_examples=300, deadline=None)
@given(header=st.one_of(st.just(json.dumps(HEADER).encode()), st.binary(max_size=80)),
       raw=st.binary(max_size=80), declared=st.one_of(st.integers(-5, 300).map(str), st.text(max_size=4)))
@example(header=b"{}", raw=b"", declared="\u00b2")  # a Unicode digit: str.isdigit() says yes, int() says no
def test_any_binary_body_is_answered_or_refused_with_a_4xx(header, raw, declared):
    """Whatever the bytes and the declared header length, the codec answers or raises a 4xx error."""
    try:
        parse_infer(header + raw, {"inference-header-content-length": declared}, SPECS)
    except CourierError as exc:
        assert exc.status in (400, 422)


def test_decode_body_keeps_other_parameters():
    """The decoder drops only `binary_data_size`; a tensor's other parameters stay."""
    header = {"inputs": [{**tensor("dense", "FP32", [1, 3], 12), "parameters": {"binary_data_size": 12, "x": 1}}]}
    body, headers = binary(header, np.zeros(3, np.float32).tobytes())
    decoded = decode_body(body, headers["inference-header-content-length"])
    assert decoded["inputs"][0]["parameters"] == {"x": 1} and decoded["inputs"][0]["data"] == [0.0, 0.0, 0.0]


# --- the served app, with the clients at their defaults -------------------------------------------------

def model_inputs(specs: list[dict], batch: int = 4) -> dict[str, np.ndarray]:
    """Valid inputs for the served model: values inside each input's declared range."""
    rng = np.random.default_rng(7)
    inputs = {}
    for spec in specs:
        shape = [batch if dim == -1 else dim for dim in spec["shape"]]
        low, high = spec.get("range") or (None, None)
        if spec["datatype"] == "INT64":
            inputs[spec["name"]] = rng.integers(low or 0, (high if high is not None else 5) + 1, shape, dtype=np.int64)
        else:
            inputs[spec["name"]] = rng.uniform(low if low is not None else 0, high if high is not None else 1,
                                               shape).astype(np.float32)
    return inputs


@pytest.fixture(scope="module")
def eta(eta_trained):
    from serving.onnx_model import OnnxModel

    model = OnnxModel(eta_trained.target)
    return model, model_inputs(model.input_specs())


@pytest.mark.integration
def test_kserve_client_with_its_defaults(served, eta):
    """KServe's InferenceRESTClient(protocol="v2") with binary tensors (its default) gets the in-process answer,
    in JSON and, asked for, in binary."""
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    model, inputs = eta
    expected = model.run(inputs)["eta_minutes"]

    def request(**parameters) -> InferRequest:
        tensors = []
        for name, array in inputs.items():
            t = InferInput(name=name, shape=list(array.shape), datatype="FP32" if array.dtype == np.float32 else "INT64")
            t.set_data_from_numpy(array)  # binary_data=True by default
            tensors.append(t)
        return InferRequest(model_name="eta", infer_inputs=tensors, parameters=parameters or None)

    json_headers: dict[str, str] = {}
    binary_headers: dict[str, str] = {}

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            assert await client.is_server_ready(served.url) and await client.is_model_ready(served.url, "eta")
            return (await client.infer(served.url, request(), model_name="eta", response_headers=json_headers),
                    await client.infer(served.url, request(binary_data_output=True), model_name="eta",
                                       response_headers=binary_headers))
        finally:
            await client.close()

    as_json, as_binary = asyncio.run(call())
    for response in (as_json, as_binary):
        assert response.model_name == "eta"
        np.testing.assert_allclose(response.outputs[0].as_numpy().reshape(-1), expected.reshape(-1), atol=1e-5)
    assert "inference-header-content-length" not in json_headers
    assert int(binary_headers["inference-header-content-length"]) < int(binary_headers["content-length"])


@pytest.mark.integration
def test_tritonclient_with_its_defaults(served, eta):
    """tritonclient.http at its defaults (binary inputs, binary outputs): metadata, readiness, the repository
    index, infer by name and by version, and a 404 naming the served versions for any other version."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    model, inputs = eta
    client = triton.InferenceServerClient(served.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        version = client.get_model_metadata("eta")["versions"][0]
        assert client.is_model_ready("eta") and client.is_model_ready("eta", version)
        assert client.get_model_metadata("eta", version)["versions"] == [version]
        index = client.get_model_repository_index()
        assert {"name": "eta", "version": version, "state": "READY"} in index

        tensors = []
        for name, array in inputs.items():
            t = triton.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
            t.set_data_from_numpy(array)
            tensors.append(t)
        expected = model.run(inputs)["eta_minutes"]
        for kwargs in ({}, {"model_version": version}, {"outputs": [triton.InferRequestedOutput("eta_minutes")]}):
            result = client.infer("eta", tensors, request_id="t-1", **kwargs)
            assert result.get_response()["model_version"] == version and result.get_response()["id"] == "t-1"
            np.testing.assert_allclose(result.as_numpy("eta_minutes").reshape(-1), expected.reshape(-1), atol=1e-5)
        with pytest.raises(InferenceServerException, match=f"served versions: \\['{version}'\\]"):
            client.infer("eta", tensors, model_version="no-such-version")
        assert not client.is_model_ready("eta", "no-such-version")
    finally:
        client.close()


@pytest.mark.integration
def test_malformed_binary_bodies_over_http_are_4xx(served):
    """Binary bodies that lie about their sizes get 400/422 with the field, over the wire too."""
    bad = [binary(HEADER, RAW, length=10_000), binary(HEADER, RAW[:-8]), binary(HEADER, RAW + b"\0\0"),
           binary({"inputs": [tensor("dense", "FP32", [1, 3], 10)]}, b"\0" * 10),
           (b"\x00\xff" * 20, {"inference-header-content-length": "7"})]
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for body, headers in bad:
            response = http.post("/v2/models/eta/infer", content=body, headers=headers)
            assert response.status_code in (400, 422), response.text
            assert response.json()["field"]
        missing = http.get("/v2/models/eta/versions/0/ready")
        assert missing.status_code == 404 and "served versions" in missing.json()["error"]


@pytest.fixture(scope="module")
def two_etas(tmp_path_factory, city_dir, feature_store, eta_trained, retrieval_trained, ranker_trained):
    """An app serving the trained ETA model as champion and a +5-minute copy as challenger (no canary,
    no shadow): only a version in the path reaches the challenger."""
    from pathlib import Path

    from serving.launch import BackgroundServer
    from tests.conftest import distinct_ports, serve_overrides
    from tests.test_variants import _derive

    root = tmp_path_factory.mktemp("oip-versions")
    for trained in (eta_trained, retrieval_trained, ranker_trained):
        link = root / Path(trained.target).parent.name / Path(trained.target).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(trained.target).resolve(), target_is_directory=True)
    champion = Path(eta_trained.target).name
    challenger = _derive(Path(eta_trained.target), root, f"{champion}-plus5", "Add", 5.0).name
    overrides = ["--num-cpus", "2", *serve_overrides(city_dir, eta_trained, retrieval_trained, ranker_trained,
                                                     slots={"eta": {"challenger": challenger}},
                                                     artifacts=str(root))]
    log = tmp_path_factory.mktemp("oip-serve") / "serve.log"
    with BackgroundServer(*distinct_ports(2), log, extra=overrides) as server:
        yield server, champion, challenger


@pytest.mark.integration
def test_a_version_in_the_path_is_answered_by_that_version(two_etas, eta):
    """`/v2/models/eta/versions/{challenger}/infer` is the challenger's answer (+5 min), the plain route the
    champion's; metadata and readiness by version; a version not served is a 404 naming both."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    server, champion, challenger = two_etas
    model, inputs = eta
    expected = model.run(inputs)["eta_minutes"].reshape(-1)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert client.get_model_metadata("eta")["versions"] == [champion, challenger]
        assert client.get_model_metadata("eta", challenger)["versions"] == [challenger]
        assert client.is_model_ready("eta", challenger)
        assert {(e["name"], e.get("version")) for e in client.get_model_repository_index()} >= {
            ("eta", champion), ("eta", challenger)}
        tensors = []
        for name, array in inputs.items():
            t = triton.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
            t.set_data_from_numpy(array)
            tensors.append(t)
        plain = client.infer("eta", tensors)
        pinned = client.infer("eta", tensors, model_version=challenger)
        assert plain.get_response()["model_version"] == champion
        assert pinned.get_response()["model_version"] == challenger
        np.testing.assert_allclose(plain.as_numpy("eta_minutes").reshape(-1), expected, atol=1e-5)
        np.testing.assert_allclose(pinned.as_numpy("eta_minutes").reshape(-1), expected + 5, atol=1e-4)
        with pytest.raises(InferenceServerException, match=challenger):
            client.infer("eta", tensors, model_version="eta-0")
    finally:
        client.close()
