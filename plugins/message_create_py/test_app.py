"""The handler against a scripted host (plugins/testhost): the same cases as
the Rust handler's tests (plugins/message_create/src/lib.rs).
Run: PYTHONPATH=plugins/testhost python3 -m unittest plugins/message_create_py/test_app.py"""

import json
import unittest

from otako_testhost import TestHost, load_app, rows

from componentize_py_types import Err
from wit_world.imports import types

app = load_app(__file__)


def seed_row(content):
    """The seed message (`{"id":"3","channel_id":"1"}`) as the lookup returns it."""
    return rows(
        ["id", "channel_id", "author_id", "author_name", "content", "nonce", "created_at", "edited_at"],
        [3, 1, 2, "bob", content, None, "2026-11-28T00:00:00.000Z", None],
    )


def create(data):
    return app.WitWorld().handle(types.Event(name="EVENT_MESSAGE_CREATE", id="1", data=data))


class MessageCreate(unittest.TestCase):
    def assert_fails(self, data, code, message):
        with self.assertRaises(Err) as caught:
            create(data)
        self.assertEqual(caught.exception.value, types.HandlerError(code=code, message=message))

    def test_found_message_goes_to_its_channel_in_full(self):
        with TestHost().on_query(lambda sql, params: seed_row("hello")) as host:
            deliveries = create('{"id":"3","channel_id":"1"}')
        self.assertEqual(len(deliveries), 1)
        delivery = deliveries[0]
        self.assertEqual(delivery.event, "MESSAGE_CREATE")
        self.assertEqual(delivery.audience, types.Audience_Channel("1"))
        self.assertEqual(
            json.loads(delivery.payload),
            {
                "id": "3",
                "channel_id": "1",
                "author": {"id": "2", "name": "bob"},
                "content": "hello",
                "nonce": None,
                "timestamp": "2026-11-28T00:00:00.000Z",
            },
        )
        [(sql, params)] = host.queries
        self.assertIn("FROM messages m", sql)
        self.assertEqual(params, [types.Value_Integer(3), types.Value_Integer(1)])

    def test_missing_message_is_not_found(self):
        with TestHost().on_query(lambda sql, params: rows(["id"])):
            self.assert_fails('{"id":"3","channel_id":"1"}', "NOT_FOUND", "message 3 not found in channel 1")

    def test_database_failure_is_db_error(self):
        def down(sql, params):
            raise Err(types.DbError_Query("no such table: messages"))

        with TestHost().on_query(down):
            self.assert_fails('{"id":"3","channel_id":"1"}', "DB_ERROR", "query failed: no such table: messages")

    def test_bad_d_is_bad_event_without_a_query(self):
        with TestHost() as host:
            for data in ["not json", '{"id":"3"}', '{"id":"x","channel_id":"1"}']:
                with self.subTest(data=data), self.assertRaises(Err) as caught:
                    create(data)
                self.assertEqual(caught.exception.value.code, "BAD_EVENT")
                self.assertTrue(caught.exception.value.message.startswith("invalid `d` for EVENT_MESSAGE_CREATE: "))
        self.assertEqual(host.queries, [])

    def test_max_content_len_counts_characters(self):
        # Message 3 is five characters (but six bytes), message 4 six.
        def answer(sql, params):
            return seed_row("héllo" if params[0] == types.Value_Integer(3) else "hello!")

        with TestHost().config("max_content_len", "5").on_query(answer):
            self.assertEqual(len(create('{"id":"3","channel_id":"1"}')), 1)
            self.assert_fails(
                '{"id":"4","channel_id":"1"}',
                "BAD_EVENT",
                "content longer than max_content_len (6 > 5 characters)",
            )


if __name__ == "__main__":
    unittest.main()
