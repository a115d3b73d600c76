"""A throwaway PKI for TLS tests: one CA, a server certificate for 127.0.0.1/localhost,
and a client certificate, written as PEM files (keys unencrypted, for DCMTK and Python).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_certificate: Path
    server_key: Path
    client_certificate: Path
    client_key: Path
    # Signed by another CA: valid-looking, but not trusted by ours.
    rogue_certificate: Path
    rogue_key: Path

    def dcmtk(self, who: str) -> list[str]:
        """DCMTK TLS options for ``who`` ("server", "client" or "rogue"), trusting our CA."""
        key, certificate = {
            "server": (self.server_key, self.server_certificate),
            "client": (self.client_key, self.client_certificate),
            "rogue": (self.rogue_key, self.rogue_certificate),
        }[who]
        return ["+tls", str(key), str(certificate), "+cf", str(self.ca)]

    def node_tls(self, port: int) -> dict[str, Any]:
        """The node's `node.tls` config: our server certificate, client certificates required."""
        return {
            "port": port,
            "certificate": str(self.server_certificate),
            "private_key": str(self.server_key),
            "ca_certificates": str(self.ca),
            "require_client_certificate": True,
        }


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM

    def leaf(
        stem: str,
        issuer: x509.Name,
        issuer_key: ec.EllipticCurvePrivateKey,
        usage: x509.ObjectIdentifier,
    ) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(stem, key, issuer, issuer_key, usage=usage)
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(pem))
        _write_key(key, directory / f"{stem}.key")
        return directory / f"{stem}.crt", directory / f"{stem}.key"

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("dicom-ai test CA")
    ca_cert = _certificate("dicom-ai test CA", ca_key, ca_name, ca_key, ca=True)
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    server = leaf("server", ca_name, ca_key, ExtendedKeyUsageOID.SERVER_AUTH)
    client = leaf("client", ca_name, ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = leaf("rogue", _name("rogue CA"), rogue_ca_key, ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(directory / "ca.crt", *server, *client, *rogue)
