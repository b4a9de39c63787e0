// A JavaScript plugin that misbehaves on request, for the host's sandbox
// tests: `d.do` is "loop" (never returns), "alloc" (grows without end) or
// "throw" (an uncaught exception, with a stack).
export function handle(event) {
  try {
    return misbehave(event);
  } catch (err) {
    // componentize-js lowers anything thrown as the WIT error record; a
    // plain Error isn't one, so the call traps. Print its stack first: the
    // host puts the plugin's stderr in the error log.
    console.error(err.stack ? `${err}\n${err.stack}` : String(err));
    throw err;
  }
}

function misbehave(event) {
  const d = JSON.parse(event.data);
  switch (d.do) {
    case "loop":
      for (;;) {}
    case "alloc": {
      const hoard = [];
      for (;;) hoard.push(new Uint8Array(1 << 20).fill(1));
    }
    case "throw":
      return deeper(d);
    default:
      return [];
  }
}

function deeper(d) {
  throw new TypeError(`misbehave_js was asked to throw (${d.do})`);
}
