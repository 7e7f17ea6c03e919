"""The postconf command, run as a subprocess the way an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".venv" / "bin" / "postconf"
# The console script exists once the package is installed (pip install -e .); without it
# the module runs the same main().
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "relay.cli.postconf"]


def postconf(
    *args: str, home: Path, mail_config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    if mail_config is not None:
        env["MAIL_CONFIG"] = str(mail_config)
    return subprocess.run(
        [*COMMAND, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30,
        check=False,
    )


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir()
    (d / "main.cf").write_text(
        "# test configuration\n"
        "myhostname = mx.example.com\n"
        "smtpd_banner = $myhostname ESMTP ${mail_name} at $(mydomain)\n"
        "mynetworks = 127.0.0.0/8,\n"
        "    [::1]/128\n"
        "\n"
        "smtpd_timeout = 10s\n"
        "relay_domains =\n"
        "my_custom = hello\n"
    )
    return d


def test_all_parameters_sorted_unexpanded(confdir: Path, tmp_path: Path) -> None:
    r = postconf("-c", str(confdir), home=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    names = [line.split(" =")[0] for line in lines]
    assert names == sorted(names)
    assert "my_custom = hello" in lines
    assert "smtpd_banner = $myhostname ESMTP ${mail_name} at $(mydomain)" in lines
    assert "mynetworks = 127.0.0.0/8, [::1]/128" in lines
    assert "smtpd_timeout = 10s" in lines
    assert "relay_domains =" in lines  # Postfix prints no trailing space
    assert "smtpd_recipient_limit = 1000" in lines
    assert f"queue_directory = {tmp_path}/.local/state/relay/spool" in lines
    assert "mydomain = example.com" in lines
    assert {"message_size_limit", "smtp_tls_CAfile", "maximal_queue_lifetime"} <= set(names)
    assert (
        r.stderr
        == f"postconf: warning: {confdir}/main.cf, line 9: unused parameter: my_custom=hello\n"
    )


def test_n_prints_only_main_cf_settings(confdir: Path, tmp_path: Path) -> None:
    r = postconf("-n", "-c", str(confdir), home=tmp_path)
    assert r.returncode == 0
    assert r.stdout == (
        "my_custom = hello\n"
        "myhostname = mx.example.com\n"
        "mynetworks = 127.0.0.0/8, [::1]/128\n"
        "relay_domains =\n"
        "smtpd_banner = $myhostname ESMTP ${mail_name} at $(mydomain)\n"
        "smtpd_timeout = 10s\n"
    )


def test_x_expands_and_h_prints_values_only(confdir: Path, tmp_path: Path) -> None:
    r = postconf("-x", "-c", str(confdir), "smtpd_banner", "myorigin", home=tmp_path)
    assert r.stdout == (
        "smtpd_banner = mx.example.com ESMTP relay at example.com\nmyorigin = mx.example.com\n"
    )
    r = postconf("-hx", "-c", str(confdir), "smtpd_banner", home=tmp_path)
    assert r.stdout == "mx.example.com ESMTP relay at example.com\n"
    r = postconf("-h", "-c", str(confdir), "myorigin", "relay_domains", home=tmp_path)
    assert r.stdout == "$myhostname\n\n"
    r = postconf("-nx", "-c", str(confdir), "smtpd_timeout", "smtpd_recipient_limit", home=tmp_path)
    assert r.stdout == "smtpd_timeout = 10s\n"  # -n: not set in main.cf, not printed


def test_names_in_the_order_given_and_unknown_names(confdir: Path, tmp_path: Path) -> None:
    r = postconf(
        "-c", str(confdir), "smtpd_timeout", "no_such_thing", "bounce_queue_lifetime",
        home=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0
    assert r.stdout == "smtpd_timeout = 10s\nbounce_queue_lifetime = 5d\n"
    assert "postconf: warning: no_such_thing: unknown parameter\n" in r.stderr


def test_d_prints_defaults_without_reading_main_cf(tmp_path: Path) -> None:
    d = tmp_path / "broken"
    d.mkdir()
    (d / "main.cf").write_text("smtpd_timeout = soon\n")
    r = postconf("-d", "-c", str(d), "smtpd_timeout", "smtpd_banner", "mynetworks", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "smtpd_timeout = 300s\n"
        "smtpd_banner = $myhostname ESMTP $mail_name\n"
        "mynetworks = 127.0.0.0/8 [::1]/128\n"
    )
    r = postconf("-d", home=tmp_path)
    names = [line.split(" =")[0] for line in r.stdout.splitlines()]
    assert names == sorted(names) and len(names) > 70
    assert "delay_warning_time = 0h" in r.stdout.splitlines()
    r = postconf("-dx", "mail_name", "myorigin", home=tmp_path)
    hostname = postconf("-dh", "myhostname", home=tmp_path).stdout.strip()
    assert r.stdout == f"mail_name = relay\nmyorigin = {hostname}\n"


def test_mail_config_environment(confdir: Path, tmp_path: Path) -> None:
    r = postconf("-h", "smtpd_timeout", home=tmp_path, mail_config=confdir)
    assert r.stdout == "10s\n"
    other = tmp_path / "other"
    other.mkdir()
    (other / "main.cf").write_text("smtpd_timeout = 20s\n")
    r = postconf("-h", "-c", str(other), "smtpd_timeout", home=tmp_path, mail_config=confdir)
    assert r.stdout == "20s\n"  # -c wins over MAIL_CONFIG
    r = postconf("-h", "smtpd_timeout", home=tmp_path)  # neither: defaults only
    assert (r.returncode, r.stdout) == (0, "300s\n")
    r = postconf("-n", home=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_bad_value_is_fatal_and_names_file_line_parameter(tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "main.cf").write_text("# relay\nmyhostname = mx.example.com\nsmtpd_timeout = soon\n")
    for args in (["-c", str(d)], ["-n", "-c", str(d)], ["-c", str(d), "myhostname"]):
        r = postconf(*args, home=tmp_path)
        assert r.returncode == 1
        assert r.stdout == ""
        assert r.stderr == (
            f"postconf: fatal: {d}/main.cf, line 3: bad time value for parameter "
            "smtpd_timeout: soon\n"
        )
    r = postconf(home=tmp_path, mail_config=d)
    assert r.returncode == 1 and "line 3: bad time value" in r.stderr


def test_syntax_error_and_missing_file_are_fatal(tmp_path: Path) -> None:
    d = tmp_path / "syntax"
    d.mkdir()
    (d / "main.cf").write_text("myhostname = a.example\nno equals here\n")
    r = postconf("-c", str(d), home=tmp_path)
    assert r.returncode == 1
    assert r.stderr == (
        f"postconf: fatal: {d}/main.cf, line 2: missing '=' after parameter name: "
        '"no equals here"\n'
    )
    r = postconf("-c", str(tmp_path / "nowhere"), home=tmp_path)
    assert r.returncode == 1
    assert r.stderr == (
        f"postconf: fatal: open {tmp_path}/nowhere/main.cf: No such file or directory\n"
    )


def test_usage_error(tmp_path: Path) -> None:
    r = postconf("-q", home=tmp_path)
    assert r.returncode == 64
    assert r.stderr.endswith(
        "postconf: fatal: usage: postconf [-dhnx] [-c config_dir] [name ...]\n"
    )
    assert postconf("-d", "-n", home=tmp_path).returncode == 64


def test_output_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    # More output than a pipe buffer holds, so postconf is still writing when head exits;
    # the parameters are referenced from relay_domains so none is "unused".
    d = tmp_path / "big"
    d.mkdir()
    names = [f"p_{i:05d}" for i in range(4000)]
    (d / "main.cf").write_text(
        "".join(f"{n} = {'x' * 40}\n" for n in names)
        + "relay_domains = "
        + " ".join("$" + n for n in names)
        + "\n"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    r = subprocess.run(
        [*COMMAND, "-c", str(d)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0 and len(r.stdout) > 200_000 and r.stderr == ""
    r = subprocess.run(
        " ".join(COMMAND) + f" -c {d} | head -n 1",
        shell=True,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0
    assert r.stdout == "accounting_log =\n"  # the first parameter, alphabetically
    assert r.stderr == ""


def test_example_configuration(tmp_path: Path) -> None:
    r = postconf("-c", str(REPO / "conf"), "-n", home=tmp_path)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == "mynetworks = 127.0.0.0/8 [::1]/128\nsmtpd_listen = 127.0.0.1:2525, [::1]:2525\n"
