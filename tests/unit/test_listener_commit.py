"""The listener's commit through the fsync helper, in order, over a real socket.

The daemon's listener writes a message's files on its event loop and has the fsync
helper make them durable.  The order is what makes a 250 a promise (qmail's table
in spool.store): content and envelope fsync'ed and data/ fsync'ed before the rename
into incoming/, incoming/ fsync'ed after it, and only then the 250.  A Syncer that
records what the spool looks like at each call (and still fsyncs through its real
helper) shows that order; one that fails shows that nothing is left behind.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from relay.smtpd.listener import Listener
from relay.smtpd.policy import SmtpdSettings
from spool import Envelope, Spool
from spool.fsync import Syncer

pytestmark = pytest.mark.timeout(60)


class Recording(Syncer):
    def __init__(self, spool: Spool, fail_at: int | None = None) -> None:
        super().__init__()
        self.spool = spool
        self.fail_at = fail_at
        self.calls: list[tuple[list[str], dict[str, list[str]]]] = []
        self.returned: list[float] = []

    async def sync(self, paths: Iterable[str | bytes]) -> None:
        names = [os.fsdecode(p) for p in paths]
        state = {q: sorted(os.listdir(os.path.join(self.spool.root, q)))
                 for q in ("tmp", "data", "incoming")}
        self.calls.append(([os.path.relpath(n, self.spool.root) for n in names], state))
        if self.fail_at == len(self.calls):
            raise OSError(errno.EIO, os.strerror(errno.EIO), names[0])
        await super().sync(names)
        self.returned.append(asyncio.get_running_loop().time())


async def session(port: int, content: bytes) -> tuple[str, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> str:
        lines = []
        while True:
            line = (await reader.readline()).decode().rstrip("\r\n")
            lines.append(line)
            if line[3:4] != "-":
                return "\n".join(lines)

    assert (await reply()).startswith("220")
    for cmd in ("EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<b@dest.test>",
                "DATA"):
        writer.write(cmd.encode() + b"\r\n")
        assert (await reply())[0] in "23"
    writer.write(content + b".\r\n")
    answer = await reply()
    at = asyncio.get_running_loop().time()
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()
    return answer, at


async def accept_one(root: Path, fail_at: int | None = None
                     ) -> tuple[str, float, Recording, Spool, list[Envelope]]:
    spool = Spool(str(root))
    queued: list[Envelope] = []
    listener = Listener(spool, SmtpdSettings(myhostname="relay.test", timeout=10.0),
                        on_queued=queued.append)
    syncer = Recording(spool, fail_at)
    syncer.start()
    listener.cleanup.syncer = syncer
    server = await asyncio.get_running_loop().create_server(listener.factory, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        answer, at = await session(port, b"Subject: order\r\n\r\nhello\r\n")
    finally:
        server.close()
        syncer.close()
    return answer, at, syncer, spool, queued


def test_files_then_rename_then_directory_then_250(tmp_path: Path) -> None:
    answer, at, syncer, spool, queued = asyncio.run(accept_one(tmp_path / "spool"))
    assert answer.startswith("250 2.0.0 Ok: queued as "), answer
    qid = answer.rsplit(" ", 1)[1]
    assert [e.queue_id for e in queued] == [qid]
    (first, before_rename), (second, after_rename) = syncer.calls
    assert first[0] == f"data/{qid}" and first[2] == "data"
    assert first[1].startswith(f"tmp/{qid}")  # the envelope, under its temporary name
    assert os.path.basename(first[1]) in before_rename["tmp"] and qid in before_rename["data"]
    assert qid not in before_rename["incoming"], "visible before it was durable"
    assert second == ["incoming"]
    assert qid in after_rename["incoming"] and not after_rename["tmp"]
    assert syncer.returned[-1] <= at, "250 before incoming/ was fsync'ed"
    assert spool.read("incoming", qid).recipients[0].address == "b@dest.test"
    assert spool.read_content(qid).endswith(b"Subject: order\r\n\r\nhello\r\n")


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failed_fsync_is_a_4xx_and_leaves_nothing_half_written(
        tmp_path: Path, fail_at: int) -> None:
    answer, _, _, spool, queued = asyncio.run(accept_one(tmp_path / "spool", fail_at))
    assert answer.startswith("451 4.3.0"), answer
    assert not os.listdir(os.path.join(spool.root, "tmp"))
    if fail_at == 1:
        # Not yet visible: the reservation is released, no queue names it.
        assert not os.listdir(os.path.join(spool.root, "incoming"))
        assert not os.listdir(os.path.join(spool.root, "data"))
        assert queued == []
    else:
        # Renamed but not known durable: the message stays whole (the client, told
        # 4xx, may send it again: the protocol's duplicate, never a loss).
        (qid,) = os.listdir(os.path.join(spool.root, "incoming"))
        assert os.listdir(os.path.join(spool.root, "data")) == [qid]
        assert queued == []

