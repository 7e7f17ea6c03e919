"""Safe developer defaults in main.cf handling: a typo in a parameter name stops relay serve
(with the closest known name), a ``$name``-referenced user parameter stays allowed as in
Postfix, command-line settings win over main.cf, and the listener is on both loopbacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import config
from relay.config import ConfigError, ListenAddress


def write(tmp_path: Path, text: str) -> str:
    (tmp_path / "main.cf").write_text(text)
    return str(tmp_path)


def test_typo_is_fatal_in_strict_mode_with_the_closest_name(tmp_path: Path) -> None:
    d = write(tmp_path, "myhostname = a.example\nrelay_host = [smtp.example.com]:587\n")
    with pytest.raises(ConfigError) as e:
        config.load(d, environ={}, strict=True)
    assert str(e.value) == (f"{tmp_path}/main.cf, line 2: unknown parameter relay_host "
                            "(did you mean relayhost?)")


def test_unknown_name_without_a_close_one_is_fatal_too(tmp_path: Path) -> None:
    d = write(tmp_path, "frobnicate = yes\n")
    with pytest.raises(ConfigError, match=r"line 1: unknown parameter frobnicate\Z"):
        config.load(d, environ={}, strict=True)


def test_referenced_user_parameter_is_allowed_in_strict_mode(tmp_path: Path) -> None:
    d = write(tmp_path, "my_smarthost = [10.0.0.5]:2525\nrelayhost = $my_smarthost\n")
    cfg = config.load(d, environ={}, strict=True)
    assert cfg.str("relayhost") == "[10.0.0.5]:2525"


def test_lenient_load_warns_with_the_closest_name(tmp_path: Path) -> None:
    warnings: list[str] = []
    d = write(tmp_path, "relay_host = x\n")
    config.load(d, environ={}, warn=warnings.append)
    assert warnings == [(f"{tmp_path}/main.cf, line 1: unused parameter: relay_host=x "
                        "(did you mean relayhost?)")]


def test_overrides_win_and_are_checked(tmp_path: Path) -> None:
    d = write(tmp_path, "capture_maildir = /srv/a\n")
    cfg = config.load(d, environ={}, overrides=["capture_maildir=/srv/b"])
    assert cfg.str("capture_maildir") == "/srv/b"
    cfg = config.load(None, environ={}, overrides=["smtpd_timeout=5s"])
    assert cfg.time("smtpd_timeout") == 5.0
    with pytest.raises(ConfigError, match=r"^-o smtpd_timeout: bad time value"):
        config.load(None, environ={}, overrides=["smtpd_timeout=soon"])
    with pytest.raises(ConfigError, match=r"^-o relay_host: unknown parameter relay_host"):
        config.load(None, environ={}, strict=True, overrides=["relay_host=x"])


def test_default_listener_is_on_both_loopbacks() -> None:
    cfg = config.defaults(environ={"HOME": "/h"})
    assert cfg.listen_addresses() == (ListenAddress("127.0.0.1", 2525),
                                      ListenAddress("::1", 2525))
    assert cfg.listen_addresses("http_listen") == ()
    assert cfg.bool("http_admin") is False
    assert cfg.str("capture_maildir") == ""
    assert "capture_mode" not in config.PARAMETERS  # accepted and ignored: gone


@pytest.mark.parametrize(("typo", "meant"), [
    ("smtp_listen", "smtpd_listen"), ("transport_map", "transport_maps"),
    ("mynetwork", "mynetworks"), ("RELAYHOST", "relayhost"), ("http_listn", "http_listen"),
])
def test_closest_name(typo: str, meant: str) -> None:
    assert config.closest_name(typo) == meant


def test_postconf_n_warns_the_same_way(tmp_path: Path) -> None:
    import io

    from relay.cli import postconf

    write(tmp_path, "relay_host = [smtp.example.com]:587\nmynetworks = 127.0.0.0/8\n")
    out, err = io.StringIO(), io.StringIO()
    assert postconf.main(["-n", "-c", str(tmp_path)], environ={}, stdout=out, stderr=err) == 0
    assert err.getvalue() == (f"postconf: warning: {tmp_path}/main.cf, line 1: unused parameter: "
                              "relay_host=[smtp.example.com]:587 (did you mean relayhost?)\n")
    assert "relay_host = [smtp.example.com]:587" in out.getvalue()
    err = io.StringIO()
    postconf.main(["relay_host"], environ={}, stdout=io.StringIO(), stderr=err)
    assert err.getvalue() == ("postconf: warning: relay_host: unknown parameter "
                              "(did you mean relayhost?)\n")
