// Opens a study page whose job is running in headless Chromium (playwright-core from
// tests/ohif/node_modules), signed in with the token, and records what its Progress block shows
// from the study's event stream until the page reloads itself with every job finished. Prints OPEN
// once the page is shown, then the JSON of what it saw.
// Usage: node study_progress.mjs BASE_URL TOKEN STUDY_UID
import { chromium } from '../ohif/node_modules/playwright-core/index.mjs';

const [base, token, study] = process.argv.slice(2);
const errors = [];
const result = { errors, lines: [], loads: 0 };
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  page.on('response', (r) => {
    const path = new URL(r.url()).pathname;
    if (r.status() >= 400 && path !== '/favicon.ico') errors.push(`HTTP ${r.status()} ${path}`);
  });
  await page.exposeFunction('seenLine', (text) => { result.lines.push(text); });
  const target = `${base}/studies/${study}`;
  await page.goto(target);
  await page.fill('input[name="token"]', token);
  await Promise.all([page.waitForURL(target), page.click('button:has-text("Sign in")')]);
  result.shownAtFirst = await page.locator('#job-progress').isVisible();
  // every line the block adds, as it is added (the page reloads right after the last one)
  await page.evaluate(() => {
    const list = document.querySelector('#job-progress ol');
    for (const li of list.children) window.seenLine(li.textContent);  // those already shown
    new MutationObserver((changes) => {
      for (const c of changes) for (const n of c.addedNodes) window.seenLine(n.textContent);
    }).observe(list, { childList: true });
  });
  console.log('OPEN');  // the test changes the job's state from here on
  page.on('load', () => { result.loads += 1; });
  const deadline = Date.now() + 60000;
  while (Date.now() < deadline && result.loads === 0) await page.waitForTimeout(150);
  await page.waitForLoadState('load');
  result.shownAfterReload = await page.locator('#job-progress').isVisible();
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
