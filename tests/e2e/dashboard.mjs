// Browser test of the dashboard (headless Chromium via playwright-core): upload the digits model
// and dataset, submit a classification job, watch it reach `succeeded` live, and find the
// accuracy in its headline; then let the advisor choose from a goal preset and find its decision in
// the report. Run with `make e2e` (CI runs it after `make test`: it installs Chromium).
// Usage: node dashboard.mjs BASE_URL REPO_ROOT SCREENSHOT_DIR
import { chromium } from 'playwright-core';
import path from 'node:path';

const [base, root, shots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
const fail = async (message) => {
  await page.screenshot({ path: path.join(shots, 'failure.png'), fullPage: true });
  console.error(message);
  process.exit(1);
};
try {
  await page.goto(base + '/');
  await page.getByTestId('model-file').setInputFiles(path.join(root, 'tests/fixtures/digits/mlp.onnx'));
  await page.getByTestId('upload-model').click();
  await page.getByTestId('model-summary').filter({ hasText: 'input' }).waitFor({ timeout: 20000 });
  await page.getByTestId('dataset-file').setInputFiles(path.join(root, 'tests/fixtures/digits/test.npz'));
  await page.getByTestId('upload-dataset').click();
  await page.getByTestId('dataset-summary').filter({ hasText: 'labels' }).waitFor({ timeout: 20000 });
  const presets = await page.getByTestId('recipe-preset').locator('option').allTextContents();
  const int8 = presets.find((p) => /int8 dynamic/i.test(p));
  await page.getByTestId('recipe-preset').selectOption({ label: int8 });
  await page.getByTestId('task-select').selectOption('classification');
  const datasets = await page.getByTestId('dataset-select').locator('option').evaluateAll((o) => o.map((x) => x.value));
  await page.getByTestId('dataset-select').selectOption(datasets.find((v) => v));
  await page.getByTestId('submit-job').click();
  const done = page.locator('[data-testid="job-row"][data-state="succeeded"]').first();
  await done.waitFor({ timeout: 90000 });
  const headline = done.getByTestId('job-headline');
  await headline.filter({ hasText: /accuracy/i }).waitFor({ timeout: 20000 });
  console.log('headline:', (await headline.textContent()).replace(/\s+/g, ' ').trim());
  await page.screenshot({ path: path.join(shots, 'dashboard.png'), fullPage: true });

  // A goal for the advisor from its preset: the row says so, and its report has a decision.
  const advisor = presets.find((p) => /Advisor: smallest/.test(p));
  await page.getByTestId('recipe-preset').selectOption({ label: advisor });
  await page.getByTestId('submit-job').click();
  const goalRow = page.locator('[data-testid="job-row"]').filter({ hasText: 'advisor: smallest' }).first();
  await goalRow.waitFor({ timeout: 20000 });
  const goalDone = page.locator('[data-testid="job-row"][data-state="succeeded"]').filter({ hasText: 'advisor: smallest' }).first();
  await goalDone.waitFor({ timeout: 240000 });
  await goalDone.getByTestId('job-headline').filter({ hasText: /accuracy/i }).waitFor({ timeout: 20000 });
  const reportUrl = await goalDone.locator('a', { hasText: /report/i }).first().getAttribute('href');
  const report = await page.request.get(new URL(reportUrl.replace(/\.html$/, ''), base).toString());
  const body = await report.json();
  if (!body.advisor || !body.advisor.decision) throw new Error('the goal job has no decision: ' + JSON.stringify(body.advisor));
  console.log('advisor:', body.advisor.decision.reason);
  await page.screenshot({ path: path.join(shots, 'dashboard-advisor.png'), fullPage: true });
} catch (e) {
  await fail(String(e));
}
await browser.close();
