// Run by tests/nodes/test_js.py under node: the front-end's pure logic with a recording canvas context.
import assert from "node:assert/strict";
import { ProgressStore, badgeText, chartPoints, drawBadge, drawLossChart, formatEta } from "../../js/metalora_chart.js";

function recorder() {
  const calls = [];
  const ctx = new Proxy(
    { measureText: (t) => ({ width: 6 * t.length }) },
    {
      get(target, name) {
        if (name in target) return target[name];
        return (...args) => calls.push([name, ...args]);
      },
      set(target, name, value) {
        calls.push(["set", name, value]);
        return true;
      },
    },
  );
  return { ctx, calls };
}

const store = new ProgressStore();
for (let s = 1; s <= 4; s++) store.add({ node: "7", step: s, total: 4, loss: 1 / s, lr: 1e-4, eta_s: 4 - s });
let run = store.get(7);
assert.equal(run.points.length, 4);
const pts = chartPoints(run, { x: 0, y: 0, w: 100, h: 50 });
assert.deepEqual(pts[0], [25, 0]); // highest loss at the top
assert.deepEqual(pts[3], [100, 50]); // last step at the right, lowest loss at the bottom
store.add({ node: 7, step: 1, total: 10, loss: 0.5 }); // a new run restarts the history
run = store.get("7");
assert.equal(run.points.length, 1);
assert.equal(run.total, 10);
assert.equal(store.add({ step: 1 }), null);

const { ctx, calls } = recorder();
store.add({ node: 7, step: 2, total: 10, loss: 0.25, eta_s: 75 });
assert.equal(drawLossChart(ctx, store.get(7), { x: 0, y: 0, w: 200, h: 120 }), 2);
assert.ok(calls.some(([n]) => n === "lineTo"));
const label = calls.find(([n]) => n === "fillText")[1];
assert.equal(label, "step 2/10  loss 0.2500  eta 1m15s");
assert.equal(formatEta(3725), "1h02m");

const score = { score: 0.61234, percent: 78.4, no_face: 1, total: 4, verdict: "same person" };
assert.equal(badgeText(score), "R-FaceSim 0.612 78% · same person (3/4 faces)");
assert.equal(badgeText({ score: null, percent: null, no_face: 2, total: 2, verdict: "no face" }), "R-FaceSim: no face (0/2 faces)");
const b = recorder();
const drawn = drawBadge(b.ctx, score, 300);
assert.ok(drawn.w > 0 && drawn.x >= 0);
assert.ok(b.calls.some(([n, v]) => n === "set" && v === "fillStyle") || b.calls.some(([n]) => n === "fillText"));
console.log("js ok");
