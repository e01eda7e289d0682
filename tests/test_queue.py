# -*- test-case-name: tests.test_queue -*-
"""The queue on disk: whole entries or none, atomic state changes, fsynced before 250."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from unittest import mock

from twisted.trial import unittest

from mailx.storage.queue import (
    DELIVERED,
    PENDING,
    Envelope,
    Queue,
    QueueError,
    Recipient,
    envelope_summary,
    valid_id,
)
from mailx.testing import SRS_SECRET
from tests.test_cli import CLITestCase

MESSAGE = b"From: a@sender.test\r\nSubject: hi\r\n\r\nHello.\r\n"


def envelope(queue_id: str = "65F00000000001", **fields: object) -> Envelope:
    recipients = [
        Recipient(
            address="x@outside.test", original="boss@example.test", mail_from="SRS0=x@example.test"
        ),
        Recipient(
            address="y@outside.test", original="boss@example.test", mail_from="SRS0=x@example.test"
        ),
    ]
    return Envelope(
        id=queue_id, sender="a@sender.test", created=1000.0, recipients=recipients, **fields
    )


class QueueTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute() / "queue"
        self.queue = Queue(self.root)
        self.queue.prepare()

    def test_enqueue_writes_data_and_envelope(self) -> None:
        path = self.queue.enqueue(envelope(), [MESSAGE[:10], MESSAGE[10:]])
        self.assertEqual(path, self.root / "65F00000000001")
        self.assertEqual((path / "message").read_bytes(), MESSAGE)
        loaded = self.queue.load("65F00000000001")
        self.assertEqual(loaded.size, len(MESSAGE))
        self.assertEqual(
            [r.address for r in loaded.recipients], ["x@outside.test", "y@outside.test"]
        )
        self.assertEqual(loaded.recipients[0].state, PENDING)
        self.assertEqual(os.listdir(self.root / ".tmp"), [])

    def test_files_are_private(self) -> None:
        path = self.queue.enqueue(envelope(), [MESSAGE])
        self.assertEqual((path / "message").stat().st_mode & 0o777, 0o600)
        self.assertEqual((path / "envelope.json").stat().st_mode & 0o777, 0o600)

    def test_eight_bit_is_noticed(self) -> None:
        env = envelope()
        self.queue.enqueue(env, [MESSAGE, "Grüße\r\n".encode()])
        self.assertTrue(env.eight_bit)
        other = envelope("65F00000000002")
        self.queue.enqueue(other, [MESSAGE])
        self.assertFalse(other.eight_bit)

    def test_enqueue_fsyncs_files_and_directories_before_returning(self) -> None:
        synced: list[str] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        with mock.patch("os.fsync", fsync):
            self.queue.enqueue(envelope(), [MESSAGE])
        staging = str(self.root / ".tmp" / "65F00000000001")
        self.assertEqual(
            synced,
            [f"{staging}/message", f"{staging}/envelope.json", staging, str(self.root)],
        )

    def test_enqueue_can_leave_the_queue_directory_to_the_batch(self) -> None:
        later: list[Path] = []
        synced: list[str] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)

        with mock.patch("os.fsync", fsync):
            self.queue.enqueue(envelope(), [MESSAGE], later.append)
        self.assertEqual(later, [self.root])
        self.assertNotIn(str(self.root), synced)
        self.assertEqual(len(synced), 3)  # both files and the entry's own directory

    def test_concurrent_removals_share_fsyncs_and_each_waits_for_one(self) -> None:
        ids = [f"65F0000000010{n}" for n in range(8)]
        for queue_id in ids:
            self.queue.enqueue(envelope(queue_id), [MESSAGE])
        events: list[tuple[str, float, float]] = []  # (what, start, end)
        lock = threading.Lock()
        real_rename = os.rename

        def rename(a, b):
            real_rename(a, b)
            with lock:
                events.append((f"rename {Path(a).name}", time.monotonic(), time.monotonic()))

        def slow_fsync(path: Path) -> None:
            start = time.monotonic()
            time.sleep(0.05)  # a busy disk: the others pile up meanwhile
            with lock:
                events.append(("fsync", start, time.monotonic()))

        returned: dict[str, float] = {}

        def remove(queue_id: str) -> None:
            self.assertTrue(self.queue.remove(queue_id))
            returned[queue_id] = time.monotonic()

        with mock.patch("os.rename", rename), \
                mock.patch("mailx.storage.queue.fsync_directory", slow_fsync):
            threads = [threading.Thread(target=remove, args=(i,)) for i in ids]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        self.assertEqual(sorted(returned), ids)
        self.assertEqual(os.listdir(self.root), [".tmp"])
        fsyncs = [(start, end) for what, start, end in events if what == "fsync"]
        self.assertLess(len(fsyncs), len(ids))
        for queue_id in ids:
            [renamed] = [end for what, _, end in events if what == f"rename {queue_id}"]
            # An fsync that began after this rename ended before remove returned.
            self.assertTrue(
                any(start >= renamed and end <= returned[queue_id] for start, end in fsyncs),
                f"{queue_id} returned before its rename was durable",
            )

    def test_remove_clears_leftovers_too(self) -> None:
        self.queue.enqueue(envelope(), [MESSAGE])
        (self.root / "65F00000000001" / "envelope.json.new").write_bytes(b"{")
        self.assertTrue(self.queue.remove("65F00000000001"))
        self.assertEqual(os.listdir(self.root), [".tmp"])

    def test_same_id_twice_is_refused(self) -> None:
        self.queue.enqueue(envelope(), [MESSAGE])
        self.assertRaises(FileExistsError, self.queue.enqueue, envelope(), [b"other"])
        self.assertEqual(self.queue.data_path("65F00000000001").read_bytes(), MESSAGE)

    def test_failed_write_leaves_nothing(self) -> None:
        def parts():
            yield MESSAGE
            raise OSError(28, "No space left on device")

        self.assertRaises(OSError, self.queue.enqueue, envelope(), parts())
        self.assertEqual(self.queue.ids(), [])
        self.assertEqual(os.listdir(self.root / ".tmp"), [])

    def test_save_replaces_the_envelope(self) -> None:
        env = envelope()
        self.queue.enqueue(env, [MESSAGE])
        env.recipients[0].state = DELIVERED
        env.recipients[1].attempts = 3
        self.queue.save(env.id, env.to_json())
        loaded = self.queue.load(env.id)
        self.assertEqual(loaded.recipients[0].state, DELIVERED)
        self.assertEqual(loaded.recipients[1].attempts, 3)
        self.assertEqual(sorted(os.listdir(self.root / env.id)), ["envelope.json", "message"])

    def test_save_after_remove_raises_file_not_found(self) -> None:
        env = envelope()
        self.queue.enqueue(env, [MESSAGE])
        self.assertTrue(self.queue.remove(env.id))
        self.assertRaises(FileNotFoundError, self.queue.save, env.id, env.to_json())

    def test_remove(self) -> None:
        self.queue.enqueue(envelope(), [MESSAGE])
        self.assertTrue(self.queue.remove("65F00000000001"))
        self.assertFalse(self.queue.remove("65F00000000001"))
        self.assertEqual(os.listdir(self.root), [".tmp"])

    def test_remove_many_renames_all_then_fsyncs_the_directory_once(self) -> None:
        ids = [f"65F0000000020{n}" for n in range(3)]
        for queue_id in ids:
            self.queue.enqueue(envelope(queue_id), [MESSAGE])
        events: list[str] = []
        real_rename = os.rename

        def rename(a, b):
            real_rename(a, b)
            events.append(f"rename {Path(a).name}")

        with mock.patch("os.rename", rename), mock.patch(
            "mailx.storage.queue.fsync_directory", lambda path: events.append(f"fsync {path}")
        ):
            results = self.queue.remove_many([*ids, "65F00000000299"])
        self.assertEqual(results, [True, True, True, False])
        self.assertEqual(events, [*(f"rename {i}" for i in ids), f"fsync {self.root}"])
        self.assertEqual(os.listdir(self.root), [".tmp"])

    def test_remove_many_reports_a_failed_fsync_for_every_renamed_entry(self) -> None:
        self.queue.enqueue(envelope(), [MESSAGE])

        def failing(path: Path) -> None:
            raise OSError(5, "Input/output error")

        with mock.patch("mailx.storage.queue.fsync_directory", failing):
            [result, missing] = self.queue.remove_many(["65F00000000001", "65F00000000002"])
        self.assertIsInstance(result, OSError)
        self.assertIs(missing, False)

    def test_prepare_clears_what_a_crash_left(self) -> None:
        (self.root / ".tmp" / "65F00000000009").mkdir()
        (self.root / ".tmp" / "65F00000000009" / "message").write_bytes(b"half")
        (self.root / ".removed-65F00000000008").mkdir()
        self.queue.enqueue(envelope(), [MESSAGE])
        self.assertEqual(self.queue.prepare(), 1)
        self.assertEqual(sorted(os.listdir(self.root)), [".tmp", "65F00000000001"])
        self.assertEqual(os.listdir(self.root / ".tmp"), [])

    def test_scan_returns_entries_oldest_first_and_skips_corrupt_ones(self) -> None:
        self.queue.enqueue(envelope("65F00000000002"), [MESSAGE])
        self.queue.enqueue(envelope("65F00000000001"), [MESSAGE])
        broken = self.root / "65F00000000003"
        broken.mkdir()
        (broken / "envelope.json").write_text("{not json")
        (broken / "message").write_bytes(MESSAGE)
        found = self.queue.scan()
        self.assertEqual([e.id for e in found], ["65F00000000001", "65F00000000002"])
        self.assertTrue(broken.exists())  # never deleted: a person should look at it
        self.flushLoggedErrors()

    def test_load_refuses_foreign_envelopes(self) -> None:
        env = envelope()
        self.queue.enqueue(env, [MESSAGE])
        data = env.to_json().replace(b'"version": 1', b'"version": 99')
        (self.root / env.id / "envelope.json").write_bytes(data)
        self.assertRaises(QueueError, self.queue.load, env.id)

    def test_load_of_missing_entry(self) -> None:
        self.assertRaises(QueueError, self.queue.load, "65F00000000001")

    def test_ids_cannot_name_paths(self) -> None:
        for bad in ("../etc", "a/b", "", ".tmp", "x" * 41):
            with self.subTest(bad=bad):
                self.assertFalse(valid_id(bad))
                self.assertRaises(QueueError, self.queue.path, bad)
        self.assertTrue(valid_id("65F00000000001B"))

    def test_read_header(self) -> None:
        self.queue.enqueue(envelope(), [MESSAGE])
        self.assertEqual(
            self.queue.read_header("65F00000000001"), b"From: a@sender.test\r\nSubject: hi\r\n"
        )

    def test_flush_request_is_taken_once(self) -> None:
        self.assertFalse(self.queue.take_flush_request())
        self.queue.request_flush()
        self.assertTrue(self.queue.take_flush_request())
        self.assertFalse(self.queue.take_flush_request())

    def test_summary(self) -> None:
        env = envelope()
        env.recipients[0].next_attempt = 1500.0
        env.recipients[1].state = DELIVERED
        summary = envelope_summary(env, now=1600.0)
        self.assertEqual(summary["age"], 600.0)
        self.assertEqual(summary["next_attempt"], 1500.0)
        self.assertEqual([r["state"] for r in summary["recipients"]], ["pending", "delivered"])
        self.assertEqual((summary["spf"], summary["dmarc"]), (None, None))


CLI_CONFIG = """
hostname: mx.example.test
paths: {mail: mail, spool: spool}
domains:
  example.test:
    mailboxes: [alice]
    aliases: {postmaster: alice, boss: someone@outside.test}
outbound: {srs_secret: SRS_SECRET}
""".replace("SRS_SECRET", SRS_SECRET)


class QueueCommandTests(CLITestCase):
    """``mailxctl queue``: it reads and changes the queue directory itself."""

    def setUp(self) -> None:
        super().setUp()
        self.config = self.write(CLI_CONFIG)
        self.queue = Queue(self.directory / "spool" / "queue")
        self.queue.prepare()

    def add(self, queue_id: str = "65F00000000001") -> Envelope:
        env = envelope(queue_id)
        env.recipients[0].attempts = 2
        env.recipients[0].last_reply = "451 4.7.1 Greylisted"
        env.recipients[0].last_host = "mx.outside.test[192.0.2.1]:25"
        env.recipients[0].next_attempt = time.time() + 300
        env.recipients[1].state = DELIVERED
        self.queue.enqueue(env, [MESSAGE])
        return env

    def test_list_empty(self) -> None:
        status, out, _ = self.run_cli("-c", self.config, "queue")
        self.assertEqual((status, out.strip()), (0, "the queue is empty"))

    def test_list(self) -> None:
        self.add()
        status, out, _ = self.run_cli("-c", self.config, "queue", "list")
        self.assertEqual(status, 0)
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("65F00000000001 "))
        self.assertIn("a@sender.test", lines[0])
        self.assertIn("x@outside.test  pending  attempts=2  next in 4m", lines[1])
        self.assertIn("(451 4.7.1 Greylisted)  via mx.outside.test[192.0.2.1]:25", lines[1])
        self.assertIn("y@outside.test  delivered", lines[2])
        self.assertEqual(lines[-1], "-- 1 message(s), 1 recipient(s) pending")

    def test_list_json(self) -> None:
        self.add()
        status, data = self.json_of("-c", self.config, "queue", "list")
        self.assertEqual(status, 0)
        [entry] = data["messages"]
        self.assertEqual(entry["id"], "65F00000000001")
        self.assertEqual(entry["sender"], "a@sender.test")
        self.assertEqual(
            [(r["address"], r["state"]) for r in entry["recipients"]],
            [("x@outside.test", "pending"), ("y@outside.test", "delivered")],
        )
        self.assertEqual(data["pending"], 1)

    def test_show(self) -> None:
        self.add()
        status, out, _ = self.run_cli("-c", self.config, "queue", "show", "65F00000000001")
        self.assertEqual(status, 0)
        self.assertIn(
            "x@outside.test: forwarded from <boss@example.test> (the address it was sent to),"
            " envelope sender <SRS0=x@example.test>",
            out,
        )
        self.assertIn("Subject: hi", out)
        status, data = self.json_of("-c", self.config, "queue", "show", "65F00000000001")
        self.assertIn("Subject: hi", data["header"])
        self.assertEqual(data["recipients"][0]["mail_from"], "SRS0=x@example.test")

    def test_show_unknown(self) -> None:
        status, _, _ = self.run_cli("-c", self.config, "queue", "show", "65F00000000009")
        self.assertEqual(status, 1)

    def test_show_needs_an_id(self) -> None:
        status, _, err = self.run_cli("-c", self.config, "queue", "show")
        self.assertEqual(status, 2)
        self.assertIn("needs a queue ID", err)
        status, _, _ = self.run_cli("-c", self.config, "queue", "show", "../../etc")
        self.assertEqual(status, 2)

    def test_remove(self) -> None:
        self.add()
        status, out, _ = self.run_cli("-c", self.config, "queue", "remove", "65F00000000001")
        self.assertEqual((status, out.strip()), (0, "removed 65F00000000001"))
        self.assertEqual(self.queue.ids(), [])
        status, _, _ = self.run_cli("-c", self.config, "queue", "remove", "65F00000000001")
        self.assertEqual(status, 1)

    def test_flush_leaves_a_request_for_the_server(self) -> None:
        status, out, _ = self.run_cli("-c", self.config, "queue", "flush")
        self.assertEqual(status, 0)
        self.assertIn("not running", out)
        self.assertTrue(self.queue.take_flush_request())


class EnvelopeFieldsTests(unittest.SynchronousTestCase):
    def test_to_fields_is_asdict_with_the_version_first(self) -> None:
        """to_fields is written by hand for speed; it must stay dataclasses.asdict,
        every field in order, whatever fields the dataclasses gain."""
        from dataclasses import asdict

        from mailx.storage.queue import FORMAT_VERSION, Envelope, Recipient

        envelope = Envelope(
            "Q1", "a@example.test", 1.5, size=3, eight_bit=True, spf="pass",
            recipients=[
                Recipient("x@example.net", "x@example.test", "srs@example.test", attempts=2),
                Recipient("y@example.org", "y@example.test", "", transport="lmtp:unix:/l"),
            ],
        )
        fields = envelope.to_fields()
        expected = {"version": FORMAT_VERSION, **asdict(envelope)}
        self.assertEqual(fields, expected)
        self.assertEqual(list(fields), list(expected))
        self.assertEqual([list(r) for r in fields["recipients"]],
                         [list(r) for r in expected["recipients"]])
        fields["recipients"][0]["attempts"] = 9
        self.assertEqual(envelope.recipients[0].attempts, 2)  # a copy, as asdict's
