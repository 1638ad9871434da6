"""A throwaway certificate authority for the end-to-end tests.

Makes one CA and server certificates for ``127.0.0.1``/``localhost`` with ``cryptography``,
and lays the CA out the ways grid clients want it: a PEM file (curl ``--cacert``, httpx) and a
hashed directory (``X509_CERT_DIR`` for xrdcp, davix and gfal2).

Must NOT: touch the system trust store, or write anywhere but the directory it is given.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class ServerCert:
    """PEM files of one server certificate (leaf only) and its private key."""

    cert_file: Path
    key_file: Path


class TestCA:
    """A CA whose certificate and key live in ``directory`` (created 0755 if missing).

    The CA is trusted by nothing until a test hands ``ca_file`` or ``cert_dir`` to a client.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, directory: Path, name: str = "jobtoken e2e test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(self.ca_file, 0o644)

    def issue_server_cert(self, name: str, owner: tuple[int, int] | None = None) -> ServerCert:
        """Sign a TLS server certificate valid for 127.0.0.1, ::1 and localhost.

        Args:
            name: file name stem inside the CA directory.
            owner: (uid, gid) to chown the key to, for a server that drops privileges.

        Returns:
            The certificate and key paths; the key is mode 0600.

        Raises:
            OSError: the files cannot be written.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + _VALIDITY)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        cert_file = self.directory / f"{name}.pem"
        key_file = self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(cert_file, 0o644)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        if owner is not None:
            os.chown(key_file, *owner)
        return ServerCert(cert_file=cert_file, key_file=key_file)

    def make_cert_dir(self, extra_ca_files: tuple[Path, ...] = ()) -> Path:
        """Build an OpenSSL hashed CA directory (``X509_CERT_DIR`` style) with this CA.

        Returns:
            The directory, world-readable.

        Raises:
            RuntimeError: ``openssl rehash`` failed or is missing.
        """
        cert_dir = self.directory / "certificates"
        cert_dir.mkdir(mode=0o755, exist_ok=True)
        for index, src in enumerate((self.ca_file, *extra_ca_files)):
            dest = cert_dir / f"ca{index}.pem"
            shutil.copyfile(src, dest)
            os.chmod(dest, 0o644)
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError(
                "openssl not found on PATH; run .ci/install-system-packages.sh as root"
            )
        proc = subprocess.run(
            [openssl, "rehash", str(cert_dir)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"openssl rehash failed dir={cert_dir}: {proc.stderr.strip()}")
        return cert_dir
