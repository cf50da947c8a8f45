"""bench/load.py: loopback-only guard and percentile maths (the load run itself is a manual smoke)."""

from __future__ import annotations

import pytest

from bench.load import is_loopback, main, pct


@pytest.mark.parametrize("url, ok", [
    ("http://127.0.0.1:8000", True), ("http://localhost:8080/", True), ("http://[::1]:8000", True),
    ("http://127.0.0.2:1", True), ("http://10.0.0.1:8000", False), ("https://api.openai.com", False),
    ("http://127.0.0.1.evil.com", False),
])
def test_loopback_only(url: str, ok: bool) -> None:
    assert is_loopback(url) is ok


def test_refuses_remote_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-url", "http://example.com"]) == 2
    assert "refusing" in capsys.readouterr().err


def test_percentiles() -> None:
    assert pct([3.0, 1.0, 2.0], 50) == 2.0
    assert pct([1.0, 2.0], 99) == pytest.approx(1.99)
