// Meta-LoRA ComfyUI front-end: a live loss chart on the Train Identity node (from metalora.train_progress
// events) and an R-FaceSim score badge on the R-FaceSim node (from its UI output "metalora_score").
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  CHART_HEIGHT,
  PROGRESS_EVENT,
  ProgressStore,
  SCORE_NODE,
  TRAIN_NODE,
  drawBadge,
  drawLossChart,
} from "./metalora_chart.js";

const store = new ProgressStore();

function findNode(id) {
  const graph = app.graph;
  if (!graph) return null;
  const key = String(id);
  // subgraph nodes report "outer:inner" ids; the innermost id is the node in its (sub)graph
  const local = key.includes(":") ? key.split(":").pop() : key;
  return graph.getNodeById(Number(local)) ?? graph.getNodeById(local) ?? null;
}

app.registerExtension({
  name: "metalora.ui",
  setup() {
    api.addEventListener(PROGRESS_EVENT, (event) => {
      const run = store.add(event.detail);
      const node = run && findNode(event.detail.node);
      if (!node) return;
      node.metaloraRun = run;
      const needed = (node.metaloraBaseHeight ?? node.size[1]) + CHART_HEIGHT + 8;
      node.metaloraBaseHeight ??= node.size[1];
      if (node.size[1] < needed) node.setSize([node.size[0], needed]);
      node.setDirtyCanvas(true, true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === TRAIN_NODE) {
      const draw = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx) {
        draw?.apply(this, arguments);
        if (!this.metaloraRun || this.flags?.collapsed) return;
        const box = { x: 6, y: this.size[1] - CHART_HEIGHT - 6, w: this.size[0] - 12, h: CHART_HEIGHT };
        drawLossChart(ctx, this.metaloraRun, box);
      };
    }
    if (nodeData.name === SCORE_NODE) {
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        executed?.apply(this, arguments);
        this.metaloraScore = message?.metalora_score?.[0] ?? null;
        this.setDirtyCanvas(true, true);
      };
      const draw = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx) {
        draw?.apply(this, arguments);
        if (this.metaloraScore && !this.flags?.collapsed) drawBadge(ctx, this.metaloraScore, this.size[0]);
      };
    }
  },
});
