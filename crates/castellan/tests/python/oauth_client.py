"""A real OAuth2 client against `castellan server`: discovery (RFC 8414), client_credentials
with authlib (client_secret_basic and client_secret_post), verification with PyJWT's
PyJWKClient, token exchange and introspection with requests. Prints the tokens it obtained as
JSON on stdout (the Rust test then checks none of them reached the server's log).

Environment: CASTELLAN_URL, CASTELLAN_CA_BUNDLE, CLIENT_ID, CLIENT_SECRET, AUDIENCE.
"""
import json
import os
import ssl
import sys

import jwt
import requests
from authlib.integrations.requests_client import OAuth2Session

url = os.environ["CASTELLAN_URL"]
bundle = os.environ["CASTELLAN_CA_BUNDLE"]
client_id = os.environ["CLIENT_ID"]
secret = os.environ["CLIENT_SECRET"]
audience = os.environ["AUDIENCE"]


def check(cond, msg):
    if not cond:
        print(f"FAIL: {msg}", file=sys.stderr)
        sys.exit(1)


meta = requests.get(f"{url}/.well-known/openid-configuration", verify=bundle, timeout=10).json()
check(meta["issuer"] == url, f"issuer {meta['issuer']!r} != {url!r}")
check("client_credentials" in meta["grant_types_supported"], "client_credentials not advertised")

tokens = {}
for method in ("client_secret_basic", "client_secret_post"):
    session = OAuth2Session(client_id, secret, token_endpoint_auth_method=method, scope="orders.read")
    tok = session.fetch_token(meta["token_endpoint"], grant_type="client_credentials", verify=bundle)
    check(tok["token_type"] == "Bearer" and tok["expires_in"] == 300, f"{method}: {tok}")
    tokens[method] = tok["access_token"]

ctx = ssl.create_default_context(cafile=bundle)
jwks = jwt.PyJWKClient(meta["jwks_uri"], ssl_context=ctx)
for method, access in tokens.items():
    key = jwks.get_signing_key_from_jwt(access)
    claims = jwt.decode(access, key.key, algorithms=["ES256"], audience=audience, issuer=meta["issuer"],
                        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]})
    check(claims["sub"] == client_id and claims["scope"] == "orders.read", f"{method}: {claims}")

# A forged token (signature of another token) must not verify.
h, p, _ = tokens["client_secret_basic"].split(".")
forged = ".".join([h, p, tokens["client_secret_post"].split(".")[2]])
try:
    jwt.decode(forged, jwks.get_signing_key_from_jwt(forged).key, algorithms=["ES256"], audience=audience)
    check(False, "forged token verified")
except jwt.InvalidSignatureError:
    pass

# Wrong secret: 401 invalid_client.
r = requests.post(meta["token_endpoint"], data={"grant_type": "client_credentials"},
                  auth=(client_id, "ccs_wrong"), verify=bundle, timeout=10)
check(r.status_code == 401 and r.json()["error"] == "invalid_client", f"wrong secret: {r.status_code} {r.text}")

# Token exchange (RFC 8693) and introspection (RFC 7662). Only a token issued *for* the
# exchanging client may be exchanged: one for the trust domain is refused.
def exchange(subject):
    return requests.post(meta["token_endpoint"], auth=(client_id, secret), verify=bundle, timeout=10, data={
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": subject,
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "audience": "inventory"})


r = exchange(tokens["client_secret_basic"])
check(r.status_code == 400, f"exchange of a token not issued for the client: {r.status_code} {r.text}")
r = requests.post(meta["token_endpoint"], auth=(client_id, secret), verify=bundle, timeout=10,
                  data={"grant_type": "client_credentials", "scope": "orders.read", "audience": client_id})
check(r.status_code == 200, f"token for the client itself: {r.status_code} {r.text}")
tokens["for_self"] = r.json()["access_token"]
r = exchange(tokens["for_self"])
check(r.status_code == 200, f"exchange: {r.status_code} {r.text}")
exchanged = r.json()["access_token"]
tokens["exchanged"] = exchanged
claims = jwt.decode(exchanged, jwks.get_signing_key_from_jwt(exchanged).key, algorithms=["ES256"], audience="inventory")
check(claims["act"] == {"sub": client_id}, f"act: {claims}")
r = requests.post(meta["introspection_endpoint"], auth=(client_id, secret), verify=bundle, timeout=10,
                  data={"token": exchanged})
check(r.json().get("active") is True and r.json()["aud"] == "inventory", f"introspect: {r.text}")

print(json.dumps(tokens))
