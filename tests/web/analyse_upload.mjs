// Uploads a photograph on the "Analyse a file" page in headless Chromium (playwright-core from
// tests/ohif/node_modules), as a person does: sign in with the token, choose the file and its kind,
// press Analyse, watch the progress page, wait for the result page; screenshots the result (screen
// and print media) and prints what happened as JSON (steps seen live, result text, page errors).
// Usage: node analyse_upload.mjs BASE_URL TOKEN PICTURE KIND RESULT.png REPORT.png
import { chromium } from '../ohif/node_modules/playwright-core/index.mjs';

const [base, token, picture, kind, shot, report] = process.argv.slice(2);
const errors = [];
const result = { errors, urls: [], events: [] };
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) errors.push(`console: ${m.text()}`); });
  // every failed request but the browser's own favicon look-up
  page.on('response', async (r) => {
    const path = new URL(r.url()).pathname;
    if (r.status() >= 400 && path !== '/favicon.ico') errors.push(`HTTP ${r.status()} ${path}`);
  });
  // the events the page's scripts receive from the progress stream (kept across navigations)
  await page.exposeFunction('seenEvent', (type, data) => { result.events.push({ type, data: JSON.parse(data) }); });
  await page.addInitScript(() => {
    const Source = window.EventSource;
    window.EventSource = class extends Source {
      addEventListener(type, listener, options) {
        return super.addEventListener(type, (ev) => { window.seenEvent(type, ev.data); listener(ev); }, options);
      }
    };
  });
  page.on('framenavigated', (f) => { if (f === page.mainFrame()) result.urls.push(new URL(f.url()).pathname); });
  await page.goto(`${base}/analyse`);
  await page.fill('input[name="token"]', token);  // redirected to the sign-in form first
  await Promise.all([page.waitForURL(`${base}/analyse`), page.click('button:has-text("Sign in")')]);
  await page.setInputFiles('#file', picture);
  await page.check(`input[name="kind"][value="${kind}"]`);
  await Promise.all([page.waitForURL(/\/analyse\/[A-Za-z0-9_-]+$/), page.click('#analyse')]);
  // the progress page fills its list from the event stream, then opens the result
  await page.waitForSelector('#report', { timeout: 60000 });
  await page.waitForFunction(() => [...document.images].every((i) => i.complete && i.naturalWidth > 0), null, { timeout: 20000 });
  result.report = await page.locator('#report').innerText();
  result.images = await page.evaluate(() => [...document.images].map((i) => `${i.alt} ${i.naturalWidth}x${i.naturalHeight}`));
  result.printButton = await page.locator('#print').count();
  await page.screenshot({ path: shot, fullPage: true });
  await page.emulateMedia({ media: 'print' });
  result.printHeaderShown = await page.locator('body > header').isVisible();
  await page.screenshot({ path: report, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
