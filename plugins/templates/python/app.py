"""{{event}} -> {{delivers}} to the members of `d.channel_id`, with `d`
passed through. Built by scripts/build-lang-plugins.sh (componentize-py);
the host interface is wit/gateway.wit (`wit_world.imports.host`: query,
online, log, config)."""

import json
import re

import wit_world
from componentize_py_types import Err
from wit_world.imports import types


def fail(code, message):
    """The WIT `err(handler-error)` the host turns into a failed ack."""
    return Err(types.HandlerError(code=code, message=message))


class WitWorld(wit_world.WitWorld):
    def handle(self, event):
        try:
            d = json.loads(event.data)
        except ValueError as err:
            raise fail("BAD_EVENT", f"invalid `d` for {event.name}: {err}")
        channel = d.get("channel_id") if isinstance(d, dict) else None
        if not isinstance(channel, str) or not re.fullmatch(r"[0-9]+", channel):
            raise fail("BAD_EVENT", f"invalid `d` for {event.name}: no channel_id")
        return [
            types.Delivery(
                event="{{delivers}}",
                payload=json.dumps(d, ensure_ascii=False, separators=(",", ":")),
                audience=types.Audience_Channel(channel),
            )
        ]
