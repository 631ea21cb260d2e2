"""Config: defaults, parsing, and one clear error naming the bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from eecp.core.capacity import ListenerCaps, listener_caps
from eecp.core.config import Config, Network, from_env
from eecp.core.errors import ConfigError


def test_defaults_match_the_documented_ones() -> None:
    cfg = from_env({})
    assert cfg == Config()
    assert (cfg.control_bind, cfg.control_port) == ("0.0.0.0", 8088)
    assert (cfg.proxy_bind, cfg.proxy_port) == ("0.0.0.0", 9090)
    assert cfg.db_path == Path("data/control-plane.db") and cfg.db_url is None
    assert cfg.networks == (Network("forge-1", True), Network("sandbox-1", False))
    assert cfg.allowlist_asset == "agent-attestation-allowlist.json"
    assert cfg.github_api_url == "https://api.github.com"
    assert cfg.pccs_url == "https://api.trustedservices.intel.com"
    assert cfg.allowed_tcb_statuses == {"UpToDate", "SWHardeningNeeded"}
    assert (cfg.attest_interval_sec, cfg.attest_deadline_sec, cfg.health_timeout_sec) == (
        3600, 30, 120)
    assert (cfg.registration_ttl_days, cfg.registration_warn_days) == (30, 3)
    assert cfg.dcap_root_ca is None and cfg.admin_token is None
    assert cfg.audit_refusals_per_min == 60
    assert (cfg.allowlist_fetches_per_min, cfg.allowlist_fetches_per_platform_per_min) == (30, 6)


def test_data_plane_defaults_are_the_documented_values() -> None:
    # literal values (README's configuration table), not Config()'s: a changed default must fail
    cfg = from_env({})
    assert (cfg.auth_bind, cfg.auth_port) == ("127.0.0.1", 8089)  # the auth listener: loopback
    assert (cfg.proxy_bind, cfg.proxy_port) == ("0.0.0.0", 9090)
    assert cfg.proxy_timeout_sec == 60.0
    assert cfg.proxy_send_timeout_sec == 60.0
    assert cfg.proxy_max_body_bytes is None  # unlimited when unset
    assert cfg.proxy_json_buffer_bytes == 64 * 1024 * 1024
    assert cfg.proxy_api_token is None  # POST /v1/proxy open, as the seed has it
    # and each is read from its own variable
    cfg = from_env({"EE_AUTH_BIND": "0.0.0.0", "EE_AUTH_PORT": "18089", "EE_PROXY_BIND": "::1",
                    "EE_PROXY_PORT": "19090", "EE_PROXY_TIMEOUT_SEC": "2.5",
                    "EE_PROXY_SEND_TIMEOUT_SEC": "7", "EE_PROXY_JSON_BUFFER_BYTES": "1048576",
                    "EE_PROXY_API_TOKEN": "p-secret"})
    assert (cfg.auth_bind, cfg.auth_port, cfg.proxy_bind, cfg.proxy_port) == (
        "0.0.0.0", 18089, "::1", 19090)
    assert (cfg.proxy_timeout_sec, cfg.proxy_send_timeout_sec) == (2.5, 7.0)
    assert (cfg.proxy_json_buffer_bytes, cfg.proxy_api_token) == (1048576, "p-secret")
    assert "p-secret" not in repr(cfg)


def test_values_are_parsed(tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_bytes(b"x")
    cfg = from_env({
        "EE_CONTROL_PORT": "18088",
        "EE_NETWORKS": "prod-a:sealed, lab:open",
        "EE_ALLOWED_TCB_STATUSES": "UpToDate",
        "EE_DB_URL": "postgresql://u:p@db/eecp",
        "EE_DCAP_ROOT_CA": str(root),
        "EE_ALLOWLIST_DIR": str(tmp_path),
        "EE_PCCS_URL": "https://pccs.example/",
        "EE_ATTEST_INTERVAL_SEC": "60",
        "EE_ADMIN_TOKEN": "s3cret",
        "EE_AUDIT_REFUSALS_PER_MIN": "0",
        "EE_ALLOWLIST_FETCHES_PER_MIN": "0",
        "EE_ALLOWLIST_FETCHES_PER_PLATFORM_PER_MIN": "2",
    })
    assert cfg.control_port == 18088
    assert cfg.networks == (Network("prod-a", True), Network("lab", False))
    assert cfg.network("lab") == Network("lab", False) and cfg.network("forge-1") is None
    assert cfg.allowed_tcb_statuses == {"UpToDate"}
    assert cfg.db_url == "postgresql://u:p@db/eecp"
    assert cfg.dcap_root_ca == root and cfg.allowlist_dir == tmp_path
    assert cfg.pccs_url == "https://pccs.example"
    assert cfg.attest_interval_sec == 60
    assert cfg.audit_refusals_per_min == 0  # no limit
    assert (cfg.allowlist_fetches_per_min, cfg.allowlist_fetches_per_platform_per_min) == (0, 2)
    assert "s3cret" not in repr(cfg)


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("EE_CONTROL_PORT", "http", "not a port number"),
        ("EE_PROXY_PORT", "70000", "outside 0..65535"),
        ("EE_NETWORKS", "forge-1:locked", "expected name:sealed or name:open"),
        ("EE_NETWORKS", "a:open,a:sealed", "listed twice"),
        ("EE_DCAP_ROOT_CA", "/nonexistent/root.pem", "No such file"),
        ("EE_ALLOWED_TCB_STATUSES", "UpToDate,Fine", "unknown TCB status Fine"),
        ("EE_ATTEST_INTERVAL_SEC", "-5", "positive"),
        ("EE_ATTEST_DEADLINE_SEC", "nan", "positive"),
        ("EE_LOG_FORMAT", "xml", "not one of text, json"),
        ("EE_DB_URL", "mysql://x", "postgresql://"),
        ("EE_GITHUB_API_URL", "ftp://x", "not an http(s) URL"),
        ("EE_ALLOWLIST_DIR", "/nonexistent-dir", "not a directory"),
        ("EE_ALLOWLIST_ASSET", "../x.json", "plain file name"),
        ("EE_REGISTRATION_WARN_DAYS", "40", "smaller than EE_REGISTRATION_TTL_DAYS"),
        ("EE_AUDIT_REFUSALS_PER_MIN", "-1", "whole number >= 0"),
        ("EE_PROXY_JSON_BUFFER_BYTES", "0", "whole number >= 1"),
        ("EE_PROXY_JSON_BUFFER_BYTES", "64MiB", "whole number >= 1"),
        ("EE_ALLOWLIST_FETCHES_PER_MIN", "1.5", "whole number >= 0"),
        ("EE_ALLOWLIST_FETCHES_PER_PLATFORM_PER_MIN", "-2", "whole number >= 0"),
        ("EE_CONTROL_MAX_CONNECTIONS", "0", "whole number >= 1"),
        ("EE_PROXY_MAX_CONNECTIONS", "-5", "whole number >= 1"),
        ("EE_AUTH_MAX_CONNECTIONS", "many", "whole number >= 1"),
        ("EE_ACCESS_LOG", "true", "not on or off"),
        ("EE_PROXY_EXPOSE_AGENT", "yes", "not true or false"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_env({variable: value})
    assert info.value.variable == variable
    assert problem in info.value.problem
    assert str(info.value).startswith("config_invalid: " + variable)


def test_empty_values_take_defaults() -> None:
    assert from_env({"EE_CONTROL_PORT": "", "EE_NETWORKS": "  "}) == Config()


# ---- connection caps from the file limit (eecp.capacity) -----------------------------------


@pytest.mark.parametrize(("file_limit", "caps"), [
    # 256 descriptors kept for the store and outbound connections; the rest shared 4:3:1
    (1024, ListenerCaps(control=384, proxy=288, auth=96)),
    (65536, ListenerCaps(control=32640, proxy=24480, auth=8160)),
    (128, ListenerCaps(control=48, proxy=36, auth=12)),  # a tiny limit keeps a quarter
])
def test_caps_are_shares_of_the_file_limit(file_limit: int, caps: ListenerCaps) -> None:
    assert listener_caps(from_env({}), file_limit) == caps
    assert caps.control + caps.proxy + caps.auth <= file_limit - min(256, file_limit // 4)


def test_set_caps_are_kept_and_the_others_share_what_they_leave() -> None:
    config = from_env({"EE_CONTROL_MAX_CONNECTIONS": "20000"})
    assert listener_caps(config, 65536) == ListenerCaps(control=20000, proxy=33960, auth=11320)
    config = from_env({"EE_CONTROL_MAX_CONNECTIONS": "500", "EE_PROXY_MAX_CONNECTIONS": "200",
                       "EE_AUTH_MAX_CONNECTIONS": "50"})
    assert listener_caps(config, 1024) == ListenerCaps(control=500, proxy=200, auth=50)


@pytest.mark.parametrize(("env", "variable"), [
    ({"EE_CONTROL_MAX_CONNECTIONS": "10000"}, "EE_CONTROL_MAX_CONNECTIONS"),
    ({"EE_PROXY_MAX_CONNECTIONS": "700", "EE_AUTH_MAX_CONNECTIONS": "100"},
     "EE_PROXY_MAX_CONNECTIONS"),  # 800 of the 768 left, nothing for the control port
])
def test_caps_beyond_the_file_limit_are_a_config_error(env: dict[str, str],
                                                       variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        listener_caps(from_env(env), 1024)
    assert info.value.variable == variable
    assert "file limit of 1024" in info.value.problem and "LimitNOFILE" in info.value.problem
