"""Which providers a server offers: config fields, CLI flags, the SDKs' own
environment variables, the ``provider_unavailable`` hint, lazy SDK imports."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

import wsserver
from wsserver.config import ServerConfig, add_arguments, from_args
from wsserver.wire.errors import ServerError
from wsserver.providers import ProviderUnavailable
from wsserver.server import Server, default_providers

SDK_ENV = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_AUTH_TOKEN",
    "WSSERVER_OPENAI_API_KEY",
    "WSSERVER_OPENAI_BASE_URL",
    "WSSERVER_ANTHROPIC_API_KEY",
    "WSSERVER_ANTHROPIC_BASE_URL",
    "WSSERVER_PROVIDER",
    "WSSERVER_BASE_URL",
)


@pytest.fixture
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SDK_ENV:
        monkeypatch.delenv(name, raising=False)


def test_import_does_not_load_sdks() -> None:
    code = (
        "import sys, wsserver, wsserver.server, wsserver.providers, wsserver.cli\n"
        "from wsserver.config import ServerConfig\n"
        "from wsserver.server import Server\n"
        "Server(ServerConfig(port=0))\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('openai', 'anthropic', 'httpx2'))\n"
        "print(loaded)\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in SDK_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "[]"


async def test_nothing_configured_only_simulated() -> None:
    providers = default_providers(ServerConfig(), environ={})
    assert providers.names == ["simulated"]
    with pytest.raises(ProviderUnavailable) as info:
        providers.resolve("openai", None)
    assert str(info.value) == (
        "provider 'openai' is not configured: set OPENAI_API_KEY (or --openai-api-key / --openai-base-url)"
    )
    with pytest.raises(ProviderUnavailable) as info:
        providers.resolve("anthropic", "x")
    assert "ANTHROPIC_API_KEY" in str(info.value) and "--anthropic-api-key" in str(info.value)
    with pytest.raises(ProviderUnavailable) as info:  # an unknown name keeps the list
        providers.resolve("nope", None)
    assert "available: simulated" in str(info.value)
    await providers.aclose()


async def test_sdk_environment_variables_configure_providers() -> None:
    providers = default_providers(
        ServerConfig(), environ={"OPENAI_API_KEY": "sk-env", "ANTHROPIC_API_KEY": "ak-env"}
    )
    try:
        assert providers.names == ["anthropic", "openai", "simulated"]
        assert providers.resolve("openai", None) == ("openai", "gpt-5-mini")
        assert providers.resolve("anthropic", None) == ("anthropic", "claude-haiku-4-5")
        openai, anthropic = providers["openai"], providers["anthropic"]
        assert openai._client.api_key == "sk-env"  # type: ignore[attr-defined]
        assert openai.base_url == "https://api.openai.com/v1"  # type: ignore[attr-defined]
        assert anthropic._client.api_key == "ak-env"  # type: ignore[attr-defined]
        assert anthropic.base_url == "https://api.anthropic.com"  # type: ignore[attr-defined]
        assert providers.unconfigured == {}
    finally:
        await providers.aclose()
    assert providers["openai"]._client.is_closed()  # type: ignore[attr-defined]
    assert providers["anthropic"]._client.is_closed()  # type: ignore[attr-defined]


async def test_base_url_without_key_is_enough() -> None:
    providers = default_providers(ServerConfig(), environ={"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"})
    try:
        openai = providers["openai"]
        assert openai.base_url == "http://127.0.0.1:11434/v1"  # type: ignore[attr-defined]
        assert openai._client.api_key == "no-key-configured"  # type: ignore[attr-defined]
        assert openai.max_tokens_param == "max_tokens"  # type: ignore[attr-defined]
        assert "anthropic" in providers.unconfigured
    finally:
        await providers.aclose()


async def test_config_beats_environment() -> None:
    config = ServerConfig(
        provider="openai",
        model="llama3",
        base_url="http://127.0.0.1:1/v1",
        openai_api_key="sk-flag",
        openai_api="responses",
        anthropic_base_url="http://127.0.0.1:2",
        anthropic_model="claude-x",
        anthropic_max_tokens=1000,
        provider_retries=5,
        provider_backoff=0.1,
        provider_retry_max=3.0,
    )
    environ = {"OPENAI_API_KEY": "sk-env", "OPENAI_BASE_URL": "http://127.0.0.1:3/v1"}
    providers = default_providers(config, environ=environ)
    try:
        openai, anthropic = providers["openai"], providers["anthropic"]
        assert openai._client.api_key == "sk-flag"  # type: ignore[attr-defined]
        assert openai.base_url == "http://127.0.0.1:1/v1"  # --base-url applies to the default provider
        assert openai.api == "responses"  # type: ignore[attr-defined]
        assert providers.resolve(None, None) == ("openai", "llama3")  # --model: the default provider's
        assert anthropic.base_url == "http://127.0.0.1:2"  # type: ignore[attr-defined]
        assert providers.resolve("anthropic", None) == ("anthropic", "claude-x")
        assert anthropic.default_max_tokens == 1000  # type: ignore[attr-defined]
        assert openai.retry.retries == 5 and openai.retry.max_delay_s == 3.0  # type: ignore[attr-defined]
    finally:
        await providers.aclose()
    # a provider-specific base URL beats --base-url
    config = ServerConfig(provider="openai", base_url="http://127.0.0.1:1/v1", openai_base_url="http://127.0.0.1:4/v1")
    providers = default_providers(config, environ={})
    try:
        assert providers["openai"].base_url == "http://127.0.0.1:4/v1"  # type: ignore[attr-defined]
    finally:
        await providers.aclose()


async def test_cli_flags_and_wsserver_env() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    help_text = parser.format_help()
    for flag in ("--openai-api-key", "--openai-base-url", "--anthropic-api-key", "--anthropic-base-url",
                 "--base-url", "--openai-api", "--provider-retries", "--anthropic-max-tokens",
                 "--no-openai-images"):
        assert flag in help_text
    args = parser.parse_args(
        ["--provider", "openai", "--model", "qwen", "--openai-base-url", "http://127.0.0.1:11434/v1",
         "--provider-retries", "0", "--no-openai-images"]
    )
    config = from_args(args, environ={"WSSERVER_ANTHROPIC_API_KEY": "ak-ws"})
    assert config.provider == "openai" and config.openai_base_url == "http://127.0.0.1:11434/v1"
    assert config.provider_retries == 0 and config.anthropic_api_key == "ak-ws"
    assert config.openai_images is False and ServerConfig().openai_images is True
    providers = default_providers(config, environ={})
    try:
        assert providers.resolve(None, None) == ("openai", "qwen")
        assert providers["openai"].images is False  # type: ignore[attr-defined]
        assert providers["anthropic"]._client.api_key == "ak-ws"  # type: ignore[attr-defined]
    finally:
        await providers.aclose()


def test_keys_stay_out_of_repr() -> None:
    text = repr(ServerConfig(openai_api_key="sk-secret-1", anthropic_api_key="sk-ant-secret-2"))
    assert "secret" not in text


async def test_unconfigured_provider_through_the_server(
    no_keys: None, make_server: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="wsserver.server"):
        srv = make_server(provider="anthropic")  # the server starts anyway
    assert any("default provider 'anthropic' is not available" in r.getMessage() for r in caplog.records)
    async with srv as server, asyncio.timeout(10):
        async with wsserver.connect(server.url) as client:
            with pytest.raises(ServerError) as info:
                await client.generate([{"role": "user", "content": "hi"}], provider="openai", model="m")
            assert info.value.code == "provider_unavailable"
            assert "set OPENAI_API_KEY (or --openai-api-key / --openai-base-url)" in str(info.value)
            with pytest.raises(ServerError) as info:  # the default provider
                await client.generate([{"role": "user", "content": "hi"}])
            assert info.value.code == "provider_unavailable"
            assert "provider 'anthropic' is not configured: set ANTHROPIC_API_KEY" in str(info.value)
            # the connection stays usable
            stream = await client.generate([{"role": "user", "content": "hi"}], provider="simulated")
            assert (await stream.wait()).reason == "complete"
