"""protheus-license's lease table and journal, in memory: grants, renewal, expiry, grace,
revoke, reload, and the journal replayed after a crash at every byte it ever wrote."""

from __future__ import annotations

import itertools
import os
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from protheus_broker.license import journal as journal_module
from protheus_broker.license.journal import FileJournal, JournalCorrupt, encode, open_journal, replay
from protheus_broker.license.leases import Lease, LeaseTable, Limits, Reason
from protheus_broker.license.protocol import NoSeats, UnknownClass, UnknownLease

from tests.helpers import LogCatcher


def ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"L{next(counter)}"


def table(clock: task.Clock, counts: dict[str, int] | None = None, **limits: Any) -> LeaseTable:
    return LeaseTable(clock, counts if counts is not None else {"TOTVS_I": 10, "APP1": 3},
                      Limits(**{"ttl": 30.0, "grace": 10.0, "max_seats_per_lease": 100,
                                "max_leases_per_client": 64, **limits}), new_id=ids())


class MemoryJournal:
    """A journal in memory that also notes the table's state at every record boundary."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.boundaries = [0]
        self.states: list[list[Lease]] = []
        self.table: LeaseTable | None = None
        self.fail = False

    def state(self) -> list[Lease]:
        assert self.table is not None
        return sorted(self.table.leases.values(), key=lambda lease: lease.lease_id)

    def record(self, entry: dict[str, Any]) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.states.append(self.state())  # what the journal holds before this record
        self.data += encode(entry)
        self.boundaries.append(len(self.data))


class LeaseTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.log = LogCatcher(self)

    def test_grant_gives_a_block_of_what_is_free(self) -> None:
        """A lease gets the seats asked, or fewer when fewer are free."""
        leases = table(self.clock)
        self.assertEqual(leases.grant("b1", "TOTVS_I", 7).seats, 7)
        second = leases.grant("b2", "TOTVS_I", 7)
        self.assertEqual((second.seats, leases.free("TOTVS_I"), leases.in_use("TOTVS_I")), (3, 0, 10))

    def test_no_free_seat_is_no_seats(self) -> None:
        """With every seat leased a grant fails with NoSeats and changes nothing."""
        leases = table(self.clock)
        leases.grant("b1", "APP1", 3)
        self.assertRaises(NoSeats, leases.grant, "b2", "APP1", 1)
        self.assertEqual(len(leases.leases), 1)

    def test_unknown_class(self) -> None:
        """A class the server has no license of is UnknownClass."""
        self.assertRaises(UnknownClass, table(self.clock).grant, "b1", "APP9", 1)

    def test_seats_per_lease_and_leases_per_client_are_bounded(self) -> None:
        """A lease holds at most MAX_SEATS_PER_LEASE; a client at most MAX_LEASES_PER_CLIENT leases."""
        leases = table(self.clock, {"TOTVS_I": 100}, max_seats_per_lease=4, max_leases_per_client=2)
        self.assertEqual(leases.grant("b1", "TOTVS_I", 50).seats, 4)
        leases.grant("b1", "TOTVS_I", 1)
        self.assertRaises(NoSeats, leases.grant, "b1", "TOTVS_I", 1)
        self.assertEqual(leases.grant("b2", "TOTVS_I", 1).seats, 1)

    def test_zero_seats_is_refused(self) -> None:
        """Asking for fewer than one seat is refused."""
        self.assertRaises(NoSeats, table(self.clock).grant, "b1", "TOTVS_I", 0)

    def test_renew_resets_the_ttl(self) -> None:
        """A renewed lease lives a TTL from its renewal, not from its grant."""
        leases = table(self.clock)
        lease = leases.grant("b1", "TOTVS_I", 2)
        self.clock.advance(20)
        self.assertEqual(leases.renew("b1", lease.lease_id), 30.0)
        self.clock.advance(20)
        leases.tick()
        self.assertIn(lease.lease_id, leases.leases)
        self.clock.advance(10)
        leases.tick()
        self.assertNotIn(lease.lease_id, leases.leases)

    def test_unrenewed_lease_expires_at_its_ttl(self) -> None:
        """A lease not renewed ends at its TTL, logged with the reason 'expired'."""
        leases = table(self.clock)
        lease = leases.grant("b1", "TOTVS_I", 2)
        self.clock.advance(29.9)
        leases.tick()
        self.assertEqual(leases.in_use("TOTVS_I"), 2)
        self.clock.advance(0.1)
        self.assertRaises(UnknownLease, leases.renew, "b1", lease.lease_id)
        self.assertEqual((leases.in_use("TOTVS_I"), leases.releases[Reason.EXPIRED]), (0, 1))
        self.assertEqual(len(self.log.find(reason="expired", lease_id=lease.lease_id)), 1)

    def test_release_part_then_all(self) -> None:
        """Release gives seats back; the answer is what is left; none left ends the lease."""
        leases = table(self.clock)
        lease = leases.grant("b1", "TOTVS_I", 5)
        self.assertEqual(leases.release("b1", lease.lease_id, 2), 3)
        self.assertEqual(leases.release("b1", lease.lease_id, 0), 3)
        self.assertEqual(leases.release("b1", lease.lease_id, 9), 0)
        self.assertEqual((leases.leases, leases.releases[Reason.RETURNED]), ({}, 2))
        self.assertEqual(len(self.log.find(reason="returned")), 2)

    def test_another_clients_lease_is_unknown(self) -> None:
        """A client cannot renew or release a lease it does not hold."""
        leases = table(self.clock)
        lease = leases.grant("b1", "TOTVS_I", 5)
        self.assertRaises(UnknownLease, leases.renew, "b2", lease.lease_id)
        self.assertRaises(UnknownLease, leases.release, "b2", lease.lease_id, 5)
        self.assertEqual(leases.in_use("TOTVS_I"), 5)

    def test_client_back_within_grace_keeps_its_leases(self) -> None:
        """A client that comes back within GRACE_TIME finds its leases."""
        leases = table(self.clock)
        lease = leases.grant("b1", "TOTVS_I", 5)
        leases.client_lost("b1")
        self.clock.advance(9.9)
        leases.tick()
        self.assertEqual(leases.client_back("b1"), [lease])
        self.clock.advance(5)
        leases.tick()
        self.assertEqual(leases.in_use("TOTVS_I"), 5)

    def test_client_gone_past_grace_loses_its_leases(self) -> None:
        """A client that stays away GRACE_TIME loses its leases, reason 'client gone'."""
        leases = table(self.clock)
        leases.grant("b1", "TOTVS_I", 5)
        leases.grant("b2", "TOTVS_I", 1)
        leases.client_lost("b1")
        self.clock.advance(10)
        leases.tick()
        self.assertEqual((leases.in_use("TOTVS_I"), leases.releases[Reason.CLIENT_GONE]), (1, 1))
        self.assertEqual(leases.client_back("b1"), [])
        self.assertEqual(len(self.log.find(reason="client gone", client="b1")), 1)

    def test_revoke(self) -> None:
        """An admin revoke ends the lease, reason 'revoked by admin'; an unknown id is UnknownLease."""
        leases = table(self.clock)
        lease = leases.grant("b1", "APP1", 3)
        self.assertEqual(leases.revoke(lease.lease_id, "token@127.0.0.1"), lease)
        self.assertEqual((leases.free("APP1"), leases.releases[Reason.REVOKED]), (3, 1))
        self.assertRaises(UnknownLease, leases.revoke, lease.lease_id)
        self.assertEqual(len(self.log.find(reason="revoked by admin")), 1)

    def test_reload_shrinking_takes_nothing_back(self) -> None:
        """Shrinking a class below what is leased keeps the leases; grants wait until below the count."""
        leases = table(self.clock)
        first = leases.grant("b1", "TOTVS_I", 6)
        leases.grant("b2", "TOTVS_I", 4)
        leases.set_counts({"TOTVS_I": 5, "APP1": 3})
        self.assertEqual((leases.in_use("TOTVS_I"), leases.free("TOTVS_I")), (10, 0))
        leases.release("b1", first.lease_id, 4)
        self.assertRaises(NoSeats, leases.grant, "b3", "TOTVS_I", 1)
        leases.release("b1", first.lease_id, 2)
        self.assertEqual(leases.grant("b3", "TOTVS_I", 5).seats, 1)

    def test_reload_removing_a_class(self) -> None:
        """A class removed by a reload keeps its leases (shown) but grants no more."""
        leases = table(self.clock)
        leases.grant("b1", "APP1", 2)
        leases.set_counts({"TOTVS_I": 10})
        self.assertRaises(UnknownClass, leases.grant, "b1", "APP1", 1)
        self.assertEqual((leases.classes(), leases.in_use("APP1")), (["TOTVS_I", "APP1"], 2))


def run_scenario(clock: task.Clock, journal: MemoryJournal) -> LeaseTable:
    """Grants, refusals, renewals, partial and full releases, grace, revoke and expiry."""
    leases = table(clock, max_seats_per_lease=4, max_leases_per_client=5)
    leases.journal = journal
    journal.table = leases
    first = leases.grant("A", "TOTVS_I", 4)
    second = leases.grant("B", "TOTVS_I", 8)
    app = leases.grant("A", "APP1", 5)
    fourth = leases.grant("B", "TOTVS_I", 5)
    try:
        leases.grant("C", "TOTVS_I", 1)
    except NoSeats:
        pass
    clock.advance(10)
    leases.renew("A", first.lease_id)
    leases.release("A", first.lease_id, 2)
    leases.release("B", second.lease_id, 4)
    leases.client_lost("B")
    clock.advance(11)
    leases.tick()
    assert fourth.lease_id not in leases.leases
    leases.revoke(app.lease_id)
    leases.grant("C", "TOTVS_I", 3)
    clock.advance(20)
    leases.tick()
    leases.grant("C", "APP1", 2)
    journal.states.append(journal.state())
    return leases


class JournalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.log = LogCatcher(self)

    def test_replay_gives_the_table_back(self) -> None:
        """Replaying the whole journal gives the live table, deadlines included."""
        journal = MemoryJournal()
        leases = run_scenario(self.clock, journal)
        replayed = replay(bytes(journal.data))
        self.assertEqual(replayed.leases, sorted(leases.leases.values(), key=lambda lease: lease.lease_id))
        self.assertEqual((replayed.torn, replayed.records), ("", len(journal.boundaries) - 1))

    def test_crash_at_every_byte_grants_no_seat_twice_and_leaks_none(self) -> None:
        """Cut after any byte, the replay is the table as of the last whole record: every answered
        grant is there, no released seat comes back, a restart grants no seat twice."""
        journal = MemoryJournal()
        run_scenario(self.clock, journal)
        data = bytes(journal.data)
        counts = {"TOTVS_I": 10, "APP1": 3}
        print(f"\njournal: {len(journal.boundaries) - 1} records, {len(data)} bytes: "
              f"{len(data) + 1} crash points replayed")
        for cut in range(len(data) + 1):
            whole = max(k for k, boundary in enumerate(journal.boundaries) if boundary <= cut)
            replayed = replay(data[:cut])
            self.assertEqual(replayed.leases, journal.states[whole], f"cut at byte {cut}")
            self.assertEqual(bool(replayed.torn), cut not in journal.boundaries, f"cut at byte {cut}")
            restarted = table(self.clock, counts)
            restarted.load(replayed.leases)
            for license_class, count in counts.items():
                try:
                    restarted.grant("Z", license_class, count)
                except NoSeats:
                    pass
                self.assertLessEqual(restarted.in_use(license_class), count, f"cut at byte {cut}")

    def test_torn_last_record_is_ignored_with_one_line(self) -> None:
        """A torn last record is left out and logged once when the journal is opened."""
        path = self.mktemp()
        good = encode({"op": "grant", "lease": "L1", "client": "A", "class": "TOTVS_I", "seats": 2,
                       "expires": self.clock.seconds() + 30})
        with open(path, "wb") as handle:
            handle.write(good + encode({"op": "release", "lease": "L1", "seats": 2,
                                        "reason": "returned"})[:-5])
        leases = table(self.clock)
        opened = FileJournal(path)
        self.addCleanup(opened.close)
        open_journal(opened, leases)
        self.assertEqual(leases.in_use("TOTVS_I"), 2)
        self.assertEqual(len([t for t in self.log.texts() if "ignored" in t and path in t]), 1)
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(), good)

    def test_damaged_middle_record_is_refused(self) -> None:
        """A bad record that is not the last is a damaged file: JournalCorrupt names its line."""
        data = encode({"op": "grant", "lease": "L1", "client": "A", "class": "X", "seats": 1, "expires": 1.0})
        damaged = data.replace(b"L1", b"L2") + data
        error = self.assertRaises(JournalCorrupt, replay, damaged, "license.journal")
        self.assertEqual(error.line, 1)
        self.assertIn("license.journal:1: unreadable record (checksum mismatch)", str(error))

    def test_restart_keeps_the_remaining_ttl_in_wall_time(self) -> None:
        """A lease found at restart ends at its wall-clock deadline; one past it ends at load."""
        path = self.mktemp()
        leases = table(self.clock)
        journal = FileJournal(path)
        open_journal(journal, leases)
        kept = leases.grant("A", "TOTVS_I", 3)
        self.clock.advance(20)
        late = leases.grant("B", "TOTVS_I", 2)
        journal.close()
        self.clock.advance(15)  # down 15 s: the first lease's deadline has passed
        restarted = table(self.clock)
        again = FileJournal(path)
        self.addCleanup(again.close)
        open_journal(again, restarted)
        self.assertEqual(list(restarted.leases), [late.lease_id])
        self.assertEqual(restarted.leases[late.lease_id].expires, late.expires)
        self.assertEqual(len(self.log.find(lease_id=kept.lease_id, reason="expired")), 1)
        self.clock.advance(15)
        restarted.tick()
        self.assertEqual(restarted.leases, {})

    def test_compaction_is_a_snapshot_renamed_into_place(self) -> None:
        """Compaction leaves exactly the live leases in the file and no temp file; appends follow it."""
        path = self.mktemp()
        leases = table(self.clock)
        journal = FileJournal(path)
        self.addCleanup(journal.close)
        open_journal(journal, leases)
        for _ in range(5):
            lease = leases.grant("A", "TOTVS_I", 1)
            leases.release("A", lease.lease_id, 1)
        kept = leases.grant("A", "TOTVS_I", 2)
        self.assertEqual(journal.appended, 11)
        size = journal.compact(leases.leases.values())
        self.assertEqual((os.path.getsize(path), journal.appended, os.path.exists(path + ".tmp")),
                         (size, 0, False))
        leases.release("A", kept.lease_id, 1)
        self.assertEqual([lease.seats for lease in replay(journal.read()).leases], [1])

    def test_a_crash_during_compaction_leaves_the_old_journal(self) -> None:
        """A half-written temp file from a crash mid-compaction changes nothing at restart."""
        path = self.mktemp()
        leases = table(self.clock)
        journal = FileJournal(path)
        open_journal(journal, leases)
        lease = leases.grant("A", "TOTVS_I", 2)
        journal.close()
        with open(path + ".tmp", "wb") as handle:
            handle.write(b"0000")
        restarted = table(self.clock)
        again = FileJournal(path)
        self.addCleanup(again.close)
        open_journal(again, restarted)
        self.assertEqual(list(restarted.leases.values()), [lease])

    def test_failed_write_grants_nothing(self) -> None:
        """A journal write that fails (disk full) leaves the table unchanged and the file whole."""
        path = self.mktemp()
        leases = table(self.clock)
        calls: list[int] = []

        def fsync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 4:
                raise OSError(28, "No space left on device")

        journal = FileJournal(path, fsync=fsync)
        self.addCleanup(journal.close)
        open_journal(journal, leases)  # fsyncs the temp file and the folder
        leases.grant("A", "TOTVS_I", 1)
        self.assertRaises(OSError, leases.grant, "A", "TOTVS_I", 1)
        self.assertEqual(leases.in_use("TOTVS_I"), 1)
        leases.grant("A", "TOTVS_I", 1)
        replayed = replay(journal.read())
        self.assertEqual(([lease.seats for lease in replayed.leases], replayed.torn), ([1, 1], ""))


class IndexTests(SynchronousTestCase):
    def test_indexes_match_the_table(self) -> None:
        """Seats in use and leases per client, kept as counters, match a count of the table."""
        clock = task.Clock()
        leases = run_scenario(clock, MemoryJournal())
        for license_class in ("TOTVS_I", "APP1"):
            self.assertEqual(leases.in_use(license_class),
                             sum(lease.seats for lease in leases.leases.values()
                                 if lease.license_class == license_class))
        for client in ("A", "B", "C"):
            self.assertEqual(leases.held_by(client), sorted(
                (lease for lease in leases.leases.values() if lease.client == client),
                key=lambda lease: lease.lease_id))


class JournalModuleTests(SynchronousTestCase):
    def test_default_path(self) -> None:
        """The journal lives under /var/lib/protheus-broker by default."""
        self.assertEqual(journal_module.DEFAULT_JOURNAL_PATH, "/var/lib/protheus-broker/license.journal")
