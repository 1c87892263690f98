// Loads a page in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core) and waits until the page's `window.stats.events` reaches WANT.
// Prints `window.stats` as JSON. Usage: node browser_es.mjs URL WANT TIMEOUT_MS
import { chromium } from 'playwright-core';

const [url, want, timeoutMs] = [process.argv[2], +process.argv[3], +process.argv[4]];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage();
  await page.goto(url);
  const deadline = Date.now() + timeoutMs;
  let stats = {};
  while (Date.now() < deadline) {
    stats = await page.evaluate(() => window.stats);
    if (stats.events >= want) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  console.log(JSON.stringify(stats));
} finally {
  await browser.close();
}
