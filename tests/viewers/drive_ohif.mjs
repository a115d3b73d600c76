// Drives OHIF 3.13 in Debian's chromium (puppeteer-core: no browser of its own) through a
// study of the node's results, for tests/viewers/test_ohif.py, which judges what this writes.
//
//   node drive_ohif.mjs '{"url": ..., "studyUid": ..., "artifacts": ..., "seg": ..., ...}'
//
// Each scenario opens the viewer afresh (/viewer?StudyInstanceUIDs=..., the longitudinal
// mode's route), so a tracked SR or a loaded SEG does not change the next one:
//   seg: double-click the SEG thumbnail, answer OHIF's "open this Segmentation?" prompt,
//        read the segmentation panel's rows and, per segment (a click on its row jumps to
//        it), count viewport pixels of its colour;
//   sr, detectionSr: double-click the SR thumbnail, answer the "continue tracking?" prompt
//        if OHIF asks (it asks only for an SR it can hydrate), read the texts drawn on the
//        image and the measurements panel's rows.
// Everything the page says (console, page errors, failed requests, HTTP errors, toasts)
// is kept per scenario in results.json, with a screenshot of each step beside it.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const plan = JSON.parse(process.argv[2]);
const out = plan.artifacts;
fs.mkdirSync(out, { recursive: true });
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// Data-cy names of OHIF 3.13's DOM (platform/ui-next, extensions/default and cornerstone).
const THUMBNAIL = '[data-cy="study-browser-thumbnail-no-image"]';
const VIEWPORT_CANVAS = '[data-cy="viewport-grid"] canvas.cornerstone-canvas';
const SEGMENTATION_TAB = '[data-cy="panelSegmentation-btn"]';
const MEASUREMENTS_TAB = '[data-cy="trackedMeasurements-btn"]';
const PROMPT_SEG = 'Do you want to open this Segmentation?';
const PROMPT_SR = 'Do you want to continue tracking measurements for this study?';

const results = { plan, scenarios: {}, timings: {} };
const started = Date.now();

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'dicom-ai-ohif-chromium-'));
const browser = await puppeteer.launch({
  executablePath: plan.chromium || '/usr/bin/chromium',
  headless: true,
  userDataDir: profile,
  // Nothing fetched from Google (no component updates, sync, QUIC probes); WebGL on
  // SwiftShader, as there is no GPU, opted in rather than left to a deprecated fallback.
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--no-default-browser-check',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
    '--enable-unsafe-swiftshader',
    '--password-store=basic',
    '--window-size=1600,1000',
  ],
  defaultViewport: { width: 1600, height: 1000 },
  protocolTimeout: 120000,
});

async function openViewer(name) {
  const log = { console: [], pageErrors: [], failedRequests: [], httpErrors: [], steps: [] };
  results.scenarios[name] = log;
  const page = await browser.newPage();
  page.on('console', message => {
    const where = message.location();
    log.console.push({ type: message.type(), text: message.text(), url: where?.url || '' });
  });
  page.on('pageerror', error => log.pageErrors.push(String(error?.stack || error)));
  page.on('requestfailed', request =>
    log.failedRequests.push({ url: request.url(), error: request.failure()?.errorText || '' }),
  );
  page.on('response', response => {
    if (response.status() >= 400) {
      log.httpErrors.push({ url: response.url(), status: response.status() });
    }
  });
  // Toasts (sonner) come and go: keep each one's text as it is added.
  await page.evaluateOnNewDocument(() => {
    window.__toasts = [];
    new MutationObserver(records => {
      for (const record of records) {
        for (const node of record.addedNodes) {
          if (node.nodeType !== 1) continue;
          const toasts = node.matches?.('[data-sonner-toast]')
            ? [node]
            : [...(node.querySelectorAll?.('[data-sonner-toast]') || [])];
          for (const toast of toasts) {
            setTimeout(() => window.__toasts.push(toast.innerText.trim()), 300);
          }
        }
      }
    }).observe(document, { childList: true, subtree: true });
  });
  const url = `${plan.url}/viewer?StudyInstanceUIDs=${encodeURIComponent(plan.studyUid)}`;
  await page.goto(url, { waitUntil: 'load', timeout: 60000 });
  await page.waitForSelector(THUMBNAIL, { timeout: 60000 });
  await waitFor(page, () => canvasStats(page).then(s => s && s.lit > 1000), 60000, 'the CT');
  await skipTour(page);
  return { page, log };
}

// OHIF 3.13 starts a guided tour on a first visit (a fresh profile is always one).
async function skipTour(page) {
  const deadline = Date.now() + 5000;
  while (Date.now() < deadline) {
    const [skip] = await page.$$('xpath/.//button[normalize-space()="Skip all"]');
    if (skip) {
      await skip.click();
      await sleep(300);
      return;
    }
    await sleep(250);
  }
}

async function waitFor(page, predicate, timeout, what) {
  const deadline = Date.now() + timeout;
  for (;;) {
    try {
      const value = await predicate();
      if (value) return value;
    } catch {
      // an element swapped under us: try again
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(250);
  }
}

async function thumbnail(page, modality, description) {
  const xpath =
    `xpath/.//*[@data-cy="study-browser-thumbnail-no-image"]` +
    `[.//*[@data-cy="series-modality-label" and normalize-space()="${modality}"]]` +
    `[.//*[@data-cy="series-description-label" and normalize-space()="${description}"]]`;
  const found = await page.$$(xpath);
  if (found.length !== 1) {
    throw new Error(`${found.length} ${modality} thumbnails described "${description}"`);
  }
  return found[0];
}

// Answers a prompt OHIF shows in the viewport; whether it came within `timeout`.
async function answerPrompt(page, text, answer, timeout) {
  const deadline = Date.now() + timeout;
  while (Date.now() < deadline) {
    const body = await page.evaluate(() => document.body.innerText);
    if (body.includes(text)) {
      const [button] = await page.$$(`xpath/.//button[normalize-space()="${answer}"]`);
      if (button) {
        await button.click();
        return true;
      }
    }
    await sleep(250);
  }
  return false;
}

// Pixels of the viewport canvas: how many are lit, and how many are coloured like each of
// `colors` (a blend over grey keeps the direction of (r - g, g - b), whatever its opacity).
function canvasStats(page, colors = []) {
  return page.evaluate(
    (selector, colors) => {
      const canvas = document.querySelector(selector);
      if (!canvas || !canvas.width) return null;
      // Read a CPU copy: reading the viewport's own canvas back makes Chromium warn.
      const copy = document.createElement('canvas');
      [copy.width, copy.height] = [canvas.width, canvas.height];
      const context = copy.getContext('2d', { willReadFrequently: true });
      context.drawImage(canvas, 0, 0);
      const { data } = context.getImageData(0, 0, canvas.width, canvas.height);
      const angle = (r, g, b) => Math.atan2(g - b, r - g);
      const targets = colors.map(([r, g, b]) => angle(r, g, b));
      const counts = colors.map(() => 0);
      let lit = 0;
      let coloured = 0;
      for (let i = 0; i < data.length; i += 4) {
        const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
        if (r + g + b > 30) lit += 1;
        if (Math.max(r, g, b) - Math.min(r, g, b) < 12) continue;
        coloured += 1;
        const a = angle(r, g, b);
        let best = -1;
        let bestDistance = (12 * Math.PI) / 180;
        targets.forEach((t, k) => {
          const d = Math.abs(Math.atan2(Math.sin(a - t), Math.cos(a - t)));
          if (d < bestDistance) [best, bestDistance] = [k, d];
        });
        if (best >= 0) counts[best] += 1;
      }
      return { width: canvas.width, height: canvas.height, lit, coloured, counts };
    },
    VIEWPORT_CANVAS,
    colors,
  );
}

async function shot(page, log, name) {
  const file = path.join(out, `${name}.png`);
  await page.screenshot({ path: file });
  log.steps.push({ screenshot: file, at: (Date.now() - started) / 1000 });
  return file;
}

async function panelRows(page, rowSelector) {
  return page.$$eval(rowSelector, rows =>
    rows.map(row => ({
      title: row.querySelector('[data-cy="data-row-title"]')?.innerText.trim() || '',
      details: [...row.querySelectorAll('[data-cy="data-row-detail-line"]')].map(d =>
        d.innerText.trim(),
      ),
      color: row.querySelector('[data-cy="data-row-colorhex"]')?.style.backgroundColor || '',
    })),
  );
}

// Texts OHIF draws on the image (SVG annotations: the SR's labels and values).
function viewportTexts(page) {
  return page.$$eval('[data-cy="viewport-grid"] svg text', texts =>
    texts.map(t => [...t.querySelectorAll('tspan')].map(s => s.textContent).join('\n') || t.textContent),
  );
}

async function finish(page, log) {
  log.toasts = await page.evaluate(() => window.__toasts || []);
  log.errorBoundary = await page.evaluate(() => document.body.innerText.includes('Something went wrong'));
  await page.close();
}

async function segScenario() {
  const { page, log } = await openViewer('seg');
  log.before = await canvasStats(page);
  await shot(page, log, '01-viewer');
  await (await thumbnail(page, 'SEG', plan.seg)).click({ count: 2 });
  log.prompted = await answerPrompt(page, PROMPT_SEG, 'Yes', 30000);
  await page.click(SEGMENTATION_TAB).catch(() => {});
  const rowSelector = '#viewerLayoutResizableRightPanel [data-cy="data-row"]';
  log.rows = await waitFor(
    page,
    async () => {
      const rows = await panelRows(page, rowSelector);
      return rows.length >= plan.segLabels.length ? rows : null;
    },
    30000,
    'the segmentation panel',
  ).catch(async error => {
    log.waitError = String(error.message);
    return panelRows(page, rowSelector);
  });
  await sleep(1000);
  await shot(page, log, '02-seg');
  const colors = log.rows.map(r => (r.color.match(/\d+/g) || [0, 0, 0]).slice(0, 3).map(Number));
  log.overlay = await canvasStats(page, colors);
  // A click on a segment's row jumps to it: each one's colour must show there.
  log.segments = [];
  const rows = await page.$$(rowSelector);
  for (let k = 0; k < rows.length; k += 1) {
    await rows[k].click();
    await sleep(1000);
    // The row's hover card: OHIF's own statistics of the segment (voxels, volume).
    const card = await waitFor(
      page,
      () =>
        page.evaluate(() =>
          [...document.querySelectorAll('[data-radix-popper-content-wrapper]')]
            .map(e => e.innerText.trim())
            .find(text => text.includes('Volume')),
        ),
      5000,
      'the segment card',
    ).catch(() => '');
    await page.mouse.move(5, 995); // away from the panel: the card hides part of the image
    await sleep(800);
    const stats = await canvasStats(page, colors);
    const file = await shot(page, log, `03-seg-${k + 1}`);
    log.segments.push({
      ...log.rows[k],
      pixels: stats ? stats.counts[k] : 0,
      stats,
      card,
      screenshot: file,
    });
  }
  await finish(page, log);
}

async function srScenario(name, description, shotName) {
  const { page, log } = await openViewer(name);
  await (await thumbnail(page, 'SR', description)).click({ count: 2 });
  // The SR viewport draws the report's regions and values; OHIF then asks to track them
  // only if it can hydrate the report (isRehydratable), so a short wait after the drawing.
  log.viewportTexts = await waitFor(
    page,
    async () => {
      const texts = await viewportTexts(page);
      return texts.length ? texts : null;
    },
    30000,
    'the SR drawn on the image',
  ).catch(error => {
    log.waitError = String(error.message);
    return [];
  });
  log.prompted = await answerPrompt(page, PROMPT_SR, 'Yes', 5000);
  await sleep(1500);
  await shot(page, log, `${shotName}-viewport`);
  await page.click(MEASUREMENTS_TAB).catch(() => {});
  const panelText = () =>
    page.evaluate(() => {
      const panel =
        document.querySelector('[data-cy="trackedMeasurements-panel"]') ||
        document.querySelector('#viewerLayoutResizableRightPanel');
      return panel ? panel.innerText : '';
    });
  log.panelText = await waitFor(
    page,
    async () => {
      const text = await panelText();
      return /Measurements \(/.test(text) ? text : null;
    },
    15000,
    'the measurements panel',
  ).catch(() => panelText());
  log.noTracked = log.panelText.includes('No tracked measurements');
  log.rows = await panelRows(page, '[data-cy^="measurement-table-row-"]');
  // Values are drawn (and some computed) once their slice renders: wait for numbers.
  if (log.rows.length) {
    await waitFor(
      page,
      async () => {
        log.rows = await panelRows(page, '[data-cy^="measurement-table-row-"]');
        return log.rows.every(r => r.details.some(d => /\d/.test(d) && !/NaN/.test(d)));
      },
      10000,
      'values in the measurements panel',
    ).catch(() => {});
  }
  log.viewportTextsAfter = await viewportTexts(page);
  await shot(page, log, `${shotName}-measurements`);
  await finish(page, log);
}

let failure = null;
try {
  const steps = [
    ['seg', () => segScenario()],
    ['sr', () => srScenario('sr', plan.sr, '04-sr')],
  ];
  if (plan.detectionSr) {
    steps.push(['detectionSr', () => srScenario('detectionSr', plan.detectionSr, '05-detection-sr')]);
  }
  for (const [name, step] of steps) {
    const t0 = Date.now();
    try {
      await step();
    } catch (error) {
      // Keep going: the next scenario opens a page of its own.
      results.scenarios[name] = results.scenarios[name] || {};
      results.scenarios[name].error = String(error?.stack || error);
    }
    results.timings[name] = (Date.now() - t0) / 1000;
  }
} catch (error) {
  failure = error;
  results.error = String(error?.stack || error);
} finally {
  results.timings.total = (Date.now() - started) / 1000;
  fs.writeFileSync(path.join(out, 'results.json'), JSON.stringify(results, null, 2));
  await browser.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
process.exit(failure ? 1 : 0);
