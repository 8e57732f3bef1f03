// Opens a study in OHIF (headless Chromium through playwright-core), loads its SR series into the
// viewport, takes a screenshot and prints what happened as JSON: the page's errors, whether the
// SR display set loaded, and the measurement texts the viewer shows.
// Usage: node open_sr.mjs VIEWER_URL STUDY_UID SCREENSHOT.png
// OPEN_MODALITY (environment, default SR; e.g. SEG) names the series thumbnail opened instead of
// the SR's ("SR opened" in the steps then means that series was opened).
import { chromium } from 'playwright-core';

const [base, study, shot, expected] = process.argv.slice(2);
// Mean brightness (0..255) of the viewport's on-screen canvas (cornerstone draws each rendered
// frame into a 2D canvas), sampled on a grid; -1 while there is no canvas.
const brightness = () => {
  const canvas = document.querySelector('[data-cy="viewport-pane"] canvas');
  if (!canvas || !canvas.width) return -1;
  const ctx = canvas.getContext('2d');
  if (!ctx) return -1;
  const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
  let sum = 0, n = 0;
  for (let i = 0; i < data.length; i += 4 * 97) { sum += data[i]; n += 1; }
  return n ? sum / n : -1;
};

const errors = [];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--use-gl=swiftshader', '--enable-unsafe-swiftshader'],
});
const result = { errors, steps: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });
  // the pixel data requests (frames, bulk data), as diagnostics when the image is not shown
  const t0 = Date.now();
  result.frames = [];
  const pixels = (r) => /\/frames\/|bulkdata|\/rendered/i.test(r.url());
  page.on('request', (r) => { if (pixels(r)) result.frames.push(`${Date.now() - t0} ms sent ${r.url().slice(-60)}`); });
  page.on('requestfinished', async (r) => {
    if (!pixels(r)) return;
    const resp = await r.response();
    result.frames.push(`${Date.now() - t0} ms done ${resp ? resp.status() : '?'} ${r.url().slice(-60)}`);
  });
  page.on('requestfailed', (r) => { if (pixels(r)) result.frames.push(`${Date.now() - t0} ms FAILED ${r.failure()?.errorText} ${r.url().slice(-60)}`); });
  await page.goto(`${base}/viewer?StudyInstanceUIDs=${study}`, { waitUntil: 'networkidle', timeout: 90000 });
  result.steps.push('opened');
  await page.waitForTimeout(3000);
  // the first-visit tour covers the page: skip it when it shows
  const skip = page.getByText('Skip all', { exact: true });
  try {
    await skip.first().waitFor({ timeout: 15000 });
    await skip.first().click();
    result.steps.push('tour skipped');
  } catch (e) { result.steps.push('no tour'); }
  // the hanging protocol first shows the study's image in the viewport: wait until it is on screen
  // before opening the SR. Opened earlier on a loaded machine, OHIF can set the SR's viewport up
  // before its canvas has a size: the image is never drawn and the annotations collapse to a point.
  const shown = `(${brightness.toString()})() > 20`;
  try {
    await page.waitForFunction(shown, null, { timeout: 90000, polling: 500 });
    result.steps.push('image shown');
  } catch (e) { result.steps.push('image not shown before opening the series'); }
  const sr = page.getByText(new RegExp(`^${process.env.OPEN_MODALITY || 'SR'}$`)).first();
  await sr.waitFor({ timeout: 30000 });
  await sr.dblclick();
  result.steps.push('SR opened');
  result.srOpenedAt = Date.now() - t0;
  await page.waitForLoadState('networkidle');
  // wait until the image is on screen (decoding and rendering a 2k x 2k frame in software GL takes
  // a while on a loaded machine), then a little longer for the annotations
  try {
    await page.waitForFunction(shown, null, { timeout: 90000, polling: 500 });
  } catch (e) { result.steps.push('image never shown'); }
  await page.waitForTimeout(3000);
  await page.screenshot({ path: shot.replace(/\.png$/, '-sr.png') });
  const track = page.getByRole('button', { name: 'Yes' });
  if (await track.count()) {
    await track.first().click();  // track the SR's measurements: the panel lists them by name
    result.steps.push('tracking');
    await page.waitForTimeout(3000);
  }
  const panel = page.locator('[data-cy="trackedMeasurements-btn"]');
  if (await panel.count()) {
    await panel.first().click();  // the measurements panel: each hydrated measurement by label
    result.steps.push('measurements panel');
    await page.waitForTimeout(2000);
  }
  // the annotations cornerstone draws from the SR are SVG over the image canvas
  const shapes = page.locator('[data-cy="viewport-pane"] svg :is(path, polyline, polygon)');
  result.svgShapes = await shapes.count();
  result.svgPoints = await shapes.evaluateAll((els) => els.map((e) => e.getAttribute('points') || e.getAttribute('d') || ''));
  result.svgTexts = await page.locator('[data-cy="viewport-pane"] svg text').allInnerTexts();
  result.brightness = await page.evaluate(brightness);
  result.body = (await page.locator('body').innerText()).slice(0, 6000);
  await page.screenshot({ path: shot });
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
