"""RouterConfig validation and the API-key check."""

from __future__ import annotations

import msgspec
import pytest

from router.auth import ApiKeyInterceptor
from router.config import RouterConfig, is_loopback


def test_defaults_are_valid_and_loopback() -> None:
    config = RouterConfig()
    assert config.host == "127.0.0.1" and not config.auth_enabled and not config.tls_enabled


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "router.example.com"])
def test_refuses_a_public_address_without_api_keys(host: str) -> None:
    with pytest.raises(ValueError, match="api_keys"):
        RouterConfig(host=host)
    assert RouterConfig(host=host, api_keys=("k",)).auth_enabled
    assert RouterConfig(host=host, allow_unauthenticated_remote=True).host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("kwargs, message", [
    ({"port": 70000}, "port"),
    ({"max_outstanding": 0}, "max_outstanding"),
    ({"tls_cert_path": "cert.pem"}, "tls_key_path"),
    ({"tls_client_ca_path": "ca.pem"}, "tls_client_ca_path"),
    ({"api_keys": ("",)}, "api_keys"),
    ({"api_keys": (" k",)}, "api_keys"),
    ({"affinity_load_factor": 0.5}, "affinity_load_factor"),
    ({"keepalive_time_s": 0}, "keepalive_time_s"),
])
def test_bad_values_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kwargs)


def test_decodes_from_yaml_like_dicts_and_rejects_unknown_fields() -> None:
    config = msgspec.convert({"port": 50051, "api_keys": ["a", "b"]}, RouterConfig)
    assert config.api_keys == ("a", "b")
    with pytest.raises(msgspec.ValidationError, match="max_outstandin"):
        msgspec.convert({"max_outstandin": 3}, RouterConfig)


def test_api_key_check() -> None:
    check = ApiKeyInterceptor(("alpha", "beta")).authorized
    assert check((("authorization", "Bearer beta"),))
    assert check((("x-other", "1"), ("authorization", "Bearer alpha")))
    assert not check((("authorization", "Bearer gamma"),))
    assert not check((("authorization", "alpha"),))
    assert not check(())
    assert not check(None)


def test_repr_hides_api_keys() -> None:
    text = repr(RouterConfig(api_keys=("hunter2",)))
    assert "hunter2" not in text and "<1 keys>" in text and "max_outstanding=1024" in text
