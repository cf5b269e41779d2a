"""A private CA and the webhook's serving certificate, made with ``cryptography``.

The API server calls the webhook at ``https://<service>.<namespace>.svc`` and
verifies it against the ``caBundle`` of the webhook configuration, so the
serving certificate needs exactly those DNS SANs. Rotation is by design: when
``DIR`` already holds ``ca.crt``/``ca.key`` the CA is reused and only the serving
pair is renewed, so the ``caBundle`` stays valid and the running server picks up
the new files on its next reload poll. Files are written atomically (temp file
+ rename) so the server never reads half a key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY, TLS_CERT, TLS_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"


class CertError(ValueError):
    """Certificate material could not be read or made; the message names the file."""


@dataclass(frozen=True, slots=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path
    reused_ca: bool


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use to reach ``service`` (it uses ``<svc>.<ns>.svc``)."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.cluster.local"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(common_name: str = "palisade-injector-ca", days: int = 3650
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Palisade")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_serving(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, dns_names: list[str],
                 ips: list[str] = (), days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertError(f"--ip {ip!r}: not an IP address") from None
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"{cert_path}: cannot load the CA certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"{key_path}: cannot load the CA key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertError(f"{key_path}: does not match {cert_path}")
    return cert, key


def write_certs(directory: str | Path, service: str, namespace: str, *, ips: list[str] = (),
                extra_dns: list[str] = (), days: int = 365, new_ca: bool = False) -> CertPaths:
    """Write ``ca.crt``, ``ca.key``, ``tls.crt``, ``tls.key`` into ``directory``."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertError(f"{d}: cannot create directory: {exc.strerror}") from None
    reuse = not new_ca and (d / CA_CERT).exists() and (d / CA_KEY).exists()
    if reuse:
        ca_cert, ca_key = _load_ca(d)
    else:
        ca_cert, ca_key = make_ca()
    cert, key = make_serving(ca_cert, ca_key, [*service_dns_names(service, namespace), *extra_dns],
                             list(ips), days)
    try:
        if not reuse:
            _write(d / CA_KEY, _pem_key(ca_key), 0o600)
            _write(d / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        # Key first: a reloading server that sees the new cert with the old key keeps the old
        # pair (the mismatch fails to load) and picks up the consistent pair on the next poll.
        _write(d / TLS_KEY, _pem_key(key), 0o600)
        _write(d / TLS_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise CertError(f"{d}: cannot write: {exc.strerror}") from None
    return CertPaths(d / CA_CERT, d / CA_KEY, d / TLS_CERT, d / TLS_KEY, reuse)


def not_after(pem: bytes) -> float:
    """Expiry of the first certificate in ``pem`` as a UNIX timestamp (for the metrics gauge)."""
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
