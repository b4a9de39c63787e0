"""A Python plugin that misbehaves on request, for the host's sandbox tests:
`d.do` is "loop" (never returns), "alloc" (grows without end) or "throw"
(an uncaught exception, with a traceback)."""

import json

import wit_world


def deeper(d):
    raise ValueError(f"misbehave_py was asked to throw ({d['do']})")


class WitWorld(wit_world.WitWorld):
    def handle(self, event):
        d = json.loads(event.data)
        if d["do"] == "loop":
            while True:
                pass
        if d["do"] == "alloc":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 16))
        if d["do"] == "throw":
            deeper(d)
        return []
