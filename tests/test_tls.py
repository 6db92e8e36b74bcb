"""TLS: a server given a certificate serves https. Clients that trust it (``--ca-file``) join,
train and read the status; clients that do not are refused with a one-line error."""

import datetime
import ipaddress
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation_procs import stamen, start_server, stdlib_folders
from stamen.core.errors import UserError
from stamen.cli_federation import fetch_status
from stamen.server.auth import create_token

FED = "[aggregation]\nbuffer_k = 1\n[tiers.gpu]\nsteps = 2\nbatch_size = 2\n"


def self_signed(folder):
    """A certificate for 127.0.0.1 that is its own CA, as an operator's self-signed one is."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stamen test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(root)
    (root / "fed.toml").write_text(FED)
    proc, url = start_server(root / "state", root / "fed.toml", tls=(cert, key))
    try:
        yield url, root, cert
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_status_over_https_needs_the_certificate(tls_server):
    url, root, cert = tls_server
    assert url.startswith("https://127.0.0.1:")
    admin = create_token(root / "state", "admin")
    assert fetch_status(url, admin, ca_file=str(cert))["version"] == 0
    with pytest.raises(UserError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch_status(url, admin)
    refused = stamen("status", url, "--token", admin)
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "certificate verify failed" in refused.stderr
    assert json.loads(stamen("status", url, "--token", admin, "--ca-file", cert, "--json").stdout)["version"] == 0


def test_a_client_trains_over_https(tls_server):
    url, root, cert = tls_server
    [data] = stdlib_folders(root, [["json"]])
    token = create_token(root / "state", "gpu")
    ran = stamen("client", "--server", url, "--token", token, "--data", data, "--role", "gpu",
                 "--state", root / "client", "--max-tasks", "1", "--ca-file", cert)
    assert ran.returncode == 0, ran.stderr
    status = fetch_status(url, create_token(root / "state", "admin"), ca_file=str(cert))
    assert status["version"] == 1  # buffer_k = 1: the one update published a version


def test_a_missing_ca_file_is_a_user_error(tls_server, tmp_path):
    url, _, _ = tls_server
    missing = stamen("status", url, "--ca-file", tmp_path / "nope.pem")
    assert missing.returncode == 2 and "CA file not found" in missing.stderr
