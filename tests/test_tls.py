"""The service on an ssl: listener, reached by clients that verify its certificate."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .support import Service, authorize_url, exchange_code, form_fields, free_port, get_code, introspect, pkce_pair


def self_signed(directory):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def tls_service(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    key, cert = self_signed(directory)
    port = free_port()
    running = Service.start(directory, url=f"https://127.0.0.1:{port}",
                            listen=[f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"],
                            verify=str(cert))
    yield running
    running.stop()


def test_code_grant_over_verified_tls(tls_service):
    service = tls_service
    client = service.client("--redirect-uri", "https://app.example/cb", "--scope", "imap")
    resource_server = service.client("--grant", "client_credentials", "--scope", "imap", "--resource-server")
    username, password = service.user()
    code, verifier = get_code(service, client, username, password)
    response = exchange_code(service, client, code, verifier)
    assert response.status_code == 200, response.text
    assert introspect(service, resource_server, response.json()["access_token"])["active"]
    metadata = requests.get(f"{service.url}/.well-known/oauth-authorization-server", verify=service.verify).json()
    assert metadata["issuer"] == service.url and metadata["token_endpoint"].startswith("https://")


def test_session_cookie_is_secure_over_https(tls_service):
    service = tls_service
    client = service.client("--redirect-uri", "https://app.example/cb", "--scope", "imap")
    username, password = service.user()
    _, challenge = pkce_pair()
    with requests.Session() as browser:
        browser.trust_env, browser.verify = False, service.verify
        page = browser.get(authorize_url(service.url, client["client_id"], "https://app.example/cb", challenge))
        assert "Secure" in page.headers["Set-Cookie"]
        action, fields = form_fields(page.text)
        page = browser.post(service.url + action, data={**fields, "username": username, "password": password})
        assert all("Secure" in c for c in page.raw.headers.getlist("Set-Cookie"))


def test_a_client_that_does_not_trust_the_certificate_refuses(tls_service):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{tls_service.url}/healthz", verify=True)
