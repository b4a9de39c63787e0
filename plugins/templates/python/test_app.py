"""{{name}}'s handler against a scripted host (plugins/testhost), under CPython:
cd plugins/{{name}} && PYTHONPATH=../testhost python3 -m unittest
(plugins/README.md, "Testing a handler without a gateway")."""

import unittest

from otako_testhost import TestHost, load_app

from componentize_py_types import Err
from wit_world.imports import types

app = load_app(__file__)


def handle(data):
    return app.WitWorld().handle(types.Event(name="{{event}}", id="1", data=data))


class Handler(unittest.TestCase):
    def test_delivers_d_to_the_channel(self):
        # Script what the handler asks the host: `.on_query(lambda sql, params:
        # rows(["name"], ["alice"]))`, `.config(k, v)`, `.online(ids)`; then
        # assert on `host.queries` and `host.logs`.
        with TestHost() as host:
            data = '{"channel_id":"1","user_id":"10"}'
            deliveries = handle(data)
        self.assertEqual(
            deliveries,
            [types.Delivery(event="{{delivers}}", payload=data, audience=types.Audience_Channel("1"))],
        )
        self.assertEqual(host.queries, [])

    def test_bad_d_is_bad_event(self):
        with TestHost(), self.assertRaises(Err) as caught:
            handle("{}")
        self.assertEqual(caught.exception.value.code, "BAD_EVENT")


if __name__ == "__main__":
    unittest.main()
