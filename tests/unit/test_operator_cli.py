"""`foveal operator` command line: argument checks and the kubeconfig loading it relies on."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from foveal.cli import app
from foveal.operator.kube import connection_info, load_credentials, object_path


def flat(text: str) -> str:
    """The CLI's error box, as one line (rich wraps long messages)."""
    return " ".join(text.replace("│", " ").split())


def test_run_needs_namespaces_or_all_namespaces() -> None:
    result = CliRunner().invoke(app, ["operator", "run"])
    assert result.exit_code == 2
    assert "name the namespaces to serve (--namespace) or --all-namespaces" in flat(result.output)
    both = CliRunner().invoke(app, ["operator", "run", "-n", "a", "--all-namespaces"])
    assert both.exit_code == 2 and "not both" in flat(both.output)


def test_run_rejects_a_missing_kubeconfig(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = CliRunner().invoke(app, ["operator", "run", "-n", "a", "--kubeconfig", str(missing)])
    assert result.exit_code == 2
    assert "--kubeconfig" in flat(result.output) and "no such file" in flat(result.output)


def test_credentials_from_a_kubeconfig(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://127.0.0.1:6443",
                            "insecure-skip-tls-verify": True,
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"token": "s3cret"}}],
                "contexts": [
                    {"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "demo"}}
                ],
                "current-context": "x",
            }
        )
    )
    creds = load_credentials(str(kubeconfig))
    assert (creds.server, creds.token, creds.insecure) == ("https://127.0.0.1:6443", "s3cret", True)
    assert creds.default_namespace == "demo"
    info = connection_info(creds)
    assert (info.server, info.scheme, info.token, info.insecure) == (
        "https://127.0.0.1:6443",
        "Bearer",
        "s3cret",
        True,
    )


def test_object_paths() -> None:
    assert object_path("v1", "Service", "demo", "s") == "/api/v1/namespaces/demo/services/s"
    assert (
        object_path("policy/v1beta1", "PodDisruptionBudget", "demo", "p")
        == "/apis/policy/v1beta1/namespaces/demo/poddisruptionbudgets/p"
    )
    assert (
        object_path("foveal.io/v1alpha1", "ModelPool", "demo")
        == "/apis/foveal.io/v1alpha1/namespaces/demo/modelpools"
    )
