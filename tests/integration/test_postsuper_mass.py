"""postsuper -d ALL / -h ALL / -H ALL / -r ALL / -d - on a few hundred messages, in-process."""
from __future__ import annotations

import io
import os
from pathlib import Path

from relay.cli import postsuper
from spool import Envelope, Recipient, Spool


def site(tmp_path: Path, n: int) -> tuple[Path, Spool, list[str]]:
    cfg = tmp_path / "etc"
    cfg.mkdir()
    (cfg / "main.cf").write_text(f"queue_directory = {tmp_path / 'spool'}\n")
    spool = Spool(str(tmp_path / "spool"))
    ids = []
    for i in range(n):
        env = spool.enqueue(Envelope("", "a@b", (Recipient(f"r{i}@x"),), 1.0), b"x" * 100)
        with spool.locked(env.queue_id) as e:
            e.move("deferred", durable=False)
        ids.append(env.queue_id)
    return cfg, spool, ids


def run(cfg: Path, *args: str, stdin: str = "") -> list[str]:
    err = io.StringIO()
    assert postsuper.main(["-c", str(cfg), *args], stdin=io.StringIO(stdin), stderr=err,
                          environ={}) == 0
    return err.getvalue().splitlines()


def test_mass_operations(tmp_path: Path) -> None:
    cfg, spool, ids = site(tmp_path, 300)
    root = Path(spool.root)
    assert run(cfg, "-h", "ALL") == ["postsuper: Placed on hold: 300 messages"]
    assert sorted(os.listdir(root / "hold")) == sorted(ids)
    assert run(cfg, "-H", "ALL") == ["postsuper: Released from hold: 300 messages"]
    assert sorted(os.listdir(root / "deferred")) == sorted(ids)
    assert run(cfg, "-r", "ALL") == ["postsuper: Requeued: 300 messages"]
    assert sorted(os.listdir(root / "incoming")) == sorted(ids)
    # stdin: lines in input order, invalid ones warned about in place, duplicates once
    lines = ids[:100] + ["bad id"] + ids[100:150] + ids[:3]
    out = run(cfg, "-d", "-", stdin="".join(f"{x}\n" for x in lines))
    assert out == ([f"postsuper: {x}: removed" for x in ids[:100]]
                   + ["postsuper: warning: invalid mail queue id: bad id"]
                   + [f"postsuper: {x}: removed" for x in ids[100:150]]
                   + ["postsuper: Deleted: 150 messages"])
    assert run(cfg, "-d", "ALL") == ["postsuper: Deleted: 150 messages"]
    assert os.listdir(root / "incoming") == [] and os.listdir(root / "data") == []
