"""A throwaway CA and server certificate so the dev server can speak HTTPS.

Writes ``ca.pem`` (public; clients trust it), ``server.pem`` and ``server.key`` (0600) into
the given directory and returns an ``ssl.SSLContext``.

Must NOT: be used for anything but local development and tests; the CA key is discarded.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from typing import List, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .._errors import ConfigError, JobtokenError
from .._tokenfile import write_file_atomically as write_private_file

__all__ = ["TlsMaterial", "make_tls"]


@dataclass(frozen=True)
class TlsMaterial:
    ca_file: str
    cert_file: str
    key_file: str
    context: ssl.SSLContext


def _san_entries(names: Sequence[str]) -> List[x509.GeneralName]:
    out: List[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def make_tls(directory: str, hosts: Sequence[str]) -> TlsMaterial:
    """Create a CA + server certificate for ``127.0.0.1``, ``::1``, ``localhost`` and ``hosts``.

    Raises:
        ConfigError: the directory cannot be created or written.
    """
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"devserver tls_dir={directory} unusable: {exc.strerror}") from exc
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobtoken devserver test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names = ["127.0.0.1", "::1", "localhost"] + [h for h in hosts if h]
    unique = list(dict.fromkeys(names))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_san_entries(unique)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_file = os.path.join(directory, "ca.pem")
    cert_file = os.path.join(directory, "server.pem")
    key_file = os.path.join(directory, "server.key")
    pem = serialization.Encoding.PEM
    try:
        write_private_file(ca_file, ca_cert.public_bytes(pem), mode=0o644)
        write_private_file(
            cert_file, cert.public_bytes(pem) + ca_cert.public_bytes(pem), mode=0o644
        )
        write_private_file(
            key_file,
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
    except JobtokenError as exc:
        raise ConfigError(f"devserver tls_dir={directory} unusable: {exc.message}") from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return TlsMaterial(ca_file=ca_file, cert_file=cert_file, key_file=key_file, context=context)
