"""docker-compose.yml is documentation that must run: checked at the YAML level (no Docker here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mailqueue.config import HTTP_KEEP_ALIVE_SECONDS, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APPS = ("migrate", "api", "worker", "mailcatcher")


def _deps(service: dict) -> list[str]:
    deps = service.get("depends_on", [])
    return list(deps) if isinstance(deps, (list, dict)) else []


def test_the_topology_is_complete() -> None:
    assert {"postgresql", "temporal", "temporal-ui", "migrate", "api", "worker", "mailcatcher"} <= set(SERVICES)
    assert SERVICES["worker"]["deploy"]["replicas"] >= 2


def test_dependencies_exist_and_order_startup() -> None:
    for name, service in SERVICES.items():
        for dep in _deps(service):
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
    for name in ("api", "worker"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert SERVICES["temporal"]["depends_on"]["postgresql"]["condition"] == "service_healthy"
    assert "healthcheck" in SERVICES["postgresql"]


def _published(port: str) -> tuple[str, str, str]:
    """ "[host ip:]host port:container port" as (host ip, host port, container port); no ip: every interface."""
    parts = port.split(":")
    return ("0.0.0.0", *parts) if len(parts) == 2 else tuple(parts)  # type: ignore[return-value]


def test_published_ports_are_unique() -> None:
    published = [_published(p)[1] for s in SERVICES.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published


def test_temporal_and_its_ui_answer_on_this_machine_only() -> None:
    """Neither Temporal's gRPC port nor its Web UI asks who is calling: loopback only (so is the caught mail)."""
    for name in ("temporal", "temporal-ui", "mailcatcher"):
        ports = [_published(p) for p in SERVICES[name]["ports"]]
        assert ports and all(ip == "127.0.0.1" for ip, _, _ in ports), (name, ports)
    assert [_published(p)[1:] for p in SERVICES["temporal"]["ports"]] == [("7233", "7233")]
    assert [_published(p)[1:] for p in SERVICES["temporal-ui"]["ports"]] == [("8233", "8080")]


def test_workflow_data_is_encrypted_and_the_ui_decodes_it_through_the_api() -> None:
    from api.routes.codec import PREFIX

    env = SERVICES["api"]["environment"]
    # The key comes from the operator's environment (compose refuses to start without it), never from this file.
    assert re.fullmatch(r"\$\{MAILQUEUE_PAYLOAD_KEYS:\?[^}]+\}", env["MAILQUEUE_PAYLOAD_KEYS"]), env["MAILQUEUE_PAYLOAD_KEYS"]
    # Unsubscribe links: one signing key for all replicas and a public URL, both from the operator.
    for name in ("MAILQUEUE_UNSUBSCRIBE_KEYS", "MAILQUEUE_PUBLIC_URL"):
        assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", env[name]), env[name]
    ui = SERVICES["temporal-ui"]["environment"]
    api_port = _published(SERVICES["api"]["ports"][0])[1]
    # The browser calls the endpoint: the API as published on the host, at the codec route.
    assert ui["TEMPORAL_CODEC_ENDPOINT"] == f"http://127.0.0.1:{api_port}{PREFIX}"
    assert ui["TEMPORAL_CODEC_INCLUDE_CREDENTIALS"] == "true"  # the browser sends its Basic sign-in to /codec
    ui_port = _published(SERVICES["temporal-ui"]["ports"][0])[1]
    origins = Settings(_env_file=None).codec_cors_origins  # type: ignore[call-arg]
    assert f"http://127.0.0.1:{ui_port}" in origins and f"http://localhost:{ui_port}" in origins


def test_app_services_share_one_configuration_of_real_settings() -> None:
    envs = [SERVICES[name]["environment"] for name in APPS]
    assert all(env == envs[0] for env in envs)
    env = envs[0]
    fields = {f"MAILQUEUE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"unknown settings: {set(env) - fields}"
    db_host = re.match(r"postgresql://[^@]+@([^:/]+)", env["MAILQUEUE_DATABASE_URL"]).group(1)  # type: ignore[union-attr]
    assert db_host in SERVICES
    assert env["MAILQUEUE_TEMPORAL_ADDRESS"].split(":")[0] in SERVICES
    assert env["MAILQUEUE_SMTP_HOST"] in SERVICES
    pg = SERVICES["postgresql"]["environment"]
    assert env["MAILQUEUE_DATABASE_URL"].startswith(f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@")
    assert env["MAILQUEUE_DATABASE_URL"].endswith(f"/{pg['POSTGRES_DB']}")
    # Production answers GraphQL without its development aids (issue 15).
    assert env["MAILQUEUE_GRAPHQL_IDE"] == env["MAILQUEUE_GRAPHQL_INTROSPECTION"] == "false"


def test_workers_serve_metrics_to_the_compose_network() -> None:
    """Prometheus scrapes every replica by the service's name: on all its interfaces, published on none."""
    port = int(SERVICES["worker"]["environment"]["MAILQUEUE_WORKER_METRICS_PORT"])
    assert port and Settings(_env_file=None).worker_metrics_host == "0.0.0.0"  # type: ignore[call-arg]
    assert "ports" not in SERVICES["worker"]  # replicas cannot share a host port


def test_commands_run_the_real_entry_points() -> None:
    assert SERVICES["worker"]["command"] == ["python", "worker.py"] and (ROOT / "worker.py").exists()
    assert SERVICES["migrate"]["command"] == ["sh", "-c", "mailqueue migrate && mailqueue templates"]
    assert SERVICES["api"]["environment"]["MAILQUEUE_TEMPLATES_DIR"] == "/app/templates"
    assert "api.app:app" in SERVICES["api"]["command"]
    assert SERVICES["mailcatcher"]["command"][:3] == ["python", "-m", "devstack.catcher"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["uvicorn", "api.app:app"' in dockerfile
    # The API outlasts clients' idle connections (mailqueue.config.HTTP_KEEP_ALIVE_SECONDS), wherever it runs.
    keep_alive = ["--timeout-keep-alive", str(HTTP_KEEP_ALIVE_SECONDS)]
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd and " ".join(keep_alive) in " ".join(yaml.safe_load(cmd.group(1)))
    assert " ".join(keep_alive) in " ".join(SERVICES["api"]["command"])
    assert "COPY templates ./templates" in dockerfile
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        for path in line.split()[:-1]:  # the last word is the destination
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"


def test_the_catcher_command_parses() -> None:
    import argparse

    from devstack import catcher

    seen: dict[str, argparse.Namespace] = {}

    class Stop(Exception):
        pass

    def fake_controller(handler, hostname, port, **kw):  # type: ignore[no-untyped-def]
        seen["args"] = argparse.Namespace(hostname=hostname, port=port)
        raise Stop

    original = catcher.Controller
    catcher.Controller = fake_controller  # type: ignore[assignment]
    try:
        try:
            catcher.main(SERVICES["mailcatcher"]["command"][3:])
        except Stop:
            pass
    finally:
        catcher.Controller = original  # type: ignore[assignment]
    assert seen["args"].port == int(SERVICES["worker"]["environment"]["MAILQUEUE_SMTP_PORT"])
