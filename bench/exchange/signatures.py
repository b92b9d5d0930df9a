"""CPU cost of the exchange's signature operations, one process, no network.

    python bench/exchange/signatures.py [--n 300]

Times, per call (process CPU time): the certificate-chain and CRL check of a facility certificate
(`validate_chain`) from scratch (the verification caches cleared before every call) and as a
running node meets it (the verdict cached for this CRL), signing a request, signing and verifying
it (what each signed hop costs the two ends), sealing a 27 KB package and opening it again. A fresh
provincial CA and facility identity are made first (not timed). Prints microseconds per call.
"""

from __future__ import annotations

import argparse
import time

from cryptography import x509

from lienthong.exchange.trust import (
    MemoryNonceStore,
    ProvincialCA,
    clear_verification_caches,
    open_package,
    seal_package,
    sign_request,
    validate_chain,
    verify_request,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    n = ap.parse_args().n
    ca = ProvincialCA.create()
    identity = ca.issue_identity("24901", "Bệnh viện Đa khoa tỉnh Bắc Giang")
    crl = ca.crl()
    anchor = x509.load_pem_x509_certificate(ca.cert_pem())
    body, payload = b"x" * 6000, b"y" * 27000
    nonces = MemoryNonceStore()
    sealed = seal_package(payload, identity)

    def sign_and_verify() -> None:
        headers = sign_request("POST", "/exchange/messages/abc", body, identity, audience="24000")
        verify_request("POST", "/exchange/messages/abc", headers, body, anchor, crl, nonces, audience="24000")

    def first_check() -> None:
        clear_verification_caches()
        validate_chain([identity.cert], anchor, crl)

    cases = {
        "validate_chain, from scratch (certificate chain + CRL)": first_check,
        "validate_chain, cached for this CRL": lambda: validate_chain([identity.cert], anchor, crl),
        "sign_request": lambda: sign_request("POST", "/exchange/messages/abc", body, identity, audience="24000"),
        "sign_request + verify_request": sign_and_verify,
        "seal_package (27 KB)": lambda: seal_package(payload, identity),
        "open_package (27 KB)": lambda: open_package(sealed, anchor, crl),
    }
    print("| operation | µs per call |\n|---|---:|")
    for name, call in cases.items():
        start = time.process_time()
        for _ in range(n):
            call()
        print(f"| {name} | {(time.process_time() - start) / n * 1e6:,.0f} |")


if __name__ == "__main__":
    main()
