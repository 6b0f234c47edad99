"""ModelMesh's protocol-agnostic inference: a call of a method meshd does not serve goes, by its
mm-model-id header, to the runtime holding that model. These are the refusals every pod gives; the calls a
runtime answers are in test_runtimes.py."""
import grpc
import pytest


def call(server, path, body=b"\x0a\x02hi", headers=()):
    method = server.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    return method(body, metadata=list(headers), timeout=30)


def test_an_unknown_method_naming_no_model_is_unimplemented_and_says_how_to_name_one(examples_server):
    with pytest.raises(grpc.RpcError) as e:
        call(examples_server, "/echo.Echo/Say")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/echo.Echo/Say" in e.value.details() and "mm-model-id" in e.value.details(), e.value.details()


def test_a_method_for_an_in_process_model_is_refused_naming_its_runtime(examples_server):
    with pytest.raises(grpc.RpcError) as e:
        call(examples_server, "/echo.Echo/Say", headers=[("mm-model-id", "iris-logreg")])
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "iris-logreg" in e.value.details() and "KServe V2 inference only" in e.value.details(), e.value.details()


def test_a_method_for_an_unknown_model_is_not_found(examples_server):
    with pytest.raises(grpc.RpcError) as e:
        call(examples_server, "/echo.Echo/Say", headers=[("mm-model-id", "no-such-model")])
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in e.value.details()


def test_meshds_own_services_are_untouched_by_the_passthrough(examples_server):
    from tritonclient.grpc import service_pb2

    live = examples_server.stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
    assert live.live
