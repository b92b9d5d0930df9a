"""The exchange configuration file: delivery tuning keys are optional and checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from lienthong.exchange.service import load_config

BASE = 'role = "node"\ncode = "24901"\nname = "Bệnh viện Đa khoa tỉnh Bắc Giang"\nhub_code = "24000"\n' \
       'hub_url = "http://127.0.0.1:9/exchange"\n'


def test_defaults_and_tuning(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(BASE, encoding="utf-8")
    config, _, _ = load_config(path)
    assert (config.poll_seconds, config.send_concurrency) == (0.2, 8)
    path.write_text(BASE + "poll_seconds = 0.05\nsend_concurrency = 16\n", encoding="utf-8")
    config, _, _ = load_config(path)
    assert (config.poll_seconds, config.send_concurrency) == (0.05, 16)


@pytest.mark.parametrize("extra", ["send_concurrency = 0", "send_concurrency = 65", 'send_concurrency = "many"',
                                   "poll_seconds = 0", "poll_seconds = -1"])
def test_bad_tuning_is_refused(tmp_path: Path, extra: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(BASE + extra + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="send_concurrency"):
        load_config(path)
