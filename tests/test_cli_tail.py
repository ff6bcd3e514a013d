"""``raftseq tail`` reads its stream without a task per message: with ``--idle-exit`` each read
was wrapped in ``asyncio.wait_for``, a task per message (and Python 3.11's ``wait_for`` loses a
cancel that comes with a result)."""

from __future__ import annotations

import argparse
import asyncio
import json
from types import SimpleNamespace

import raftseq.clients
from raftseq.cluster.cli import stream as stream_cli

MESSAGES = 200
WAIT_S = 10.0


def test_tail_reads_every_message_with_no_task_per_message(monkeypatch, capsys) -> None:
    async def fake_subscribe(endpoints, **options):
        for seq in range(1, MESSAGES + 1):
            yield SimpleNamespace(seq=seq, timestamp_ns=seq, session="s", client_seq=seq, payload=b"m%d" % seq)

    monkeypatch.setattr(raftseq.clients, "subscribe", fake_subscribe)
    args = argparse.Namespace(
        endpoints=["127.0.0.1:1"],
        from_seq=1,
        token="",
        session="tail",
        limit=MESSAGES,
        idle_exit=5.0,
        text=True,
        tls_ca=None,
        tls_cert=None,
        tls_key=None,
        tls_server_name=None,
    )
    tasks = 0

    async def story() -> None:
        nonlocal tasks
        loop = asyncio.get_running_loop()

        def counting_factory(loop, coro, **kwargs):
            nonlocal tasks
            tasks += 1
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(counting_factory)
        await stream_cli._tail(args)

    asyncio.run(asyncio.wait_for(story(), WAIT_S))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["seq"] for row in rows] == list(range(1, MESSAGES + 1))
    assert tasks <= 2, f"{tasks} tasks for {MESSAGES} messages"
