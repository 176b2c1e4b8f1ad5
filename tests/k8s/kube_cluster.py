"""A real control plane on loopback for the ``k8s`` tier: etcd + kube-apiserver +
kube-controller-manager (the binaries :file:`scripts/kube_binaries.sh` builds and caches), started in a
temporary directory with freshly generated TLS certificates, a service-account signing key and an
admin client certificate (``O=system:masters``), on free ports, with a kubeconfig file for clients.

There is no scheduler and no kubelet: :mod:`tests.k8s.kubelet` plays the node. The ServiceAccount
admission plugin is off so pods are accepted in a brand-new namespace at once (with it, pod creation
waits for the token controller, and the Job controller's back-off stretches tests by ~10 s). Every
process runs in its own session; :meth:`Cluster.stop` kills each process group, so nothing outlives it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from forgeline_operators.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kube_binaries.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
# The controllers the tests rely on; the rest (certificates, nodes, cloud...) only cost CPU here.
CONTROLLERS = "garbagecollector,deployment,replicaset,job,namespace,serviceaccount"


def binaries_dir() -> Path:
    """Where the cached binaries live (never builds: ``--dir`` only prints the path)."""
    out = subprocess.run(["bash", str(SCRIPT), "--dir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def missing_binaries(d: Path) -> list[str]:
    return [b for b in BINARIES if not os.access(d / b, os.X_OK)]


def require_binaries(d: Path, ci: bool) -> Path:
    """``d`` if it holds every binary; else fail (in CI) or skip, naming the command that builds them."""
    missing = missing_binaries(d)
    if missing:
        msg = (
            f"the k8s tier needs {', '.join(missing)} in {d}; build them once (6-20 min, cached): "
            f"bash {SCRIPT.relative_to(SCRIPT.parents[1])}"
        )
        if ci:
            pytest.fail(msg)
        pytest.skip(msg)
    return d


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )


def _cert(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def write_pki(d: Path) -> None:
    """CA, API server serving cert (127.0.0.1/localhost), admin client cert, service-account key."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert(_name("forgeline-test-ca"), ca_key, _name("forgeline-test-ca"), ca_key, ca=True)
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes.default.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    ]
    for stem, subject, extra in (
        ("apiserver", _name("kube-apiserver"), sans),
        ("admin", _name("admin", "system:masters"), None),
    ):
        k = _key()
        _write_key(d / f"{stem}.key", k)
        (d / f"{stem}.crt").write_bytes(
            _cert(subject, k, ca.subject, ca_key, sans=extra).public_bytes(serialization.Encoding.PEM)
        )
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(d / "ca.key", ca_key)
    sa = _key()
    _write_key(d / "sa.key", sa)
    (d / "sa.pub").write_bytes(
        sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def issue_client_cert(pki: Path, stem: str, user: str, groups: tuple[str, ...] = ()) -> None:
    """A client certificate for ``user`` (CN) in ``groups`` (O), signed by the cluster CA."""
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, user)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    k = _key()
    _write_key(pki / f"{stem}.key", k)
    cert = _cert(x509.Name(attrs), k, ca.subject, ca_key)
    (pki / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def kubeconfig_text(server: str, pki: Path, stem: str = "admin") -> str:
    return f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: {server}
    certificate-authority: {pki / "ca.crt"}
users:
- name: admin
  user:
    client-certificate: {pki / f"{stem}.crt"}
    client-key: {pki / f"{stem}.key"}
contexts:
- name: test
  context: {{cluster: test, user: admin}}
current-context: test
"""


def _die_with_parent() -> None:
    """SIGKILL this control-plane process when the test process dies, however it dies (a killed
    pytest otherwise left etcd, kube-apiserver and kube-controller-manager running)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Cluster:
    """One control plane; ``start()`` returns when ``/readyz`` answers ok, ``stop()`` kills it all."""

    bin_dir: Path
    work: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    server: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    crds: list[str] = field(default_factory=list)

    @property
    def kubeconfig(self) -> Path:
        return self.work / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.work / "pki"

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 -- lives as long as the process
        self.procs[name] = subprocess.Popen(
            [str(self.bin_dir / name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() kills children too
            preexec_fn=_die_with_parent,
        )

    def log_tail(self, name: str, n: int = 4000) -> str:
        p = self.work / f"{name}.log"
        return p.read_bytes()[-n:].decode(errors="replace") if p.exists() else ""

    def start(
        self, deadline_s: float = 90, before_controllers: Callable[[Cluster], None] | None = None
    ) -> Cluster:
        """Start everything; ``before_controllers`` runs once the API server is ready (install CRDs
        there: the garbage collector only watches kinds it saw at start or at its 30 s resync)."""
        t0 = time.monotonic()
        write_pki(self.pki)
        etcd_port, peer_port, api_port, cm_port = free_ports(4)  # distinct: picked together
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn(
            "etcd",
            [
                f"--data-dir={self.work / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--log-level=warn",
            ],
        )
        pki = self.pki
        self.server = f"https://127.0.0.1:{api_port}"
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--insecure-port=0",
                f"--cert-dir={self.work / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--api-audiences=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
                "--v=0",
            ],
        )
        self.kubeconfig.write_text(kubeconfig_text(self.server, pki))
        self._wait_ready(deadline_s - (time.monotonic() - t0))
        self.timings["apiserver_ready_s"] = time.monotonic() - t0
        if before_controllers is not None:
            before_controllers(self)
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--port=0",
                f"--secure-port={cm_port}",
                "--bind-address=127.0.0.1",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                # Sync quickly: the tests wait on Deployments, Jobs and GC within seconds.
                "--concurrent-gc-syncs=5",
                "--v=0",
            ],
        )
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def user_kubeconfig(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig that authenticates as ``user`` (e.g. ``system:serviceaccount:NS:NAME``, which
        RBAC bindings to that ServiceAccount match) with a client certificate; RBAC applies to it."""
        stem = "user-" + "".join(ch if ch.isalnum() else "-" for ch in user)
        issue_client_cert(self.pki, stem, user, groups)
        path = self.work / f"{stem}.kubeconfig"
        path.write_text(kubeconfig_text(self.server, self.pki, stem))
        return path

    def _ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _wait_ready(self, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        ctx = self._ssl()
        last = ""
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) during start:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError as e:  # connection refused while starting, 500 while post-start hooks run
                last = str(e)
            time.sleep(0.2)
        raise RuntimeError(
            f"kube-apiserver not ready after {deadline_s:.0f} s ({last}):\n{self.log_tail('kube-apiserver')}"
        )

    def pgids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def stop(self, grace_s: float = 3) -> None:
        # Reverse start order: controllers first, etcd last.
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        t0 = time.monotonic()
        end = t0 + grace_s
        for name, p in self.procs.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, end - time.monotonic()))
            self.timings[f"stop_{name}_s"] = time.monotonic() - t0
            with contextlib.suppress(ProcessLookupError):  # what is left in the group, or ignored SIGTERM
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
