// {{event}} → {{delivers}} to the members of `d.channel_id`, with `d` passed
// through. Built by scripts/build-lang-plugins.sh (componentize-js); the
// host interface is wit/gateway.wit (imports from "otako:gateway/host@0.1.0":
// query, online, log, config).

// Throwing an object with a `payload` returns the WIT `err(handler-error)`.
class HandlerError extends Error {
  constructor(code, message) {
    super(message);
    this.payload = { code, message };
  }
}

export function handle(event) {
  try {
    return handleEvent(event);
  } catch (err) {
    // Anything thrown is lowered as the WIT error record: a HandlerError's
    // payload is one. Anything else (a bug) traps; print its stack first,
    // since the host puts the plugin's stderr in the error log.
    if (!(err instanceof HandlerError)) console.error(err?.stack ? `${err}\n${err.stack}` : String(err));
    throw err;
  }
}

function handleEvent(event) {
  let d;
  try {
    d = JSON.parse(event.data);
  } catch (err) {
    throw new HandlerError("BAD_EVENT", `invalid \`d\` for ${event.name}: ${err.message}`);
  }
  const channel = d?.channel_id;
  if (typeof channel !== "string" || !/^[0-9]+$/.test(channel)) {
    throw new HandlerError("BAD_EVENT", `invalid \`d\` for ${event.name}: no channel_id`);
  }
  return [
    {
      event: "{{delivers}}",
      payload: JSON.stringify(d),
      audience: { tag: "channel", val: channel },
    },
  ];
}
