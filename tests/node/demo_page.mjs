// Drives the demo page (demo/index.html) in headless Chromium: waits for events in
// both columns, presses the drop button, waits until both columns are back and the
// gateway's panel shows a replay hit, takes a screenshot, and prints what the page
// counted (window.demo) as JSON. Usage: node demo_page.mjs URL SCREENSHOT TIMEOUT_MS
import { chromium } from 'playwright-core';

const [url, shot, timeoutMs] = [process.argv[2], process.argv[3], +process.argv[4]];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const read = (page) => page.evaluate(() => {
  const pick = (c) => ({ events: c.events, missing: c.missing, replayed: c.replayed, reconnects: c.reconnects });
  return { direct: pick(window.demo.direct), gateway: pick(window.demo.gateway), panel: window.demo.panel };
});
const until = async (page, cond) => {
  const deadline = Date.now() + timeoutMs;
  let s = await read(page);
  while (Date.now() < deadline && !cond(s)) {
    await new Promise((r) => setTimeout(r, 100));
    s = await read(page);
  }
  return s;
};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url);
  const before = await until(page, (s) => s.direct.events >= 5 && s.gateway.events >= 5);
  await page.click('#drop');
  const after = await until(page, (s) => s.direct.reconnects >= 1 && s.gateway.reconnects >= 1
    && s.direct.events >= before.direct.events + 5 && s.gateway.events >= before.gateway.events + 5
    && s.panel.hits >= 1);
  await page.screenshot({ path: shot });
  console.log(JSON.stringify({ before, after }));
} finally {
  await browser.close();
}
