// The `dev` source loader for JavaScript handlers (world `dev-loader`,
// wit/dev.wit): built once by scripts/build-lang-plugins.sh, then each
// saved handler.js is evaluated here at load instead of rebuilding the
// whole SpiderMonkey image around it. Evaluating the text the build would
// snapshot gives the same handler; only where it starts differs.
import * as host from "otako:gateway/host@0.1.0";
import { files } from "otako:gateway/dev-source@0.1.0";

// The modules a handler may import: what componentize-js resolves too.
const MODULES = { "otako:gateway/host@0.1.0": host };

// `import { a, b as c } from "spec";` and `import * as ns from "spec";`.
const IMPORT = /^[ \t]*import\s+(\{[^}]*\}|\*\s*as\s+[A-Za-z_$][\w$]*)\s*from\s*(["'])([^"']+)\2[ \t]*;?/gm;
const OTHER_IMPORT = /^[ \t]*import(?:\s+[\w${*]|\s*[{*"'])/m;
// `export function|class|const|let|var NAME` and `export { a, b as c };`.
const EXPORT_DECL = /^([ \t]*)export\s+(?=(?:async\s+)?function\b|class\b|const\b|let\b|var\b)/gm;
const EXPORT_LIST = /^[ \t]*export\s*\{([^}]*)\}[ \t]*;?/gm;

const newlines = (text) => "\n".repeat(text.split("\n").length - 1);

// The module as the body of a function taking its imports, lines kept in
// place so stack traces point at the saved file's lines.
function asFunction(source) {
  const exported = {};
  let body = source.replace(IMPORT, (all, what, _quote, spec) => {
    if (!(spec in MODULES)) {
      throw `handler.js imports ${JSON.stringify(spec)}; the dev loader provides ${Object.keys(MODULES).join(", ")}`;
    }
    const module = `__modules[${JSON.stringify(spec)}]`;
    const binding = what.startsWith("*")
      ? what.replace(/^\*\s*as\s+/, "")
      : what.replace(/\s+as\s+/g, ": ");
    return `const ${binding} = ${module};${newlines(all)}`;
  });
  const other = body.match(OTHER_IMPORT);
  if (other) {
    throw `handler.js has an import the dev loader cannot evaluate (${other[0].trim()}...): only imports of ${Object.keys(MODULES).join(", ")} are supported`;
  }
  body = body.replace(EXPORT_LIST, (all, list) => {
    for (const item of list.split(",").map((s) => s.trim()).filter(Boolean)) {
      const [local, as] = item.split(/\s+as\s+/);
      exported[as ?? local] = local;
    }
    return newlines(all);
  });
  body = body.replace(EXPORT_DECL, (_all, indent) => indent);
  if (/^[ \t]*export\b/m.test(body)) {
    throw "handler.js has an export form the dev loader cannot evaluate (use `export function handle`)";
  }
  const handle = exported.handle ?? "handle";
  return `(function (__modules) {"use strict";${body}\n;return typeof ${handle} === "function" ? ${handle} : undefined;\n})\n//# sourceURL=handler.js`;
}

let handler;

export function load() {
  try {
    const source = files().find(([path]) => path === "handler.js");
    if (source === undefined) throw "no handler.js among the sources";
    const make = (0, eval)(asFunction(source[1]));
    const handle = make(MODULES);
    if (handle === undefined) throw "handler.js exports no `handle` function";
    handler = handle;
  } catch (err) {
    // A string is the WIT error; an Error keeps its stack for the log.
    throw typeof err === "string" ? err : err?.stack ? `${err}\n${err.stack}` : String(err);
  }
}

export function handle(event) {
  if (handler === undefined) {
    throw new Error("the dev loader's handle ran before load");
  }
  return handler(event);
}
