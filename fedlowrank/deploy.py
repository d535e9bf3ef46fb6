"""``fedlowrank deploy certs``: what a secure Flower deployment needs, for development and testing.

Writes, with the ``cryptography`` library (no openssl or ssh-keygen needed):

- ``ca.crt`` / ``ca.key``: a development certificate authority (the SuperNodes and the ``flwr`` CLI trust it);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by that CA, valid for the given hosts
  (``localhost``, ``127.0.0.1`` and ``::1`` by default);
- ``nodes/node-<k>`` / ``nodes/node-<k>.pub``: one ECDSA P-384 key pair per SuperNode in OpenSSH format, the
  form ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` take.

Private keys are written readable by their owner only. For production, use your organisation's CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from fedlowrank.config import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DeploymentFiles:
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path
    node_keys: list[Path]  # private keys; the public ones are the same path + ".pub"


def make_certificates(
    output: Path, nodes: int, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = 365, overwrite: bool = False
) -> DeploymentFiles:
    """A development CA, a SuperLink certificate for ``hosts`` and ``nodes`` SuperNode key pairs in ``output``."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if nodes < 1:
        raise ConfigError("--nodes must be >= 1")
    files = DeploymentFiles(
        output / "ca.crt",
        output / "ca.key",
        output / "server.pem",
        output / "server.key",
        [output / "nodes" / f"node-{k}" for k in range(nodes)],
    )
    existing = [p for p in (files.ca_certificate, files.server_certificate, *files.node_keys) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists: pass --overwrite to replace the deployment files in {output}")
    (output / "nodes").mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _certificate("fedlowrank development CA", ca_key, ca_key, None, (), days, is_ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate("fedlowrank SuperLink", server_key, ca_key, ca_cert, hosts, days, is_ca=False)
    _write_pem(files.ca_certificate, ca_cert, None)
    _write_pem(files.ca_key, None, ca_key)
    _write_pem(files.server_certificate, server_cert, None)
    _write_pem(files.server_key, None, server_key)
    for path in files.node_keys:
        _write_node_key(path, ec.generate_private_key(ec.SECP384R1()))
    return files


def _certificate(common_name, key, signer_key, signer_cert, hosts, days, is_ca):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert.subject if signer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if hosts:
        names = [_general_name(host) for host in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer_key, hashes.SHA256())


def _general_name(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_pem(path: Path, certificate, key) -> None:
    from cryptography.hazmat.primitives import serialization

    if certificate is not None:
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(path, data)


def _write_node_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _write_private(path, private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_name(path.name + ".pub").write_bytes(public + b"\n")


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def deployment_commands(files: DeploymentFiles, address: str = "127.0.0.1:8000", federation: str = "secure") -> str:
    """The commands that use these files, to print after making them."""
    ca, link_host = files.ca_certificate.resolve(), address.rsplit(":", 1)
    lines = [
        "# SuperLink (TLS, only registered SuperNodes may join):",
        f"flower-superlink --ssl-ca-certfile {ca} --ssl-certfile {files.server_certificate.resolve()} "
        f"--ssl-keyfile {files.server_key.resolve()} --enable-supernode-auth "
        f"--disable-runtime-dependency-installation --host {link_host[0]} --port {link_host[1]}",
        f'# $FLWR_HOME/config.toml:  [superlink.{federation}]  address = "{address}"  root-certificates = "{ca}"',
    ]
    for k, key in enumerate(files.node_keys):
        lines.append(f"flwr supernode register {key.resolve()}.pub {federation}")
        lines.append(
            f"flower-supernode --root-certificates {ca} --superlink {address} --auth-supernode-private-key "
            f'{key.resolve()} --node-config "partition-id={k} num-partitions={len(files.node_keys)} '
            f"data-dir='/path/to/data' state-dir='/path/to/state-{k}'\" --port {9094 + k}"
        )
    lines.append(f'flwr run . {federation} --stream --run-config "num-clients={len(files.node_keys)}"')
    return "\n".join(lines)
