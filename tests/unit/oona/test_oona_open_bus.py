"""open_bus: the backend comes from the URL scheme; Redis is imported only when asked for."""

from __future__ import annotations

import subprocess
import sys

import pytest

from esper.errors import ConfigurationError
from esper.oona import InProcessBus, open_bus


def test_memory_url_opens_a_new_private_in_process_bus() -> None:
    first = open_bus("memory://", sender="tolaria")
    second = open_bus("memory://")
    assert isinstance(first, InProcessBus)
    assert first is not second
    assert first.sender == "tolaria"
    assert first.max_len == 10_000


def test_max_len_comes_from_the_url_or_the_keyword() -> None:
    from_url = open_bus("memory://?max_len=50")
    from_keyword = open_bus("memory://?max_len=50", max_len=7)
    assert isinstance(from_url, InProcessBus) and isinstance(from_keyword, InProcessBus)
    assert (from_url.max_len, from_keyword.max_len) == (50, 7)


def test_redis_url_opens_a_redis_streams_bus_with_its_options() -> None:
    from esper.oona.redis_streams import RedisStreamsBus

    bus = open_bus("redis://127.0.0.1:6399/3?stream_prefix=run42&max_len=500", sender="s")
    overridden = open_bus("redis://127.0.0.1:6399/3?stream_prefix=run42", stream_prefix="other")
    try:
        assert isinstance(bus, RedisStreamsBus)
        assert isinstance(overridden, RedisStreamsBus)
        assert bus.location == "127.0.0.1:6399/3"
        assert bus.stream_key("kernel.ready") == "run42:kernel.ready"
        assert bus.max_len == 500
        assert bus.sender == "s"
        assert overridden.stream_key("kernel.ready") == "other:kernel.ready"
    finally:
        bus.close()
        overridden.close()


@pytest.mark.parametrize("url", ["kafka://broker:9092", "localhost:6379", "", "http://x"])
def test_unknown_schemes_name_the_accepted_ones(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"memory://, redis://, rediss://"):
        open_bus(url)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("memory://?max_len=0", "max_len must be a positive integer"),
        ("memory://?max_len=lots", "max_len must be a positive integer"),
        ("memory://?stream_prefix=x", "unsupported options"),
        ("redis://127.0.0.1:6379/0?max_len=-1", "max_len must be a positive integer"),
    ],
)
def test_malformed_options_are_configuration_errors(url: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        open_bus(url)


def test_importing_oona_and_opening_a_memory_bus_never_imports_redis() -> None:
    probe = (
        "import sys\n"
        "import esper.oona\n"
        "esper.oona.open_bus('memory://')\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] == 'redis')\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
