// A screenshot of LibreTranslate's web page translating one sentence, in headless Chromium
// (playwright-core, Debian's /usr/bin/chromium; no browser download).
// usage: node screenshot.mjs URL OUT.png   (URL with ?source=..&target=..&q=..)
import { chromium } from "playwright-core";

const [url, out] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // no network beyond the local server: Chromium's own background connections are refused here
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 620 } });
await page.goto(url, { waitUntil: "domcontentloaded" });
// the page translates what its URL holds; wait until the translation is there
await page.waitForFunction(() => document.body.innerText.includes("translatedText"), null, { timeout: 60000 });
await page.screenshot({ path: out });
await browser.close();
