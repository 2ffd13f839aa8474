"""The certificates and keys a production control plane runs with, made for one test session.

One CA signs the API server's serving certificate and every client certificate; the users are
what Kubernetes' default RBAC already knows (``system:kube-controller-manager``,
``system:kube-scheduler``) plus an administrator in ``system:masters`` for kubectl/helm and the
kubelet stand-in. The ServiceAccount token signing key is a separate RSA key.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=2)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common: str, org: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if org:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(parts)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Pair
    serving: Pair
    admin: Pair
    controller_manager: Pair
    scheduler: Pair
    kueue: Pair  # Kueue's manager (tests/cluster/kueue.py): its own user, so the audit log tells its writes
    sa_private: Path
    sa_public: Path


def make_pki(directory: Path) -> Pki:
    """Write every certificate and key into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key = _key()
    ca_name = _name("spin-operator-test-ca")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca = Pair(directory / "ca.crt", directory / "ca.key")
    ca.cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_key, ca.key)

    def issue(name: str, subject: x509.Name, server: bool) -> Pair:
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.DNSName("localhost"),
                        x509.DNSName("kubernetes"),
                        x509.DNSName("kubernetes.default"),
                        x509.DNSName("kubernetes.default.svc"),
                        x509.DNSName("kubernetes.default.svc.cluster.local"),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, pair.key)
        return pair

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_private, sa_public = directory / "sa.key", directory / "sa.pub"
    _write_key(sa_key, sa_private)
    sa_public.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Pki(
        ca=ca,
        serving=issue("apiserver", _name("kube-apiserver"), server=True),
        admin=issue("admin", _name("spin-test-admin", "system:masters"), server=False),
        controller_manager=issue(
            "controller-manager", _name("system:kube-controller-manager"), server=False
        ),
        scheduler=issue("scheduler", _name("system:kube-scheduler"), server=False),
        kueue=issue("kueue", _name("kueue", "system:masters"), server=False),
        sa_private=sa_private,
        sa_public=sa_public,
    )


def kubeconfig(
    path: Path, server: str, ca: Path, user: Pair | None = None, token: str | None = None
) -> Path:
    """A kubeconfig for ``server`` with a client certificate or a bearer token."""
    import yaml

    credentials: dict[str, str] = (
        {"client-certificate": str(user.cert), "client-key": str(user.key)}
        if user
        else {"token": token or ""}
    )
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "spin-test", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": "user", "user": credentials}],
        "contexts": [{"name": "spin-test", "context": {"cluster": "spin-test", "user": "user"}}],
        "current-context": "spin-test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
