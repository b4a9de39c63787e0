// The client library's size: minified (esbuild) and gzipped (level 9).
// Usage: node size.js  (from tests/browser, after npm ci)
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { transformSync } from "esbuild";

const source = readFileSync(new URL("../../clients/js/otako.js", import.meta.url), "utf8");
const min = transformSync(source, { minify: true, format: "esm", target: "es2020" }).code;
const kb = (n) => `${n} B (${(n / 1024).toFixed(2)} KiB)`;
console.log(`otako.js source:        ${kb(source.length)}, gzipped ${kb(gzipSync(source, { level: 9 }).length)}`);
console.log(`otako.js minified:      ${kb(min.length)}`);
console.log(`otako.js minified+gzip: ${kb(gzipSync(min, { level: 9 }).length)}`);
