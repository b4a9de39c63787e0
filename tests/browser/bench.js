// Post → rendered on another page: alice's POST through the reference API
// until the message is in bob's DOM (a MutationObserver stamps it), over
// 100 messages posted one after another, in headless Chromium.
// Usage (after scripts/browser-test.sh has installed things, with a
// release build for figures worth quoting):
//   OTAKO_BIN=target/release/otako-gateway node tests/browser/bench.js
import { api, startDev } from "../../clients/js/test/gateway.js";
import { launch } from "./browser.js";

const N = Number(process.env.N ?? 100);
const dev = await startDev({ maxPerUser: 10 });
const browser = await launch();
try {
  const page = await (await browser.newContext()).newPage();
  await page.goto(`http://${dev.api}/?token=${dev.bob}`);
  await page.waitForSelector('#state[data-state="connected"]');
  await page.evaluate(() => {
    window.seen = {};
    new MutationObserver((records) => {
      const now = Date.now();
      for (const r of records)
        for (const node of r.addedNodes) {
          const text = node.querySelector?.(".content")?.textContent;
          if (text && !(text in window.seen)) window.seen[text] = now;
        }
    }).observe(document.querySelector("#messages"), { childList: true });
  });
  const took = [];
  for (let i = 0; i < N; i++) {
    const content = `bench ${Date.now()} ${i}`;
    const sent = Date.now();
    await api(dev, "POST", "/channels/1/messages", dev.alice, { content, nonce: content });
    const at = await page.waitForFunction((c) => window.seen[c], content, { polling: "raf" });
    took.push((await at.jsonValue()) - sent);
  }
  took.sort((a, b) => a - b);
  const pct = (p) => took[Math.min(took.length - 1, Math.floor((p / 100) * took.length))];
  console.log(`post -> rendered on another page, ${N} messages: p50 ${pct(50)} ms, p90 ${pct(90)} ms, p99 ${pct(99)} ms, max ${took.at(-1)} ms`);
} finally {
  await browser.close();
  await dev.stop();
}
