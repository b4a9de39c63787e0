// Module hooks for unit-testing a JavaScript handler under Node (registered
// by testhost.mjs): the component's host import resolves to testhost.mjs,
// and a plugin's handler.js loads as the ES module it is (plugins/ has no
// package.json to say so).
const HOST = "otako:gateway/host@0.1.0";

export async function resolve(specifier, context, nextResolve) {
  if (specifier === HOST) {
    return { url: new URL("./testhost.mjs", import.meta.url).href, shortCircuit: true };
  }
  return nextResolve(specifier, context);
}

export async function load(url, context, nextLoad) {
  if (url.startsWith("file:") && url.endsWith("/handler.js")) {
    return nextLoad(url, { ...context, format: "module" });
  }
  return nextLoad(url, context);
}
