"""The alias ledger of `promote`: moving a registered model's aliases `champion`, `previous` and
`challenger` with a compare-and-set (registering the versions: tasks/promote/registry.py).

MLflow has no atomic alias update and keeps no alias history, so every alias move is one numbered
*transaction* recorded in a tracking run of its own: the run `alias-ledger` of the experiment
`<name>.alias-ledger` (so the registered-models list holds only the real model). Transaction N
is claimed by logging the run param `claim.<NNNNNN>` = `<claimed_at_ms>:<random token>`. MLflow
params are write-once (the store refuses a second, different value for a key: a primary key on
(run, key)), so of two writers that read the same state and both try to claim N+1, exactly one
succeeds; the loser re-reads and, when its move was conditional on the champion it read at the
start (`expect_champion`), gives up with `ChampionMoved` if the champion changed meanwhile. The
run tags `txn.<NNNNNN>` (what moved: alias, from -> to; who: user, host, pid, command; when; why)
and `txn.<NNNNNN>.state` record each transaction.

Order of a transaction: read the latest claim (waiting while it is `claimed`, i.e. in flight;
after `lock_timeout_s` it is taken as abandoned), read the aliases, check the condition, claim
N+1, move the aliases, mark it `done`. A writer that fails midway restores the aliases it moved
and marks the transaction `failed`.
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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.harness.errors import ShrinkflowError
from tasks.promote.registry import already_exists, not_found

log = logging.getLogger(__name__)
ALIASES = ("champion", "previous", "challenger")
LEDGER_ROLE = "alias-ledger"
LEDGER_SUFFIX = ".alias-ledger"  # the ledger experiment: <registered model>.alias-ledger
LEDGER_RUN_TAG = "shrinkflow.alias_ledger_run_id"  # experiment tag: the ledger run's id
CLAIM, TXN = "claim.", "txn."  # run param claim.<seq> (write-once), run tags txn.<seq>[.state]
_UNSET = object()
REASON_LIMIT = 1000  # a transaction's reason, in its run tag (run tags: 8000 characters)


class ChampionMoved(ShrinkflowError):
    """The champion changed between the read at the start and the compare-and-set."""

    def __init__(self, expected: str | None, found: str | None) -> None:
        self.expected, self.found = expected, found
        super().__init__(
            f"champion moved from {_v(expected)} to {_v(found)} meanwhile; not promoted"
        )


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


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


def _key(prefix: str, seq: int) -> str:
    return f"{prefix}{seq:06d}"


class AliasLedger:
    """Alias moves of registered model `name` as numbered, recorded transactions."""

    def __init__(
        self, client: MlflowClient, name: str, *, lock_timeout_s: float = 120, poll_s: float = 0.1
    ) -> None:
        self.client, self.name = client, name
        self.lock_timeout_s, self.poll_s = lock_timeout_s, poll_s
        self.experiment = f"{name}{LEDGER_SUFFIX}"
        self._run_id: str | None = None

    # ------------------------------------------------------------ the ledger run

    @property
    def run_id(self) -> str:
        """The ledger run's id; the experiment and run are created on first use."""
        if self._run_id is None:
            self._run_id = self._find(create=True)
        return self._run_id

    def _find(self, *, create: bool) -> str | None:
        """The ledger run of `self.experiment` (None when it does not exist and not `create`).

        Experiment names are unique, so exactly one writer creates the experiment; it then
        creates the run and names it in the experiment tag LEDGER_RUN_TAG, which the others
        wait for."""
        if self._run_id is not None:
            return self._run_id
        exp, created = self.client.get_experiment_by_name(self.experiment), False
        if exp is None:
            if not create:
                return None
            try:
                exp_id = self.client.create_experiment(
                    self.experiment,
                    tags={"shrinkflow.role": LEDGER_ROLE, "registered_model": self.name},
                )
                created = True
            except MlflowException as e:
                if not already_exists(e):
                    raise
                exp_id = self.client.get_experiment_by_name(self.experiment).experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                raise ShrinkflowError(
                    f"the alias ledger of {self.name} (experiment {self.experiment!r}, id "
                    f"{exp.experiment_id}) is deleted: restore it with `mlflow experiments "
                    f"restore --experiment-id {exp.experiment_id}`"
                )
            exp_id = exp.experiment_id
        if created:
            run = self.client.create_run(
                exp_id,
                run_name=LEDGER_ROLE,
                tags={"shrinkflow.role": LEDGER_ROLE, "registered_model": self.name},
            )
            run_id = run.info.run_id
            self.client.set_terminated(run_id)  # a record, not a job (params/tags still write)
            self.client.set_experiment_tag(exp_id, LEDGER_RUN_TAG, run_id)
            self._run_id = run_id
            return run_id
        deadline = time.time() + self.lock_timeout_s
        while (run_id := self.client.get_experiment(exp_id).tags.get(LEDGER_RUN_TAG)) is None:
            if time.time() > deadline:
                raise ShrinkflowError(
                    f"experiment {self.experiment!r} (id {exp_id}) has no alias-ledger run: "
                    "its creator stopped midway; delete the experiment and retry"
                )
            time.sleep(self.poll_s)
        self._run_id = run_id
        return run_id

    def _read(self) -> tuple[dict[int, str], dict[str, str]]:
        """(claims: seq -> `<claimed_at_ms>:<token>`, the run's tags); empty before first use."""
        run_id = self._find(create=False)
        if run_id is None:
            return {}, {}
        data = self.client.get_run(run_id).data
        claims = {
            int(k.removeprefix(CLAIM)): v for k, v in data.params.items() if k.startswith(CLAIM)
        }
        return claims, data.tags

    @staticmethod
    def _state(seq: int, tags: dict[str, str]) -> str:
        # claimed but not yet recorded counts as in flight
        return tags.get(f"{_key(TXN, seq)}.state") or "claimed"

    def _claim(self, seq: int) -> bool:
        """Try to take transaction `seq`: True when this writer holds it."""
        key, token = _key(CLAIM, seq), f"{int(time.time() * 1000)}:{uuid.uuid4().hex}"
        try:
            self.client.log_param(self.run_id, key, token)
            return True
        except MlflowException as e:
            if e.error_code != "INVALID_PARAMETER_VALUE":
                raise
            held = self.client.get_run(self.run_id).data.params.get(key)
            if held is None:  # refused for another reason
                raise
            return held == token  # (a retried request that had succeeded holds it too)

    def _mark(self, seq: int, state: str) -> None:
        self.client.set_tag(self.run_id, f"{_key(TXN, seq)}.state", state)

    # ------------------------------------------------------------ transactions

    def snapshot(self) -> Snapshot:
        """The current aliases, read once no transaction is in flight."""
        claims, _ = self._read()
        seq = max(claims, default=0)
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
        """Wait while transaction `seq` is in flight (`claimed`); past `lock_timeout_s` since its
        claim it is taken as abandoned."""
        if seq == 0:
            return
        while True:
            claims, tags = self._read()
            if self._state(seq, tags) != "claimed":
                return
            age = time.time() - int(claims[seq].split(":", 1)[0]) / 1000
            if age > self.lock_timeout_s:
                log.warning(
                    "alias move #%d of %s never finished (%.0f s): abandoned", seq, self.name, age
                )
                self._mark(seq, "abandoned")
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
            seq = snap.seq + 1
            if not self._claim(seq):
                continue  # another writer took N+1: re-read and re-check
            record = {
                "seq": seq,
                "action": action,
                "version": version,
                "reason": reason[:REASON_LIMIT],
                "moves": moves,
                "at": now_iso(),
                **actor(),
                "run_id": run_id,
            }
            self.client.set_tag(self.run_id, _key(TXN, seq), json.dumps(record))
            self._mark(seq, "claimed")
            # Holding N+1 (a ticket nobody else can take), wait for N to finish and check that
            # the aliases are still those the moves were computed from (an abandoned writer may
            # have woken up); otherwise step aside.
            self._wait_finished(snap.seq)
            if self._aliases() != snap.aliases:
                self._mark(seq, "aborted")
                continue  # re-read: raises ChampionMoved if the champion changed
            self._apply(record)
            return record
        raise ShrinkflowError(f"{self.name}: could not move aliases after {attempts} attempts")

    def _apply(self, record: dict) -> None:
        done = []
        try:
            for m in record["moves"]:
                self._set(m["alias"], m["to"])
                done.append(m)
            self._mark(record["seq"], "done")
        except BaseException:
            for m in reversed(done):  # best effort: the aliases as they were
                try:
                    self._set(m["alias"], m["from"])
                except Exception as e:  # noqa: BLE001  (keep restoring the others)
                    log.error("could not restore alias %s to %s: %s", m["alias"], m["from"], e)
            try:
                self._mark(record["seq"], "failed")
            except Exception as e:  # noqa: BLE001
                log.error("could not mark alias move #%d failed: %s", record["seq"], e)
            raise

    def _set(self, alias: str, version: str | None) -> None:
        if version is None:
            self.client.delete_registered_model_alias(self.name, alias)
        else:
            self.client.set_registered_model_alias(self.name, alias, version)

    def history(self) -> list[dict]:
        """Every recorded transaction, oldest first."""
        claims, tags = self._read()
        out = []
        for seq in sorted(claims):
            rec = json.loads(tags.get(_key(TXN, seq)) or "{}")
            out.append(
                {
                    "seq": seq,
                    "moves": rec.get("moves", []),
                    "state": self._state(seq, tags),
                    **{
                        k: rec.get(k) or None for k in ("action", "version", "reason", "at", "user")
                    },
                    **{k: rec.get(k) for k in ("host", "pid", "command", "run_id")},
                }
            )
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
