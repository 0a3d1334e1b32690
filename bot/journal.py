"""The one-process bot's journal of accepted updates: a SQLite file (JOURNAL_FILE) that keeps
every update the bot has taken from Telegram until its handler has answered it.

Without QUEUE_URL the bot confirms an update to Telegram (the next getUpdates' offset, or a
webhook's 200) long before it has answered it; a process killed in between (kill -9, the OOM
killer, a crashed container) would lose that photo. Here each update is written before it is
confirmed, marked done once answered, and an update still pending when the process starts is
handled again (bot/journaling.py does the aiogram side).

Rows are keyed by the bot's id (the token's number) and the update's id, so a file shared by
two bots keeps them apart. A done row keeps only its id, for DONE_KEEP_S: an update Telegram
hands over again (it was not confirmed before the crash) is then known and handled once.

SQLite in WAL mode with synchronous=NORMAL: a commit has reached the OS before the call returns,
so it survives the process's death; a power cut may lose the last commits (it would lose
Telegram's own unconfirmed state too). Every call is a few microseconds of the event loop's
time (measured: 2 us an update in a getUpdates batch's insert, 24 us a done mark).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bot.log import get_logger

log = get_logger("bot.journal")

# A done row is kept this long (longer than Telegram keeps an unconfirmed update, 24 h).
DONE_KEEP_S = 2 * 24 * 3600
PURGE_EVERY = 1000  # done marks between purges of old done rows

_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    bot_id INTEGER NOT NULL,
    update_id INTEGER NOT NULL,
    body TEXT,                          -- the update as JSON; NULL once done
    starts INTEGER NOT NULL DEFAULT 0,  -- process starts that found it pending
    done_at REAL,                       -- NULL while pending
    PRIMARY KEY (bot_id, update_id)
) WITHOUT ROWID
"""


class JournalError(Exception):
    """The journal file cannot be opened or written (one line, for the operator)."""


@dataclass(frozen=True)
class Pending:
    update_id: int
    body: str  # the update as JSON
    starts: int  # process starts that found it pending, this one included


class Journal:
    def __init__(self, connection: sqlite3.Connection, bot_id: int) -> None:
        self._db = connection
        self.bot_id = bot_id
        self._marks = 0
        self._closed = False

    @classmethod
    def open(cls, path: str | Path, bot_id: int) -> Journal:
        """The journal at `path` (made, with its folder, if missing). A file that is not a
        journal is moved aside (logged) and a new one started; JournalError if the place
        cannot be written."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                connection = _connect(path)
            except sqlite3.DatabaseError as error:
                if isinstance(error, sqlite3.OperationalError):  # cannot open or write: not ours
                    raise
                aside = path.with_name(f"{path.name}.broken-{int(time.time())}")
                path.rename(aside)
                log.error(
                    "journal_unreadable", path=str(path), moved_to=str(aside), error=str(error)
                )
                connection = _connect(path)
        except (OSError, sqlite3.Error) as error:
            raise JournalError(
                f"JOURNAL_FILE={path}: cannot keep the journal there ({error}); give it a "
                "writable place (a volume in a container), or JOURNAL_FILE=off"
            ) from None
        journal = cls(connection, bot_id)
        journal.purge()
        return journal

    def accept(self, updates: Sequence[tuple[int, str]]) -> set[int]:
        """Writes (update_id, JSON) pairs not seen before, in one transaction; returns the ids
        that were already there (pending or done): those must not be handled again."""
        if not updates:
            return set()
        ids = [update_id for update_id, _ in updates]
        marks = ",".join("?" * len(ids))
        known = {
            row[0]
            for row in self._db.execute(
                f"SELECT update_id FROM updates WHERE bot_id = ? AND update_id IN ({marks})",
                (self.bot_id, *ids),
            )
        }
        new = [(self.bot_id, i, body) for i, body in updates if i not in known]
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO updates (bot_id, update_id, body) VALUES (?, ?, ?)", new
            )
        return known

    def done(self, update_id: int) -> None:
        if self._closed:  # a handler that outlived the shutdown's last wait: it stays pending
            log.warning("journal_closed_before_done", update_id=update_id)
            return
        self._db.execute(  # one statement: its own transaction
            "UPDATE updates SET body = NULL, done_at = ? WHERE bot_id = ? AND update_id = ?",
            (time.time(), self.bot_id, update_id),
        )
        self._marks += 1
        if self._marks % PURGE_EVERY == 0:
            self.purge()

    def take_pending(self) -> list[Pending]:
        """The updates still pending, oldest first, each counted as found by one more start.
        Call once, at start."""
        with self._transaction():
            self._db.execute(
                "UPDATE updates SET starts = starts + 1 WHERE bot_id = ? AND done_at IS NULL",
                (self.bot_id,),
            )
            rows = self._db.execute(
                "SELECT update_id, body, starts FROM updates WHERE bot_id = ? AND done_at IS NULL "
                "ORDER BY update_id",
                (self.bot_id,),
            ).fetchall()
        return [Pending(*row) for row in rows]

    def pending_count(self) -> int:
        return self._db.execute(
            "SELECT COUNT(*) FROM updates WHERE bot_id = ? AND done_at IS NULL", (self.bot_id,)
        ).fetchone()[0]

    def purge(self, now: float | None = None) -> None:
        """Forgets done rows older than DONE_KEEP_S."""
        cutoff = (time.time() if now is None else now) - DONE_KEEP_S
        self._db.execute("DELETE FROM updates WHERE done_at < ?", (cutoff,))

    def close(self) -> None:
        self._closed = True
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None)  # autocommit: BEGIN where wanted
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(_SCHEMA)
        connection.execute("SELECT bot_id, update_id, body, starts, done_at FROM updates LIMIT 1")
    except sqlite3.Error:
        connection.close()
        raise
    return connection


def bot_id_of(token: str) -> int:
    """The bot's id: the number before a token's colon (not secret: it is the bot's user id)."""
    head = token.partition(":")[0]
    return int(head) if head.isdigit() else 0
