"""The throwaway CA and server certificate behind ``--tls-dir``.

Clients trust ``ca.pem`` and nothing else, so the material must verify for every name a
client may use (loopback, ``localhost``, the bind host and ``extra_san``), and the private
key must be the only secret that reaches the disk. Handshakes run in memory (``MemoryBIO``):
no sockets, no server thread.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from jobtoken._errors import ConfigError
from jobtoken.devserver._tls import TlsMaterial, make_tls

EXTRA = ["jobtoken.test", "[fd00::1]", "192.0.2.5", "", "localhost"]


@pytest.fixture
def material(tmp_path: Path) -> TlsMaterial:
    return make_tls(str(tmp_path / "tls"), EXTRA)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _leaf_and_ca(material: TlsMaterial) -> tuple:
    chain = x509.load_pem_x509_certificates(Path(material.cert_file).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(material.ca_file).read_bytes())
    return chain, ca


def handshake(material: TlsMaterial, server_hostname: str) -> None:
    """Run a TLS handshake between a client trusting ca.pem and the server context."""
    client_ctx = ssl.create_default_context(cafile=material.ca_file)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = material.context.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_writes_only_the_public_files_and_a_private_server_key(material: TlsMaterial) -> None:
    directory = Path(material.ca_file).parent
    assert _mode(str(directory)) == 0o700
    assert sorted(os.listdir(directory)) == ["ca.pem", "server.key", "server.pem"]
    assert (_mode(material.ca_file), _mode(material.cert_file)) == (0o644, 0o644)
    assert _mode(material.key_file) == 0o600
    # the CA key is discarded: the only private key on disk is the server's own
    for public in (material.ca_file, material.cert_file):
        assert b"PRIVATE KEY" not in Path(public).read_bytes()
    key = serialization.load_pem_private_key(Path(material.key_file).read_bytes(), None)
    (leaf, chained_ca), ca = _leaf_and_ca(material)
    assert leaf.public_key() == key.public_key()
    assert chained_ca == ca  # server.pem carries the chain up to the CA


def test_certificate_names_cover_loopback_and_the_given_hosts(material: TlsMaterial) -> None:
    (leaf, _), _ = _leaf_and_ca(material)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["jobtoken.test", "localhost"]
    assert sorted(map(str, san.get_values_for_type(x509.IPAddress))) == sorted(
        ["127.0.0.1", "::1", "fd00::1", "192.0.2.5"]
    )


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("localhost"),
        x509.DNSName("jobtoken.test"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(ipaddress.ip_address("fd00::1")),
    ],
    ids=lambda name: str(name.value),
)
def test_chain_verifies_against_ca_pem_alone(material: TlsMaterial, name: x509.GeneralName) -> None:
    (leaf, _), ca = _leaf_and_ca(material)
    now = datetime.datetime.now(datetime.timezone.utc)
    verifier = PolicyBuilder().store(Store([ca])).time(now).build_server_verifier(name)
    verifier.verify(leaf, [])


def test_chain_does_not_verify_for_other_names(material: TlsMaterial) -> None:
    (leaf, _), ca = _leaf_and_ca(material)
    now = datetime.datetime.now(datetime.timezone.utc)
    verifier = (
        PolicyBuilder().store(Store([ca])).time(now).build_server_verifier(x509.DNSName("se.test"))
    )
    with pytest.raises(VerificationError):
        verifier.verify(leaf, [])


def test_server_context_completes_a_handshake_for_an_extra_name(material: TlsMaterial) -> None:
    assert material.context.minimum_version >= ssl.TLSVersion.TLSv1_2
    handshake(material, "jobtoken.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(material, "se.test")


def test_unusable_directory_is_a_config_error(tmp_path: Path) -> None:
    occupied = tmp_path / "tls"
    occupied.write_text("a file, not a directory")
    with pytest.raises(ConfigError, match="tls_dir="):
        make_tls(str(occupied), [])


def test_unwritable_material_is_a_config_error(tmp_path: Path) -> None:
    """Documented: ConfigError when the directory "cannot be created or written".

    DevServer.start promises the same, and the CLI maps it to exit 78 (configuration). A
    directory squatting on ``ca.pem`` makes the write fail even for root, unlike a chmod.
    """
    tls_dir = tmp_path / "tls"
    (tls_dir / "ca.pem").mkdir(parents=True)
    with pytest.raises(ConfigError):
        make_tls(str(tls_dir), [])
