"""A small OIDC provider on loopback (TLS with a CA it writes), for the gateway's and the
decision point's keys-by-URL: discovery, a JWKS with one ES256 key, and a control socket on
stdin. Commands (one per line): `token SUB ROLE` prints a token signed with the current key;
`rotate` makes a new current key (the JWKS then holds only it); `foreign SUB` prints a token
signed by a key the JWKS never holds; `fetches` prints how many times the JWKS was served.
Prints {"issuer": ..., "ca": ...} first."""

import datetime
import json
import os
import ssl
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

AUD = "shop"
state = {"kid": 0, "key": None, "fetches": 0}
lock = threading.Lock()


def new_key():
    with lock:
        state["kid"] += 1
        state["key"] = ec.generate_private_key(ec.SECP256R1())


def jwk():
    with lock:
        j = json.loads(ECAlgorithm.to_jwk(state["key"].public_key()))
        j.update({"kid": f"k{state['kid']}", "alg": "ES256", "use": "sig"})
        return j


def sign(key, kid, sub, role):
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUD, "sub": sub, "roles": [role], "customer_id": "42",
              "iat": now, "exp": now + 300}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path == "/.well-known/openid-configuration":
            body = {"issuer": ISSUER, "jwks_uri": ISSUER + "/jwks"}
        elif self.path == "/jwks":
            with lock:
                state["fetches"] += 1
            body = {"keys": [jwk()]}
        else:
            self.send_response(404)
            self.end_headers()
            return
        b = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)


def tls_files(d):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test oidc ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {k: os.path.join(d, k) for k in ("ca.pem", "cert.pem", "key.pem")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert.pem"], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(paths["key.pem"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


d = tempfile.mkdtemp()
paths = tls_files(d)
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(paths["cert.pem"], paths["key.pem"])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
ISSUER = f"https://127.0.0.1:{srv.server_address[1]}"
new_key()
threading.Thread(target=srv.serve_forever, daemon=True).start()
print(json.dumps({"issuer": ISSUER, "ca": paths["ca.pem"]}), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "token":
        with lock:
            key, kid = state["key"], f"k{state['kid']}"
        print(sign(key, kid, cmd[1], cmd[2]), flush=True)
    elif cmd[0] == "rotate":
        new_key()
        print("rotated", flush=True)
    elif cmd[0] == "foreign":
        print(sign(ec.generate_private_key(ec.SECP256R1()), "k999", cmd[1], "customer"), flush=True)
    elif cmd[0] == "fetches":
        with lock:
            print(state["fetches"], flush=True)
