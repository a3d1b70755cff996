"""A real, throwaway Kubernetes control plane on loopback, for end-to-end tests.

It runs etcd, kube-apiserver and kube-controller-manager (Kubernetes 1.20, built from Debian's
source package by ``scripts/k8s-build.sh`` into ``${FOVEAL_K8S_CACHE:-~/.cache/foveal-k8s}/bin``)
on free 127.0.0.1 ports, like envtest: the API, CRDs, RBAC, admission, garbage collection and the
built-in controllers (Deployment -> ReplicaSet, namespaces, service accounts, ...) are real, but
no pod ever runs (there is no scheduler and no kubelet).

Authentication is a static bearer token of a ``system:masters`` user. The API server serves TLS
with a certificate it makes itself (valid for 127.0.0.1); the kubeconfig carries that certificate
as ``certificate-authority-data``, so clients verify the server like on a real cluster.

Example::

    from foveal.testing.kube import running_kube

    with running_kube() as kube:
        kube.kubectl("create", "namespace", "demo", check=True)
        from kubernetes import client
        core = client.CoreV1Api(kube.api_client())
        assert core.read_namespace("demo").metadata.name == "demo"
        # anything that takes a kubeconfig: helm_python.Config(kubeconfig_path=str(kube.kubeconfig))

The ``kube`` fixture in ``tests/e2e/conftest.py`` shares one cluster per test session; tests
keep apart by working in their own namespace (:meth:`KubeCluster.create_namespace`).
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # the kubernetes client is an optional dependency (extra "operator")
    from kubernetes.client import ApiClient

__all__ = [
    "KubeBinariesNotFound",
    "KubeCluster",
    "KubeStartError",
    "KubectlError",
    "find_kube_bin",
    "find_kubectl",
    "k8s_cache_dir",
    "running_kube",
]

log = logging.getLogger(__name__)

_TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager")
_BUILD_SCRIPT = "scripts/k8s-build.sh"
_USER = "foveal-admin"


class KubeBinariesNotFound(RuntimeError):
    """etcd / kube-apiserver / kube-controller-manager have not been built yet."""


class KubeStartError(RuntimeError):
    """The control plane did not come up; the message carries the tail of the failing log."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike CalledProcessError, the message includes its stderr."""

    def __str__(self) -> str:
        args = " ".join(str(a) for a in self.cmd[3:])
        return f"kubectl {args} exited with {self.returncode}: {(self.stderr or '').strip()}"


def k8s_cache_dir() -> Path:
    """Where ``scripts/k8s-build.sh`` puts its work: ``$FOVEAL_K8S_CACHE`` or
    ``~/.cache/foveal-k8s``."""
    env = os.environ.get("FOVEAL_K8S_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "foveal-k8s"


def find_kube_bin() -> Path | None:
    """The directory holding the three control-plane binaries; None when one is missing."""
    bindir = k8s_cache_dir() / "bin"
    if all(os.access(bindir / tool, os.X_OK) for tool in _TOOLS):
        return bindir
    return None


def find_kubectl() -> Path | None:
    """``$FOVEAL_KUBECTL``, else ``kubectl`` on PATH, else ``/usr/bin/kubectl``."""
    for cand in (os.environ.get("FOVEAL_KUBECTL"), shutil.which("kubectl"), "/usr/bin/kubectl"):
        if cand and os.access(cand, os.X_OK):
            return Path(cand)
    return None


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open together, so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_service_account_keys(private: Path, public: Path) -> None:
    """An RSA key pair the API server signs (and checks) service-account tokens with."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise KubeStartError(
                "need the `cryptography` package or the `openssl` command to make the "
                "service-account keys"
            ) from None
        for cmd in (
            [openssl, "genrsa", "-out", str(private), "2048"],
            [openssl, "rsa", "-in", str(private), "-pubout", "-out", str(public)],
        ):
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class KubeCluster:
    """etcd + kube-apiserver + kube-controller-manager in ``workdir`` (a new temporary
    directory, deleted on :meth:`stop`, when None).

    After :meth:`start`: :attr:`server` (``https://127.0.0.1:<port>``), :attr:`token` (bearer
    token of a ``system:masters`` user), :attr:`kubeconfig` (a file for kubectl, the kubernetes
    client, kopf, helm), :meth:`api_client`, :meth:`kubectl`; :attr:`logs` maps each process to
    its log file (kept in ``workdir``), :attr:`ready_s` is how long start-up took and
    :attr:`timings` when each process was ready (seconds since :meth:`start` began).
    ``controller_manager=False`` skips kube-controller-manager (no Deployment/GC controllers).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        bin_dir: Path | None = None,
        controller_manager: bool = True,
    ) -> None:
        found = bin_dir or find_kube_bin()
        if found is None:
            raise KubeBinariesNotFound(
                f"etcd, kube-apiserver and kube-controller-manager not found in "
                f"{k8s_cache_dir() / 'bin'}; build them with {_BUILD_SCRIPT} (takes minutes; "
                f"FOVEAL_K8S_CACHE moves the cache)"
            )
        self.bin_dir = found
        self.controller_manager = controller_manager
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="foveal-kube-")) if workdir is None else workdir
        self.token = secrets.token_hex(24)
        self.port = 0
        self.etcd_url = ""
        self.ready_s: float | None = None
        self.timings: dict[str, float] = {}
        self._began = 0.0
        self._tls = _insecure_tls()  # until the API server has made its certificate
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._log_files: list[IO[bytes]] = []

    # ---- what tests use ------------------------------------------------------------------------

    @property
    def server(self) -> str:
        """The API server's URL."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def ca_cert(self) -> Path:
        """PEM the API server's certificate verifies against (it is in the kubeconfig too)."""
        return self.workdir / "pki" / "apiserver.crt"

    @property
    def logs(self) -> dict[str, Path]:
        """Log file of each process, by name (etcd, kube-apiserver, kube-controller-manager)."""
        return {name: self.workdir / f"{name}.log" for name in _TOOLS}

    @property
    def pids(self) -> dict[str, int]:
        """Pids of the processes still running."""
        return {n: p.pid for n, p in self._procs.items() if p.poll() is None}

    def api_client(self) -> ApiClient:
        """A new ``kubernetes.client.ApiClient`` configured from :attr:`kubeconfig` (close it
        when done, e.g. ``with kube.api_client() as api: ...``)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl(
        self,
        *args: str,
        check: bool = False,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl --kubeconfig <ours> *args``; text output captured.

        The image's kubectl is v1.32, newer than this 1.20 server (beyond the supported skew;
        ``kubectl version`` warns about it). get/create/apply (also ``--server-side`` and
        ``--dry-run=server``)/delete/patch/wait work without extra flags: 1.20 has no server-side
        field validation, so kubectl validates against the server's OpenAPI schema itself
        (unknown fields are errors; ``--validate=false`` skips that). ``check=True`` raises
        KubectlError (a CalledProcessError whose message includes kubectl's stderr).
        """
        kubectl = find_kubectl()
        if kubectl is None:
            raise FileNotFoundError("kubectl not found (set FOVEAL_KUBECTL or put it on PATH)")
        cmd = [
            str(kubectl),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, output=proc.stdout, stderr=proc.stderr)
        return proc

    def create_namespace(self, prefix: str = "e2e") -> str:
        """Create a namespace with a unique name starting with ``prefix``; returns its name."""
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        return name

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        """One authenticated API call (JSON in, JSON out), without the kubernetes client."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout, context=self._tls) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout_s: float = 120.0) -> KubeCluster:
        """Start the three processes and wait until the API server is ready and the controller
        manager works (it has made the ``default`` service account). On any failure everything
        already started is stopped and KubeStartError names the log to read."""
        if self._procs:
            raise RuntimeError("this KubeCluster was already started")
        began = self._began = time.monotonic()
        deadline = began + timeout_s
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._prepare_files()
            # A port picked free may be taken before the process binds it: retry with new ones.
            for attempt in range(3):
                try:
                    self._start_etcd(deadline)
                    self._start_apiserver(deadline)
                    break
                except _PortTaken:
                    log.info("a picked port was taken; retrying (attempt %d)", attempt + 1)
                    self._stop_processes()
            else:
                raise KubeStartError("could not find free loopback ports for etcd/kube-apiserver")
            if self.controller_manager:
                self._start_controller_manager(deadline)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - began
        self.timings["ready"] = self.ready_s
        _live.add(self)
        log.info("kube-apiserver ready on %s in %.1f s", self.server, self.ready_s)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL after ``timeout_s``); delete the workdir
        when it was a temporary one."""
        _live.discard(self)
        self._stop_processes(timeout_s)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KubeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals ---------------------------------------------------------------------------

    def _prepare_files(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        (pki / "tokens.csv").write_text(f"{self.token},{_USER},{_USER},system:masters\n")
        _write_service_account_keys(pki / "sa.key", pki / "sa.pub")

    def _write_kubeconfig(self) -> None:
        """Trust the certificate the API server made (it is valid for 127.0.0.1) from now on."""
        ca = self.ca_cert.read_bytes()
        self._tls = ssl.create_default_context(cadata=ca.decode())
        # JSON is valid YAML; every kubeconfig reader accepts it.
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "foveal",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": base64.b64encode(ca).decode(),
                    },
                }
            ],
            "users": [{"name": _USER, "user": {"token": self.token}}],
            "contexts": [{"name": "foveal", "context": {"cluster": "foveal", "user": _USER}}],
            "current-context": "foveal",
        }
        self.kubeconfig.write_text(json.dumps(cfg, indent=2) + "\n")
        self.kubeconfig.chmod(0o600)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        logf = open(self.logs[name], "wb")  # noqa: SIM115 (closed in _stop_processes)
        self._log_files.append(logf)
        proc = subprocess.Popen(
            [str(self.bin_dir / name), *args],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop them in order
        )
        self._procs[name] = proc
        log.debug("started %s (pid %d)", name, proc.pid)
        return proc

    def _check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is None:
            return
        tail = _tail(self.logs[name])
        if "address already in use" in tail:
            raise _PortTaken(name)
        raise KubeStartError(
            f"{name} exited with status {proc.returncode} while starting; "
            f"log {self.logs[name]}:\n{tail}"
        )

    def _wait(self, name: str, what: str, ready: Callable[[], bool], deadline: float) -> None:
        """Poll ``ready()`` until true; fail when ``name`` dies or the deadline passes."""
        delay = 0.05
        while True:
            self._check_alive(name)
            if ready():
                return
            if time.monotonic() > deadline:
                raise KubeStartError(
                    f"timed out waiting for {what}; log {self.logs[name]}:\n"
                    f"{_tail(self.logs[name])}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _start_etcd(self, deadline: float) -> None:
        client, peer = _free_ports(2)
        self.etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        data = self.workdir / "etcd"
        shutil.rmtree(data, ignore_errors=True)
        self._spawn(
            "etcd",
            [
                f"--data-dir={data}",
                "--name=default",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as resp:
                    return bool(json.loads(resp.read()).get("health") == "true")
            except (OSError, ValueError):
                return False

        self._wait("etcd", "etcd /health", healthy, deadline)
        self.timings["etcd"] = time.monotonic() - self._began

    def _start_apiserver(self, deadline: float) -> None:
        (self.port,) = _free_ports(1)
        pki = self.workdir / "pki"
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--insecure-port=0",
                f"--cert-dir={pki}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                # No token controller runs, so pods must not need a service-account token.
                "--disable-admission-plugins=ServiceAccount",
                "--profiling=false",
            ],
        )

        def ready() -> bool:
            try:
                return bool(self.request("GET", "/readyz", timeout=2) == "ok")
            except (OSError, ValueError):
                return False

        self._wait("kube-apiserver", "kube-apiserver /readyz", ready, deadline)
        self._write_kubeconfig()
        self.timings["kube-apiserver"] = time.monotonic() - self._began

    def _start_controller_manager(self, deadline: float) -> None:
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--port=0",
                f"--service-account-private-key-file={self.workdir / 'pki' / 'sa.key'}",
                "--use-service-account-credentials=false",
                "--controllers=*,-serviceaccount-token",
            ],
        )

        def working() -> bool:
            # The service-account controller makes "default" in every namespace: a sign that
            # the controllers have synced their caches and act.
            try:
                self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default", timeout=2)
                return True
            except (OSError, ValueError):
                return False

        self._wait("kube-controller-manager", "the controller manager", working, deadline)
        self.timings["kube-controller-manager"] = time.monotonic() - self._began

    def _stop_processes(self, timeout_s: float = 15.0) -> None:
        # Reverse start order: controllers, then the API server, then etcd.
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                    proc.kill()
                    proc.wait(timeout=timeout_s)
        for f in self._log_files:
            f.close()
        self._log_files.clear()


class _PortTaken(Exception):
    """A process could not bind a port we picked as free."""


def _insecure_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# Clusters still running when the interpreter exits (a test run cut short) are stopped too.
_live: set[KubeCluster] = set()


@atexit.register
def _stop_live() -> None:
    for cluster in list(_live):
        cluster.stop()


@contextmanager
def running_kube(workdir: Path | None = None, *, timeout_s: float = 120.0) -> Iterator[KubeCluster]:
    """Run a control plane for the ``with`` block (see the module docstring for an example).

    ``workdir`` keeps the files (kubeconfig, PKI, etcd data, logs) after the block; by default a
    temporary directory is used and deleted. Raises KubeBinariesNotFound when
    ``scripts/k8s-build.sh`` has not been run, KubeStartError when the cluster does not come up.
    """
    with ExitStack() as stack:
        cluster = KubeCluster(workdir)
        stack.callback(cluster.stop)
        yield cluster.start(timeout_s=timeout_s)
