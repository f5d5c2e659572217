"""The MLflow model registry side of `promote`: registering a candidate version, and moving the
aliases `champion`, `previous` and `challenger` with a compare-and-set.

MLflow has no atomic alias update and keeps no alias history, so every alias move is one numbered
*transaction* recorded as a registered model of its own, `<name>.alias-move-<NNNNNN>`, whose tags
say what moved (alias, from -> to), who (user, host, pid, command), when, why, and its state.
Creating a registered model whose name exists fails on the server (a uniqueness constraint), so
two writers that read the same state both try to create transaction N+1 and exactly one succeeds;
the loser re-reads and, when its move was conditional on the champion it read at the start
(`expect_champion`), gives up with `ChampionMoved` if the champion changed meanwhile.

Order of a transaction: read the latest transaction (waiting while it is `claimed`, i.e. in
flight; after `lock_timeout_s` it is taken as abandoned), read the aliases, check the condition,
claim N+1, move the aliases, mark it `done`. A writer that fails midway restores the aliases it
moved and marks the transaction `failed`.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.errors import ShrinkflowError

log = logging.getLogger(__name__)
ALIASES = ("champion", "previous", "challenger")
MOVE_ROLE = "alias-move"
_UNSET = object()
TAG_LIMIT = 5000  # MLflow's limit on a tag value


class ChampionMoved(ShrinkflowError):
    """The champion changed between the read at the start and the compare-and-set."""

    def __init__(self, expected: str | None, found: str | None) -> None:
        self.expected, self.found = expected, found
        super().__init__(
            f"champion moved from {_v(expected)} to {_v(found)} meanwhile; not promoted"
        )


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


def already_exists(e: Exception) -> bool:
    return isinstance(e, MlflowException) and e.error_code in (
        "RESOURCE_ALREADY_EXISTS",
        "ALREADY_EXISTS",
    )


def not_found(e: Exception) -> bool:
    return isinstance(e, MlflowException) and e.error_code == "RESOURCE_DOES_NOT_EXIST"


def actor() -> dict[str, str]:
    """Who is moving aliases: user, host, process id and command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    argv = [Path(sys.argv[0]).name, *sys.argv[1:3]] if sys.argv and sys.argv[0] else ["python"]
    return {
        "user": user,
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "command": " ".join(argv)[:200],
    }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class Snapshot:
    """The aliases as read after the latest finished transaction `seq`."""

    seq: int
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> version

    @property
    def champion(self) -> str | None:
        return self.aliases.get("champion")


class AliasLedger:
    """Alias moves of registered model `name` as numbered, recorded transactions."""

    def __init__(
        self, client: MlflowClient, name: str, *, lock_timeout_s: float = 120, poll_s: float = 0.1
    ) -> None:
        self.client, self.name = client, name
        self.lock_timeout_s, self.poll_s = lock_timeout_s, poll_s
        self.prefix = f"{name}.alias-move-"

    def _txn_name(self, seq: int) -> str:
        return f"{self.prefix}{seq:06d}"

    def _latest(self):
        found = self.client.search_registered_models(
            filter_string=f"name LIKE '{self.prefix}%'", order_by=["name DESC"], max_results=1
        )
        return found[0] if found else None

    def snapshot(self) -> Snapshot:
        """The current aliases, read once no transaction is in flight."""
        latest = self._latest()
        seq = int(latest.name.removeprefix(self.prefix)) if latest else 0
        self._wait_finished(seq)
        return Snapshot(seq, self._aliases())

    def _aliases(self) -> dict[str, str]:
        try:
            aliases = self.client.get_registered_model(self.name).aliases
        except MlflowException as e:
            if not not_found(e):
                raise
            aliases = {}
        return {a: str(v) for a, v in aliases.items() if a in ALIASES}

    def _wait_finished(self, seq: int) -> None:
        """Wait while transaction `seq` is in flight (`claimed`); past `lock_timeout_s` it is
        taken as abandoned. Read by name: a search may lag behind the latest tag write."""
        if seq == 0:
            return
        name = self._txn_name(seq)
        while True:
            tags = self.client.get_registered_model(name).tags
            if tags.get("state") != "claimed":
                return
            age = time.time() - int(tags.get("claimed_at_ms", "0")) / 1000
            if age > self.lock_timeout_s:
                log.warning("alias move %s never finished (%.0f s): abandoned", name, age)
                self.client.set_registered_model_tag(name, "state", "abandoned")
                return
            time.sleep(self.poll_s)

    def move(
        self,
        changes: dict[str, str | None] | Callable[[Snapshot], dict[str, str | None]],
        *,
        action: str,
        version: str | None = None,
        reason: str = "",
        expect_champion: str | None | object = _UNSET,
        run_id: str | None = None,
        attempts: int = 100,
    ) -> dict:
        """Set (version) or remove (None) aliases in one recorded transaction.

        `changes` may be a function of the snapshot it applies to. With `expect_champion`, the
        move happens only if the champion is still that version (None: no champion).

        Returns the transaction record. Raises ChampionMoved when the condition fails.
        """
        for _ in range(attempts):
            snap = self.snapshot()
            if expect_champion is not _UNSET and snap.champion != expect_champion:
                raise ChampionMoved(expect_champion, snap.champion)
            wanted = changes(snap) if callable(changes) else changes
            moves = [
                {"alias": a, "from": snap.aliases.get(a), "to": v}
                for a, v in wanted.items()
                if snap.aliases.get(a) != v
            ]
            record = {
                "seq": snap.seq + 1,
                "action": action,
                "version": version,
                "reason": reason,
                "moves": moves,
                "at": now_iso(),
                **actor(),
                "run_id": run_id,
            }
            try:
                self.client.create_registered_model(
                    self._txn_name(snap.seq + 1),
                    tags={
                        "shrinkflow.role": MOVE_ROLE,
                        "registered_model": self.name,
                        "state": "claimed",
                        "claimed_at_ms": str(int(time.time() * 1000)),
                        **{k: _tag(v) for k, v in record.items() if k != "seq"},
                    },
                    description=f"Shrinkflow alias move #{snap.seq + 1} of `{self.name}` "
                    "(the registry keeps no alias history; this record is it). Do not delete.",
                )
            except MlflowException as e:
                if already_exists(e):
                    continue  # another writer took N+1: re-read and re-check
                raise
            # Holding N+1 (a ticket nobody else can take), wait for N to finish and check that
            # the aliases are still those the moves were computed from; otherwise step aside.
            txn = self._txn_name(snap.seq + 1)
            self._wait_finished(snap.seq)
            if self._aliases() != snap.aliases:
                self.client.set_registered_model_tag(txn, "state", "aborted")
                continue  # re-read: raises ChampionMoved if the champion changed
            self._apply(record)
            return record
        raise ShrinkflowError(f"{self.name}: could not move aliases after {attempts} attempts")

    def _apply(self, record: dict) -> None:
        txn = self._txn_name(record["seq"])
        done = []
        try:
            for m in record["moves"]:
                self._set(m["alias"], m["to"])
                done.append(m)
            self.client.set_registered_model_tag(txn, "state", "done")
        except BaseException:
            for m in reversed(done):  # best effort: the aliases as they were
                try:
                    self._set(m["alias"], m["from"])
                except Exception as e:  # noqa: BLE001  (keep restoring the others)
                    log.error("could not restore alias %s to %s: %s", m["alias"], m["from"], e)
            try:
                self.client.set_registered_model_tag(txn, "state", "failed")
            except Exception as e:  # noqa: BLE001
                log.error("could not mark %s failed: %s", txn, e)
            raise

    def _set(self, alias: str, version: str | None) -> None:
        if version is None:
            self.client.delete_registered_model_alias(self.name, alias)
        else:
            self.client.set_registered_model_alias(self.name, alias, version)

    def history(self) -> list[dict]:
        """Every recorded transaction, oldest first."""
        out, token = [], None
        while True:
            page = self.client.search_registered_models(
                filter_string=f"name LIKE '{self.prefix}%'",
                order_by=["name ASC"],
                max_results=1000,
                page_token=token,
            )
            for rm in page:
                t = rm.tags
                out.append(
                    {
                        "seq": int(rm.name.removeprefix(self.prefix)),
                        "moves": json.loads(t.get("moves") or "[]"),
                        **{
                            k: t.get(k) or None
                            for k in ("state", "action", "version", "reason", "at", "user")
                        },
                        **{k: t.get(k) for k in ("host", "pid", "command", "run_id")},
                    }
                )
            token = page.token
            if not token:
                return out

    def champion_before(self, version: str) -> str | None:
        """The champion that `version` replaced the last time it became champion."""
        for txn in reversed(self.history()):
            if txn["state"] != "done":
                continue
            for m in txn["moves"]:
                if m["alias"] == "champion" and m["to"] == version:
                    return m["from"]
        return None


def _tag(value) -> str:
    if value is None:
        return ""
    return (value if isinstance(value, str) else json.dumps(value))[:TAG_LIMIT]


def register_version(
    client: MlflowClient,
    name: str,
    *,
    source: str,
    run_id: str,
    tags: dict[str, str],
    description: str,
) -> tuple[str, bool]:
    """Create a version of `name` (and `name` itself on first use) with its tags and card.

    Returns (version, whether the registered model was created by this call).
    """
    created = False
    try:
        client.create_registered_model(
            name,
            tags={"shrinkflow.role": "detector"},
            description="Shrinkflow detector: ONNX + built engines as an MLflow pyfunc. "
            "Aliases: champion (deploy this), previous (rollback), challenger (latest candidate).",
        )
        created = True
    except MlflowException as e:
        if not already_exists(e):
            raise
    mv = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={k: v[:TAG_LIMIT] for k, v in tags.items()},
        description=description,
    )
    return str(mv.version), created


def unregister(client: MlflowClient, name: str, version: str, model_created: bool) -> None:
    """Undo `register_version` (a failed promotion leaves nothing half-registered)."""
    client.delete_model_version(name, version)
    if model_created and not client.search_model_versions(f"name = '{name}'", max_results=1):
        client.delete_registered_model(name)
