"""Development certificates and agent keys for deployments (``fedtune certs``, ``fedtune keygen``).

TLS: a self-signed CA and a server certificate it signs, with the coordinator's host
names and IPs as subject alternative names. Agents verify the coordinator with
``ca.crt``. Authentication: each agent holds an EC P-384 key pair in OpenSSH format
(what Flower's SuperNode authentication expects); the coordinator registers the public
halves, and a SuperNode whose key is not registered is refused.
For production, use certificates from your own CA; the layout stays the same.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.core.errors import UserError

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.crt", "server.key"
VALID_DAYS = 365


def make_certs(directory: Path, hosts: list[str]) -> dict[str, Path]:
    """Write ca.crt/ca.key and server.crt/server.key for ``hosts`` (plus localhost)."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = [n for n in (CA_CERT, SERVER_CERT, SERVER_KEY) if (directory / n).exists()]
    if existing:
        raise UserError(f"{directory} already holds {', '.join(existing)}; use an empty directory")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = sorted(set(hosts) | {"localhost", "127.0.0.1", "::1"})
    alt_names = [_alt_name(host) for host in names]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / "ca.key", ca_key)
    _write_key(directory / SERVER_KEY, server_key)
    (directory / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return {name: directory / name for name in (CA_CERT, SERVER_CERT, SERVER_KEY)}


def make_agent_key(path: Path) -> Path:
    """Write an agent's private key (``path``, mode 600) and public key (``path.pub``)."""
    if path.exists():
        raise UserError(f"{path} already exists; agent keys are never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    path.touch(mode=0o600)
    path.write_bytes(private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path = path.with_name(path.name + ".pub")
    public_path.write_bytes(public + b" fedtune-agent\n")
    return public_path


def public_key_files(source: Path) -> list[Path]:
    """Public keys to authorize: one ``.pub`` file, or every ``*.pub`` in a directory.

    A key's file stem (``acme`` for ``acme.pub``) is the name of the agent holding it.
    """
    if source.is_dir():
        files = sorted(source.glob("*.pub"))
    elif source.is_file():
        files = [source]
    else:
        raise UserError(f"--authorized-keys {source}: no such file or directory")
    if not files:
        raise UserError(f"--authorized-keys {source}: no *.pub files")
    for file in files:
        if not re.fullmatch(r"[\w.-]{1,64}", file.stem):
            raise UserError(f"{file}: the file's stem is the agent's name; use 1-64 letters, digits, '.', '_' or '-'")
        try:
            key = serialization.load_ssh_public_key(file.read_bytes())
        except ValueError:
            raise UserError(f"{file}: not an OpenSSH public key (make one with fedtune keygen)") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise UserError(f"{file}: Flower needs an EC (NIST curve) key; make one with fedtune keygen")
    return files


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.touch(mode=0o600)
    os.chmod(path, 0o600)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
