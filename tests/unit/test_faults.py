"""relay.faults: script parsing (every bad field named) and the deterministic decisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import faults
from relay.faults import Action, Context, Faults, Reply, ScriptError, Stage, parse_reply


def decide(f: Faults, stage: Stage, **ctx: object) -> faults.Decision | None:
    base: dict[str, object] = {"client": "127.0.0.1", "connection": 1}
    base.update(ctx)
    return f.decide(stage, Context(**base))  # type: ignore[arg-type]


def test_parse_reply_single_and_multi_line() -> None:
    assert parse_reply("550 5.1.1 no such user") == Reply(550, ("5.1.1 no such user",))
    multi = parse_reply("421-4.7.0 first\n421 4.7.0 second")
    assert multi == Reply(421, ("4.7.0 first", "4.7.0 second"))
    assert multi.render({}) == b"421-4.7.0 first\r\n421 4.7.0 second\r\n"
    assert parse_reply("451 a\nb").render({}) == b"451-a\r\n451 b\r\n"
    assert parse_reply("250 <{rcpt}> ok").render({"rcpt": "x@y"}) == b"250 <x@y> ok\r\n"
    for bad in ("hello", "650 x", "55 x", "550x"):
        with pytest.raises(ScriptError, match="must start with a code"):
            parse_reply(bad)


@pytest.mark.parametrize(("rules", "message"), [
    ([{"stage": "rcpt", "reply": "550 x", "colour": "red"}], "rule 1: unknown field 'colour'"),
    ([{"stage": "later", "reply": "550 x"}], "rule 1: stage 'later' is not one of"),
    ([{"reply": "550 x"}], "rule 1: a stage is needed"),
    ([{"stage": "rcpt", "action": "explode"}], "rule 1: action 'explode' is not one of"),
    ([{"stage": "rcpt", "action": "reply"}], "rule 1: action reply needs a reply or a preset"),
    ([{"stage": "rcpt", "reply": 550}], "rule 1: reply must be a string"),
    ([{"stage": "rcpt", "reply": "hello"}], "rule 1: bad reply 'hello'"),
    ([{"stage": "mail", "preset": "aol"}], "rule 1: unknown preset 'aol'"),
    ([{"stage": "mail", "action": "greylist"}], "rule 1: greylist works at stage rcpt"),
    ([{"action": "rate-limit"}], "rule 1: rate-limit needs a limit"),
    ([{"stage": "rcpt", "reply": "550 x", "message": 0}], "rule 1: message: a number from 1"),
    ([{"stage": "rcpt", "reply": "550 x", "delay": -1}], "rule 1: delay: a number, 0 or more"),
    ([{"stage": "rcpt", "reply": "550 x"}, {"stage": "x"}], "rule 2: stage 'x'"),
])
def test_bad_scripts_name_the_rule_and_field(rules: list[dict[str, object]],
                                             message: str) -> None:
    with pytest.raises(ScriptError, match=message):
        faults.script(rules)


def test_load_toml_and_json(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        'hostname = "mx.test"\ndelay = 0.5\n[[rule]]\nstage = "rcpt"\nrcpt = "*@b.test"\n'
        'reply = "550 5.1.1 unknown"\n')
    s = faults.load(str(tmp_path / "s.toml"))
    assert (s.hostname, s.delay, len(s.rules)) == ("mx.test", 0.5, 1)
    (tmp_path / "s.json").write_text('{"rule": [{"stage": "mail", "preset": "yahoo-deferred"}]}')
    assert faults.load(str(tmp_path / "s.json")).rules[0].reply.code == 421  # type: ignore[union-attr]
    (tmp_path / "bad.toml").write_text("[[rule]]\nstage = \n")
    with pytest.raises(ScriptError, match="bad.toml"):
        faults.load(str(tmp_path / "bad.toml"))
    with pytest.raises(ScriptError, match="No such file"):
        faults.load(str(tmp_path / "missing.toml"))


def test_first_matching_rule_wins_and_matchers_combine() -> None:
    f = Faults(faults.script([
        {"stage": "rcpt", "rcpt": "*@b.test", "sender": "app@*", "reply": "550 first"},
        {"stage": "rcpt", "rcpt": "*@B.TEST", "reply": "451 second"},
    ]))
    assert decide(f, Stage.RCPT, sender="app@x", rcpt="u@b.test").reply.code == 550  # type: ignore[union-attr]
    assert decide(f, Stage.RCPT, sender="other@x", rcpt="U@b.test").reply.code == 451  # type: ignore[union-attr]
    assert decide(f, Stage.RCPT, sender="app@x", rcpt="u@c.test") is None
    assert decide(f, Stage.MAIL, sender="app@x") is None


def test_recipient_rules_at_data_stages_look_at_every_accepted_recipient() -> None:
    f = Faults(faults.script([{"stage": "data-end", "rcpt": "slow@*", "action": "silence"}]))
    assert decide(f, Stage.DATA_END, recipients=("a@x", "slow@x")).action is Action.SILENCE  # type: ignore[union-attr]
    assert decide(f, Stage.DATA_END, recipients=("a@x",)) is None


def test_message_and_connection_numbers_and_times() -> None:
    f = Faults(faults.script([
        {"stage": "mail", "message": [2, 3], "reply": "451 4.3.0 busy"},
        {"stage": "connect", "connection": 1, "times": 1, "reply": "421 4.3.2 go away"},
    ]))
    assert f.new_connection() == 1
    assert decide(f, Stage.CONNECT, connection=1).reply.code == 421  # type: ignore[union-attr]
    assert decide(f, Stage.CONNECT, connection=1) is None  # times = 1
    numbers = [f.new_message() for _ in range(4)]
    assert numbers == [1, 2, 3, 4]
    hits = [decide(f, Stage.MAIL, message=n) is not None for n in numbers]
    assert hits == [False, True, True, False]


def test_greylist_defers_a_triple_once() -> None:
    f = Faults(faults.script([{"action": "greylist"}]))
    first = decide(f, Stage.RCPT, sender="a@x", rcpt="b@y.test")
    assert first is not None and first.reply is not None
    assert first.reply.render({"rcpt": "b@y.test", "domain": "y.test"}) == (
        b"451 4.7.1 <b@y.test>: Recipient address rejected: Greylisted, see "
        b"http://postgrey.schweikert.ch/help/y.test.html\r\n")
    assert decide(f, Stage.RCPT, sender="a@x", rcpt="b@y.test") is None
    assert decide(f, Stage.RCPT, sender="a@x", rcpt="c@y.test") is not None  # a new triple


def test_rate_limit_counts_acceptances_in_the_last_minute() -> None:
    now = [1000.0]
    f = Faults(faults.script([{"action": "rate-limit", "limit": 2}]), clock=lambda: now[0])
    assert decide(f, Stage.MAIL) is None
    f.accepted()
    f.accepted()
    limited = decide(f, Stage.MAIL)
    assert limited is not None and limited.reply is not None and limited.reply.code == 421
    now[0] += 61
    assert decide(f, Stage.MAIL) is None


def test_presets_are_the_providers_texts() -> None:
    values = {"client": "192.0.2.7", "queue_id": "SID", "rcpt": "u@x", "hostname": "h"}
    rendered = {name: faults.parse_reply(text).render(values).decode()
                for name, (_, text) in faults.PRESETS.items()}
    assert rendered["gmail-rate-limit"].startswith(
        "421-4.7.28 [192.0.2.7] Our system has detected an unusual rate of\r\n")
    assert "https://support.google.com/mail/?p=UnsolicitedRateLimitError" in \
        rendered["gmail-rate-limit"]
    assert rendered["gmail-rate-limit"].endswith(
        "421 4.7.28 review our Bulk Email Senders Guidelines. SID - gsmtp\r\n")
    assert rendered["outlook-rate-limit"] == (
        "421 RP-001 (SNT0-MC2-F19) Unfortunately, some messages from 192.0.2.7 weren't sent. "
        "Please try again. We have limits for how many messages can be sent per hour and per "
        "day. You can also refer to http://mail.live.com/mail/troubleshooting.aspx#errors.\r\n")
    assert rendered["microsoft365-server-busy"].startswith(
        "451 4.7.500 Server busy. Please try again later from [192.0.2.7]. (S77719)")
    assert rendered["yahoo-deferred"] == (
        "421 4.7.0 [TSS04] Messages from 192.0.2.7 temporarily deferred due to unexpected "
        "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"
        "\r\n")
    # Each preset comes with the stage where its provider sends it.
    stages = {name: faults.script([{"preset": name}]).rules[0].stage for name in faults.PRESETS}
    assert stages["gmail-rate-limit"] is Stage.DATA_END
    assert stages["yahoo-deferred"] is Stage.MAIL
    assert stages["gmail-receiving-rate"] is Stage.RCPT
