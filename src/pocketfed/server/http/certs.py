"""Development certificates for loopback: a private CA and a server certificate it signs.

    <out>/ca.pem, ca.key          the CA (give ca.pem to devices as --ca; keep ca.key private)
    <out>/server.pem, server.key  for 127.0.0.1, ::1 and localhost (give the folder as --tls)

For trials on one machine or a LAN you control; a real deployment uses its own PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pocketfed.files import write_atomic
from pocketfed.errors import UserError

FILES = ("ca.pem", "ca.key", "server.pem", "server.key")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_dev_certs(out: Path, days: int = 365, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")) -> Path:
    """Write a CA and a server certificate for `hosts` into `out`; refuse to overwrite."""
    out.mkdir(parents=True, exist_ok=True)
    existing = [f for f in FILES if (out / f).exists()]
    if existing:
        raise UserError(f"{out} already holds {', '.join(existing)}; choose an empty folder")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pocketfed dev CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_atomic(out / "ca.key", _key_pem(ca_key), mode=0o600)
    write_atomic(out / "server.key", _key_pem(key), mode=0o600)
    write_atomic(out / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    write_atomic(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    return out


def server_files(tls: Path) -> tuple[Path, Path]:
    """(certificate, key) in a --tls folder, or a UserError naming what is missing."""
    cert, key = tls / "server.pem", tls / "server.key"
    for p in (cert, key):
        if not p.is_file():
            raise UserError(f"--tls {str(tls)!r} lacks {p.name}; make the folder with `pocketfed certs --out {tls}`")
    return cert, key
