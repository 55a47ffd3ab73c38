"""Envoy's own generated ext_authz v3 client (PyPI xds-protos + grpcio) asking a Castellan
decision point. Reads {"target": "HOST:PORT", "checks": [...]} on stdin; each check has
principal, method, path, host, headers (object), context_extensions (object) and optional
certificate (URL-encoded PEM, as Envoy sends it). With "tls": {"ca", "cert", "key"} (PEM file
paths; no client certificate without cert and key) it connects over mTLS, as Envoy does to a
remote authorization service. Prints one JSON object per check; a refused call prints
{"rpc_error": CODE}."""

import json
import sys

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as eag


def request(c):
    http = ac.AttributeContext.HttpRequest(
        method=c.get("method", "GET"),
        path=c["path"],
        host=c.get("host", "shop.test"),
        scheme="https",
        protocol="HTTP/1.1",
        headers=c.get("headers", {}),
    )
    source = ac.AttributeContext.Peer(
        principal=c.get("principal", ""),
        certificate=c.get("certificate", ""),
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="10.0.0.9", port_value=40000)
        ),
    )
    return ea.CheckRequest(
        attributes=ac.AttributeContext(
            source=source,
            request=ac.AttributeContext.Request(http=http),
            context_extensions=c.get("context_extensions", {}),
        )
    )


def channel(spec):
    tls = spec.get("tls")
    if not tls:
        return grpc.insecure_channel(spec["target"])

    def read(k):
        if k not in tls:
            return None
        with open(tls[k], "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read("ca"), private_key=read("key"), certificate_chain=read("cert")
    )
    return grpc.secure_channel(spec["target"], creds)


def main():
    spec = json.load(sys.stdin)
    with channel(spec) as ch:
        stub = eag.AuthorizationStub(ch)
        for c in spec["checks"]:
            try:
                r = stub.Check(request(c), timeout=10)
            except grpc.RpcError as e:
                print(json.dumps({"rpc_error": e.code().name, "message": e.details()}), flush=True)
                continue
            out = {"code": r.status.code, "message": r.status.message}
            kind = r.WhichOneof("http_response")
            if kind == "ok_response":
                out["ok"] = True
                out["headers"] = {h.header.key: h.header.value for h in r.ok_response.headers}
                out["append_actions"] = [h.append_action for h in r.ok_response.headers]
                out["headers_to_remove"] = list(r.ok_response.headers_to_remove)
            elif kind == "denied_response":
                d = r.denied_response
                out["ok"] = False
                out["status"] = d.status.code
                out["headers"] = {h.header.key: h.header.value for h in d.headers}
                out["body"] = json.loads(d.body) if d.body else None
            print(json.dumps(out), flush=True)


main()
