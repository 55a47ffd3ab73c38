#!/usr/bin/env bash
# Regenerates the RSA CSR fixtures (rcgen cannot make RSA keys). Run from this directory.
set -euo pipefail
for bits in 1024 2048; do
  openssl req -new -newkey rsa:$bits -nodes -keyout /dev/null -subj "/CN=orders" \
    -addext "subjectAltName=URI:spiffe://example.org/svc/orders" -outform DER -out rsa$bits.csr.der 2>/dev/null
done
