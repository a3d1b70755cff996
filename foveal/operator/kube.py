"""A small asyncio client for the few API calls the operator makes itself.

kopf watches and patches the objects it handles; the operator additionally applies children
(server-side apply), patches status and the scale subresource of ModelPools it is not
currently handling (from the Deployment watch and the autoscaler loop), posts Events and reads
discovery.
The official ``kubernetes`` client is synchronous, so these calls go through aiohttp with the
same credentials the official client loads (kubeconfig or in-cluster service account); kopf
logs in with the very same credentials (:func:`connection_info`).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

__all__ = [
    "Credentials",
    "KubeApiError",
    "KubeClient",
    "connection_info",
    "load_credentials",
    "object_path",
]

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"

# Kinds whose REST path the operator builds (plural names cannot be derived reliably).
_PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "ModelPool": "modelpools",
    "RoutingPolicy": "routingpolicies",
    "Event": "events",
}


@dataclass(frozen=True, slots=True)
class Credentials:
    server: str
    token: str | None = None
    ca_path: str | None = None
    insecure: bool = False
    cert_path: str | None = None
    key_path: str | None = None
    username: str | None = None
    password: str | None = None
    default_namespace: str | None = None


def load_credentials(kubeconfig: str | None = None, context: str | None = None) -> Credentials:
    """In-cluster service account when running in a pod (and no kubeconfig is given), else
    the kubeconfig (``kubeconfig`` path, ``$KUBECONFIG`` or ``~/.kube/config``)."""
    from kubernetes import client, config

    cfg = client.Configuration()
    namespace = None
    try:
        if kubeconfig is not None:
            raise config.ConfigException("explicit kubeconfig")
        config.load_incluster_config(client_configuration=cfg)
        try:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                namespace = f.read().strip() or None
        except OSError:
            namespace = None
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        if context is None and active:
            namespace = active.get("context", {}).get("namespace")
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
        "authorization"
    )
    token = header.split(" ", 1)[-1] if header else None
    return Credentials(
        server=cfg.host.rstrip("/"),
        token=token,
        ca_path=cfg.ssl_ca_cert or None,
        insecure=not cfg.verify_ssl,
        cert_path=cfg.cert_file or None,
        key_path=cfg.key_file or None,
        username=cfg.username or None,
        password=cfg.password or None,
        default_namespace=namespace,
    )


def connection_info(creds: Credentials) -> kopf.ConnectionInfo:
    """The same credentials in kopf's form (for its ``on.login`` handler)."""
    return kopf.ConnectionInfo(
        server=creds.server,
        ca_path=creds.ca_path,
        insecure=creds.insecure,
        scheme="Bearer" if creds.token else None,
        token=creds.token,
        username=creds.username,
        password=creds.password,
        certificate_path=creds.cert_path,
        private_key_path=creds.key_path,
        default_namespace=creds.default_namespace,
    )


class KubeApiError(Exception):
    """A non-2xx answer; ``status`` is the HTTP code, the message is the API server's."""

    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        self.status = status
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """REST path of a namespaced object (or its collection when ``name`` is None)."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{_PLURALS[kind]}"
    return f"{path}/{name}" if name else path


class KubeClient:
    """aiohttp session bound to one API server; every method raises :class:`KubeApiError`."""

    def __init__(
        self,
        creds: Credentials,
        *,
        reload: Callable[[], Credentials] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.creds = creds
        self._reload = reload  # called once on HTTP 401 (expired token), then retried
        ctx: ssl.SSLContext | bool
        if creds.insecure:
            ctx = False
        else:
            ctx = ssl.create_default_context(cafile=creds.ca_path)
            if creds.cert_path:
                ctx.load_cert_chain(creds.cert_path, creds.key_path)
        self._session = aiohttp.ClientSession(
            headers={"Accept": "application/json"},
            connector=aiohttp.TCPConnector(ssl=ctx),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    def _auth(self) -> tuple[dict[str, str], aiohttp.BasicAuth | None]:
        if self.creds.token:
            return {"Authorization": f"Bearer {self.creds.token}"}, None
        if self.creds.username:
            return {}, aiohttp.BasicAuth(self.creds.username, self.creds.password or "")
        return {}, None

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body)
        for attempt in (1, 2):
            headers, auth = self._auth()
            if data is not None:
                headers["Content-Type"] = content_type
            # Full URLs rather than aiohttp's base_url: servers behind a path prefix keep it.
            url = self.creds.server + path
            async with self._session.request(
                method, url, data=data, headers=headers, params=params, auth=auth
            ) as resp:
                text = await resp.text()
                status = resp.status
            if status == 401 and attempt == 1 and self._reload is not None:
                self.creds = self._reload()
                continue
            break
        if status >= 300:
            try:
                message = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                message = text
            raise KubeApiError(status, method, path, str(message).strip()[:2000])
        return json.loads(text) if text else {}

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def apply(self, obj: dict[str, Any], *, field_manager: str) -> dict[str, Any]:
        """Server-side apply (creates or updates; fields this manager dropped are removed)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        return await self.request(
            "PATCH",
            path,
            body=obj,
            content_type=APPLY_PATCH,
            params={"fieldManager": field_manager, "force": "true"},
        )

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """POST ``obj`` to its collection (``metadata.generateName`` picks a unique name)."""
        path = object_path(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"])
        return await self.request("POST", path, body=obj)

    async def delete(self, path: str) -> bool:
        """True when something was deleted, False when it was already gone."""
        try:
            await self.request("DELETE", path, body={"propagationPolicy": "Background"})
        except KubeApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def group_versions(self, group: str) -> list[str]:
        """``group/version`` strings the server serves for ``group`` (discovery)."""
        found = await self.get(f"/apis/{group}")
        if not found:
            return []
        return [v["groupVersion"] for v in found.get("versions", []) if "groupVersion" in v]
