"""A process that dies with SIGKILL in the middle of a settlement (tests/ledger/test_db_crash.py).

``python -m tests.ledger.crash_child '<json>'`` opens the store the JSON names (``db_path`` or
``db_url``), builds a ledger on a fixed clock (``now``, ``fee_bps``) and finalizes ``period``
for ``node_id`` — with the journal's insert wrapped so that, right after the first
``usage_post`` row is written (inside the settlement's transaction, before it commits), the
process kills itself: no exception handler, no rollback, no connection closed politely.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from eecp.core.blocking import Workers
from eecp.core.clock import FixedClock
from eecp.core.config import Config
from eecp.ledger.answers import LedgerSettings
from eecp.ledger.service import Ledger
from eecp.store import ledger_repo
from eecp.store.ledger_records import TransferRow
from eecp.store.store import open_store


def _die_after_first_post() -> None:
    original = ledger_repo.LedgerTx.insert_transfer

    def insert(tx: ledger_repo.LedgerTx, row: TransferRow) -> int:
        transfer_id = original(tx, row)
        if row.code == "usage_post":
            os.kill(os.getpid(), signal.SIGKILL)
        return transfer_id

    ledger_repo.LedgerTx.insert_transfer = insert  # type: ignore[method-assign]


async def main(spec: dict[str, Any]) -> None:
    config = Config(db_path=Path(spec["db_path"])) if spec.get("db_path") else Config(
        db_url=spec["db_url"])
    _die_after_first_post()
    async with open_store(config, Workers()) as store:
        ledger = Ledger(store, LedgerSettings(fee_bps=spec["fee_bps"]),
                        FixedClock(spec["now"]), instance_id="crashing")
        answer = await ledger.finalize("admin", spec["period"],
                                       json.dumps({"node_id": spec["node_id"]}).encode())
    print(f"finalize answered {answer.status} without dying", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
