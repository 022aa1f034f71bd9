#!/usr/bin/env python3
"""Python `cryptography` baseline for bench/compare.sh.

Builds the same workload certificate meshca issues - fresh ECDSA P-256 key, O=<trust domain>,
CN=<dns>, URI SAN (SPIFFE ID) + DNS SAN, CA:FALSE (critical), keyUsage digitalSignature
(critical), EKU serverAuth+clientAuth, SKI, AKI, 128-bit random serial, notBefore backdated
5 minutes, 24 h lifetime - signed by an ECDSA P-256 CA with SHA-256, then PEM-encodes the
certificate and the PKCS#8 key. Runs on one thread for SECONDS (default 3) of CPU time (like
`openssl speed`, so a busy machine does not skew the comparison) and prints

    python_cryptography <certs_per_cpu_sec> <iterations> <cpu_seconds> <version> <certs_per_wall_sec>
"""
import datetime
import sys
import time

import cryptography
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPIFFE_ID = "spiffe://cluster.local/ns/bench/sa/workload"
DNS = "workload.bench.svc.cluster.local"


def make_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca_key, ca_cert, ca_ski):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    serial = int.from_bytes(__import__("os").urandom(16), "big") >> 1 | (1 << 126)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local"),
            x509.NameAttribute(NameOID.COMMON_NAME, DNS),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=24))
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(SPIFFE_ID), x509.DNSName(DNS),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([
            ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH,
        ]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return len(cert_pem) + len(key_pem)


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    ca_key, ca_cert = make_ca()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    warm = time.perf_counter()
    while time.perf_counter() - warm < 0.2:
        issue(ca_key, ca_cert, ca_ski)
    n = 0
    cpu0 = time.thread_time()
    wall0 = time.perf_counter()
    while time.thread_time() - cpu0 < seconds and time.perf_counter() - wall0 < 10 * seconds:
        for _ in range(16):
            issue(ca_key, ca_cert, ca_ski)
        n += 16
    cpu = time.thread_time() - cpu0
    wall = time.perf_counter() - wall0
    print(f"python_cryptography {n / cpu:.1f} {n} {cpu:.3f} {cryptography.__version__} {n / wall:.1f}")


if __name__ == "__main__":
    main()
