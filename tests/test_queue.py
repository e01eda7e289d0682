# -*- test-case-name: tests.test_queue -*-
"""The queue on disk: whole entries or none, atomic state changes, fsynced before 250."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailx.storage.queue import (
    DELIVERED,
    PENDING,
    Envelope,
    Queue,
    QueueError,
    Recipient,
    envelope_summary,
    open_data,
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
        first, data = path.read_bytes().split(b"\n", 1)
        self.assertEqual(data, MESSAGE)
        self.assertEqual(json.loads(first)["size"], len(MESSAGE))
        with open_data(path) as f:
            self.assertEqual(f.read(), MESSAGE)
        loaded = self.queue.load("65F00000000001")
        self.assertEqual(loaded.size, len(MESSAGE))
        self.assertEqual(
            [r.address for r in loaded.recipients], ["x@outside.test", "y@outside.test"]
        )
        self.assertEqual(loaded.recipients[0].state, PENDING)
        self.assertEqual(os.listdir(self.root / ".tmp"), [])
        self.assertEqual(sorted(os.listdir(self.root)), [".tmp", "65F00000000001"])

    def test_files_are_private(self) -> None:
        env = envelope()
        path = self.queue.enqueue(env, [MESSAGE])
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        self.queue.save(env.id, env.to_json())
        self.assertEqual(
            (self.root / (env.id + ".envelope")).stat().st_mode & 0o777, 0o600
        )

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
        # One file, then the directory it was linked into.
        self.assertEqual(synced, [staging, str(self.root)])

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
        self.assertEqual(len(synced), 1)  # the entry's one file

    def test_concurrent_removals_share_fsyncs_and_each_waits_for_one(self) -> None:
        ids = [f"65F0000000010{n}" for n in range(8)]
        for queue_id in ids:
            self.queue.enqueue(envelope(queue_id), [MESSAGE])
        events: list[tuple[str, float, float]] = []  # (what, start, end)
        lock = threading.Lock()
        real_unlink = os.unlink

        def unlink(path):
            real_unlink(path)
            with lock:
                events.append((f"unlink {Path(path).name}", time.monotonic(), time.monotonic()))

        def slow_fsync(path: Path) -> None:
            start = time.monotonic()
            time.sleep(0.05)  # a busy disk: the others pile up meanwhile
            with lock:
                events.append(("fsync", start, time.monotonic()))

        returned: dict[str, float] = {}

        def remove(queue_id: str) -> None:
            self.assertTrue(self.queue.remove(queue_id))
            returned[queue_id] = time.monotonic()

        with mock.patch("os.unlink", unlink), \
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
            [unlinked] = [end for what, _, end in events if what == f"unlink {queue_id}"]
            # An fsync that began after this unlink ended before remove returned.
            self.assertTrue(
                any(start >= unlinked and end <= returned[queue_id] for start, end in fsyncs),
                f"{queue_id} returned before its unlink was durable",
            )

    def test_remove_takes_the_changed_envelope_too(self) -> None:
        env = envelope()
        self.queue.enqueue(env, [MESSAGE])
        self.queue.save(env.id, env.to_json())
        self.assertTrue(self.queue.remove(env.id))
        self.assertEqual(os.listdir(self.root), [".tmp"])

    def test_same_id_twice_is_refused(self) -> None:
        self.queue.enqueue(envelope(), [MESSAGE])
        self.assertRaises(FileExistsError, self.queue.enqueue, envelope(), [b"other"])
        with open_data(self.queue.data_path("65F00000000001")) as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(os.listdir(self.root / ".tmp"), [])

    def test_the_link_refuses_an_entry_that_appeared_meanwhile(self) -> None:
        # Another writer of the same ID between the check and the link: refused, not replaced.
        real_lexists = os.path.lexists
        first = envelope()
        self.queue.enqueue(first, [MESSAGE])
        with mock.patch("os.path.lexists", lambda p: False if str(p).endswith("01") else real_lexists(p)):
            self.assertRaises(FileExistsError, self.queue.enqueue, envelope(), [b"other"])
        with open_data(self.queue.data_path(first.id)) as f:
            self.assertEqual(f.read(), MESSAGE)

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
        self.assertEqual(sorted(os.listdir(self.root)), [".tmp", env.id, env.id + ".envelope"])
        self.assertEqual(os.listdir(self.root / ".tmp"), [])
        with open_data(self.root / env.id) as f:  # the data is never rewritten
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual(self.queue.read_header(env.id), b"From: a@sender.test\r\nSubject: hi\r\n")

    def test_a_save_that_races_a_removal_leaves_nothing(self) -> None:
        env = envelope()
        self.queue.enqueue(env, [MESSAGE])
        real_rename = os.rename

        def rename(a, b):
            real_rename(a, b)
            self.queue.remove(env.id)  # mailxctl queue remove, just then

        with mock.patch("os.rename", rename):
            self.assertRaises(FileNotFoundError, self.queue.save, env.id, env.to_json())
        self.assertEqual(os.listdir(self.root), [".tmp"])

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

    def test_remove_many_unlinks_all_then_fsyncs_the_directory_once(self) -> None:
        ids = [f"65F0000000020{n}" for n in range(3)]
        for queue_id in ids:
            self.queue.enqueue(envelope(queue_id), [MESSAGE])
        events: list[str] = []
        real_unlink = os.unlink

        def unlink(path):
            real_unlink(path)
            events.append(f"unlink {Path(path).name}")

        with mock.patch("os.unlink", unlink), mock.patch(
            "mailx.storage.queue.fsync_directory", lambda path: events.append(f"fsync {path}")
        ):
            results = self.queue.remove_many([*ids, "65F00000000299"])
        self.assertEqual(results, [True, True, True, False])
        self.assertEqual(events, [*(f"unlink {i}" for i in ids), f"fsync {self.root}"])
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
        (self.root / ".tmp" / "65F00000000009").write_bytes(b"half")
        (self.root / ".tmp" / "65F00000000007.envelope").write_bytes(b"{")
        (self.root / ".tmp" / "65F00000000006").mkdir()  # the old layout's half-made entry
        (self.root / ".removed-65F00000000008").mkdir()  # the old layout's half-done removal
        # An entry removed, then the crash before its changed envelope went.
        (self.root / "65F00000000005.envelope").write_bytes(b"{}\n")
        env = envelope()
        self.queue.enqueue(env, [MESSAGE])
        self.queue.save(env.id, env.to_json())
        self.assertEqual(self.queue.prepare(), 3)
        self.assertEqual(
            sorted(os.listdir(self.root)), [".tmp", "65F00000000001", "65F00000000001.envelope"]
        )
        self.assertEqual(os.listdir(self.root / ".tmp"), [])
        self.assertEqual(self.queue.load(env.id), env)

    def test_scan_returns_entries_oldest_first_and_skips_corrupt_ones(self) -> None:
        self.queue.enqueue(envelope("65F00000000002"), [MESSAGE])
        self.queue.enqueue(envelope("65F00000000001"), [MESSAGE])
        broken = self.root / "65F00000000003"
        broken.write_bytes(b"{not json\n" + MESSAGE)
        (self.root / "65F00000000004").write_bytes(b'{"no line end"')
        found = self.queue.scan()
        self.assertEqual([e.id for e in found], ["65F00000000001", "65F00000000002"])
        self.assertTrue(broken.exists())  # never deleted: a person should look at it
        self.flushLoggedErrors()

    def test_load_refuses_foreign_envelopes(self) -> None:
        env = envelope()
        self.queue.enqueue(env, [MESSAGE])
        data = env.to_json().replace(b'"version":1', b'"version":99')
        self.assertNotEqual(data, env.to_json())
        (self.root / (env.id + ".envelope")).write_bytes(data)
        self.assertRaises(QueueError, self.queue.load, env.id)
        other = envelope("65F00000000002")
        (self.root / (env.id + ".envelope")).write_bytes(other.to_json())
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


def old_layout_entry(root: Path, env: Envelope, data: bytes = MESSAGE) -> Path:
    """An entry as mailx wrote it before one file per entry: a directory of two files."""
    directory = root / env.id
    directory.mkdir()
    env.size = len(data)
    (directory / "message").write_bytes(data)
    (directory / "envelope.json").write_bytes(
        json.dumps(env.to_fields(), indent=1).encode() + b"\n"
    )
    return directory


class OldLayoutTests(unittest.TestCase):
    """Entries an older mailx left in the queue are delivered after the upgrade."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute() / "queue"
        self.root.mkdir(parents=True)
        self.queue = Queue(self.root)

    def test_start_up_converts_each_to_one_file(self) -> None:
        env = envelope()
        env.recipients[0].state = DELIVERED
        old_layout_entry(self.root, env)
        old_layout_entry(self.root, envelope("65F00000000002"), b"Subject: two\r\n\r\n2\r\n")
        self.queue.prepare()
        self.assertEqual(
            sorted(os.listdir(self.root)), [".tmp", "65F00000000001", "65F00000000002"]
        )
        self.assertTrue((self.root / env.id).is_file())
        self.assertEqual(self.queue.load(env.id), env)
        with open_data(self.queue.data_path(env.id)) as f:
            self.assertEqual(f.read(), MESSAGE)
        self.assertEqual([e.id for e in self.queue.scan()], [env.id, "65F00000000002"])

    def test_mailxctl_reads_them_before_the_server_restarts(self) -> None:
        env = envelope()
        old_layout_entry(self.root, env)
        self.assertEqual(self.queue.ids(), [env.id])
        self.assertEqual(self.queue.load(env.id), env)
        self.assertEqual(self.queue.read_header(env.id), b"From: a@sender.test\r\nSubject: hi\r\n")
        self.assertTrue(self.queue.remove(env.id))
        self.assertEqual(os.listdir(self.root), [])

    def test_a_conversion_cut_short_is_finished_at_the_next_start(self) -> None:
        # Killed after the old directory was renamed aside, before the new file took its name.
        env = envelope()
        old_layout_entry(self.root, env)
        (self.root / ".tmp").mkdir()
        (self.root / ".tmp" / env.id).write_bytes(b"half of the new file")
        os.rename(self.root / env.id, self.root / f".converting-{env.id}")
        # Killed after the new file took its name, before the old directory went.
        done = envelope("65F00000000002")
        old_layout_entry(self.root, done)
        os.rename(self.root / done.id, self.root / f".converting-{done.id}")
        (self.root / done.id).write_bytes(done.to_json() + MESSAGE)
        self.queue.prepare()
        self.assertEqual(sorted(os.listdir(self.root)), [".tmp", env.id, done.id])
        self.assertEqual(self.queue.load(env.id), env)
        self.assertEqual(self.queue.load(done.id), done)
        for queue_id in (env.id, done.id):
            with open_data(self.queue.data_path(queue_id)) as f:
                self.assertEqual(f.read(), MESSAGE)

    def test_an_unreadable_one_is_left_alone(self) -> None:
        broken = self.root / "65F00000000003"
        broken.mkdir()
        (broken / "envelope.json").write_text("{not json")
        (broken / "message").write_bytes(MESSAGE)
        self.queue.prepare()
        self.assertTrue((broken / "message").exists())  # a person should look at it
        self.assertEqual(self.queue.scan(), [])
        self.flushLoggedErrors()


class EnvelopeLineTests(unittest.TestCase):
    """The envelope is the entry's first line whatever its fields hold."""

    @settings(max_examples=150, deadline=None)
    @given(
        text=st.lists(
            st.text(st.characters(blacklist_categories=("Cs",)))
            | st.sampled_from(["\n", "\r\n", "\u2028", "\udcff", "\udc80"])
        ).map("".join),
        data=st.binary(),
    )
    def test_any_field_round_trips_and_the_data_follows_intact(self, text: str, data: bytes) -> None:
        root = Path(tempfile.mkdtemp(prefix="mailx-queue-"))
        self.addCleanup(shutil.rmtree, root, True)
        queue = Queue(root / "queue")
        queue.prepare()
        env = envelope(client=text)
        env.recipients[0].trace = f"Received: {text}\r\n"
        env.recipients[1].last_reply = text
        queue.enqueue(env, [data])
        self.assertEqual(queue.load(env.id), env)
        with open_data(queue.data_path(env.id)) as f:
            self.assertEqual(f.read(), data)
        env.recipients[0].state = DELIVERED
        queue.save(env.id, env.to_json())
        self.assertEqual(queue.load(env.id), env)
