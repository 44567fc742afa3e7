"""The deploy files agree with the code: compose.yaml sets only settings that exist, fills in
exactly the placeholders of deploy/nginx.conf, and names gateways that it defines; the image
runs jobstream as a non-root user with a health check on /healthz."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from jobstream.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_compose_whenJobstreamServicesConfigured_thenEverySettingExists() -> None:
    services = _compose()["services"]
    jobstream_services = [name for name, spec in services.items() if spec.get("image") == "jobstream:local"]
    assert sorted(jobstream_services) == ["gateway1", "gateway2", "worker"]
    for name in jobstream_services:
        variables = services[name]["environment"]
        settings = {key.removeprefix("JOBSTREAM_").lower() for key in variables if key.startswith("JOBSTREAM_")}
        assert settings <= set(Settings.model_fields), f"{name}: unknown {settings - set(Settings.model_fields)}"
        assert {"redis_url", "token_secret", "archive_url"} <= settings
        # Gateways and workers share the archive (workers write it, gateways read it).
        assert variables["JOBSTREAM_ARCHIVE_URL"].split("@")[1] == "postgres:5432/jobstream"
    assert "postgres" in services and services["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    assert services["worker"]["command"] == ["worker"]
    assert services["worker"]["healthcheck"] == {"disable": True}


def test_compose_whenNginxConfigured_thenFillsExactlyThePlaceholdersWithDefinedGateways() -> None:
    compose = _compose()
    script = " ".join(compose["services"]["nginx"]["command"])
    filled = set(re.findall(r"s/(\{\{\w+\}\})/", script))
    template = (ROOT / "deploy" / "nginx.conf").read_text()
    assert filled == set(re.findall(r"\{\{\w+\}\}", template)) == {"{{GATEWAYS}}", "{{LISTEN}}"}
    upstreams = set(re.findall(r"server (\w+):8000;", script))
    assert upstreams == {"gateway1", "gateway2"} and upstreams <= set(compose["services"])
    listen = re.search(r"s/\{\{LISTEN\}\}/(\d+)/", script)
    assert listen is not None
    assert compose["services"]["nginx"]["ports"] == [f"127.0.0.1:{listen.group(1)}:{listen.group(1)}"]


def test_dockerfile_whenRead_thenNonRootWithHealthcheckAndServeByDefault() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("/healthz" in line for line in lines)
    assert 'ENTRYPOINT ["jobstream"]' in lines
    assert any(line.startswith("CMD") and '"serve"' in line and '"0.0.0.0"' in line for line in lines)
