// derm serve: the page's script. Plain JavaScript, no libraries, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);

const OUTPUTS = [
  ["input.png", "input"],
  ["occlusion.png", "occlusion mask (hairs, rulers)"],
  ["purified.png", "purified"],
  ["lesion_overlay.png", "lesion outline"],
  ["saliency_overlay.png", "saliency (VisualBackProp)"],
  ["lesion_mask.png", "lesion mask"],
  ["saliency.png", "saliency map"],
];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function setState(s) {
  document.body.dataset.state = s;
}

function pct(x) {
  return (100 * x).toFixed(1) + " %";
}

// ---- tabs ----
for (const b of document.querySelectorAll("nav button")) {
  b.addEventListener("click", () => {
    for (const o of document.querySelectorAll("nav button")) {
      o.setAttribute("aria-selected", String(o === b));
      $(o.dataset.panel).hidden = o !== b;
    }
    if (b.id === "tab-run") loadRun();
  });
}

// ---- server info ----
let info = null;
fetch("/api/info")
  .then((r) => r.json())
  .then((j) => {
    info = j;
    const mb = (j.limits.max_upload_bytes / 1048576).toFixed(0);
    $("info").textContent =
      `models: ${j.run} · classes: ${j.classes.join(", ")} · device ${j.device} · uploads up to ${mb} MiB`;
  })
  .catch(() => {
    $("info").textContent = "the server does not answer";
  });

// ---- analysis ----
function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = false;
  setState("error");
}

async function analyse(file) {
  $("error").hidden = true;
  $("results").hidden = true;
  setState("busy");
  $("status").textContent = `analysing ${file.name} (${(file.size / 1024).toFixed(0)} KiB)…`;
  const form = new FormData();
  form.append("image", file, file.name);
  let r, j;
  try {
    r = await fetch("/api/analyze", { method: "POST", body: form });
  } catch (e) {
    $("status").textContent = "";
    showError("The upload failed: the server did not answer (" + e.message + ").");
    return;
  }
  try {
    j = await r.json();
  } catch (e) {
    j = { error: `the server answered ${r.status} ${r.statusText}` };
  }
  if (!r.ok) {
    $("status").textContent = "";
    showError(`${file.name}: ${j.error || "the analysis failed"} (HTTP ${r.status})`);
    return;
  }
  $("status").textContent =
    `${j.image}: analysed in ${j.seconds.toFixed(2)} s` + (j.queued_seconds > 0.05 ? ` after ${j.queued_seconds.toFixed(1)} s in the queue` : "");
  await showResult(j);
  setState("done");
}

function loaded(img) {
  return new Promise((resolve) => {
    if (img.complete && img.naturalWidth > 0) resolve();
    else {
      img.addEventListener("load", () => resolve(), { once: true });
      img.addEventListener("error", () => resolve(), { once: true });
    }
  });
}

async function showResult(j) {
  const imgs = [];
  $("predicted").textContent = "Predicted: " + (j.predicted_class || "?").replace(/_/g, " ");
  const probs = $("probs");
  probs.replaceChildren();
  for (const c of j.classes) {
    const li = el("li", { class: c.class === j.predicted_class ? "best" : "", "data-class": c.class });
    li.append(
      el("span", { class: "name", text: c.class.replace(/_/g, " ") }),
      el("span", { class: "bar" }, el("span", { style: `width:${(100 * c.probability).toFixed(1)}%` })),
      el("span", { class: "value", text: c.probability.toFixed(3) })
    );
    probs.append(li);
  }
  const facts = $("facts");
  facts.replaceChildren();
  for (const [k, v] of [
    ["image size", `${j.size[0]} × ${j.size[1]}`],
    ["hair / ruler pixels", pct(j.occluded_fraction)],
    ["lesion area", pct(j.lesion_fraction)],
    ["analysis time", `${j.seconds.toFixed(2)} s`],
  ]) {
    facts.append(el("dt", { text: k }), el("dd", { text: v }));
  }
  const dl = $("downloads");
  dl.replaceChildren(el("span", { class: "muted", text: "download: " }));
  for (const [f] of OUTPUTS) {
    dl.append(el("a", { href: j.files[f], download: `${j.id}_${f}`, text: f }));
  }
  dl.append(el("a", { href: j.analysis_json, download: `${j.id}_analysis.json`, text: "analysis.json" }));

  const grid = $("outputs");
  grid.replaceChildren();
  for (const [f, caption] of OUTPUTS.slice(0, 5)) {
    const img = el("img", { src: j.files[f], alt: caption, "data-output": f });
    imgs.push(img);
    grid.append(
      el("figure", {}, img, el("figcaption", {}, el("span", { text: caption }), el("a", { href: j.files[f], download: `${j.id}_${f}`, text: "download" })))
    );
  }
  const before = $("cmp-before");
  before.src = j.files["input.png"];
  imgs.push(before);
  currentFiles = j.files;
  updateCompare();
  imgs.push($("cmp-after"));
  $("results").hidden = false;
  await Promise.all(imgs.map(loaded));
}

let currentFiles = null;
function updateCompare() {
  if (!currentFiles) return;
  const after = $("cmp-after");
  const f = $("cmp-with").value;
  if (after.getAttribute("src") !== currentFiles[f]) after.src = currentFiles[f];
  const v = Number($("cmp-range").value);
  // The "after" image shows to the left of the slider, the input to its right.
  after.style.clipPath = `inset(0 ${100 - v}% 0 0)`;
  $("cmp-line").style.left = `${v}%`;
}
$("cmp-range").addEventListener("input", updateCompare);
$("cmp-with").addEventListener("change", updateCompare);

$("file").addEventListener("change", (e) => {
  const f = e.target.files[0];
  if (f) analyse(f);
});
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) {
  drop.addEventListener(ev, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
}
for (const ev of ["dragleave", "drop"]) {
  drop.addEventListener(ev, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  const f = e.dataTransfer.files[0];
  if (f) analyse(f);
});

// ---- the run folder ----
let runLoaded = false;
function figures(list) {
  const g = el("div", { class: "grid" });
  for (const f of list) {
    g.append(el("figure", {}, el("a", { href: f.url, target: "_blank" }, el("img", { src: f.url, alt: f.caption, loading: "lazy" })), el("figcaption", { text: f.caption })));
  }
  return g;
}

async function loadRun() {
  if (runLoaded) return;
  let j;
  try {
    const r = await fetch("/api/run");
    j = await r.json();
    if (!r.ok) throw new Error(j.error || r.statusText);
  } catch (e) {
    $("run-status").textContent = "cannot read the run folder: " + e.message;
    return;
  }
  runLoaded = true;
  const root = $("run");
  root.replaceChildren();
  $("run-status").textContent = `run folder ${j.root}`;

  if (j.report || j.sections.length) {
    root.append(el("h2", { class: "run", text: "Report" }));
    if (j.report) root.append(el("p", {}, el("a", { href: j.report, target: "_blank", text: "open report.html" })));
    const ol = el("ol", { class: "sections" });
    for (const s of j.sections) ol.append(el("li", {}, el("a", { href: s.url, target: "_blank", text: s.title })));
    root.append(ol);
  }
  if (j.stages.length) {
    root.append(el("h2", { class: "run", text: "Stages" }));
    const t = el("table", {}, el("tr", {}, el("th", { text: "stage" }), el("th", { text: "seconds" }), el("th", { text: "record" })));
    for (const s of j.stages) {
      t.append(el("tr", {}, el("td", { text: s.stage }), el("td", { class: "num", text: s.seconds == null ? "" : s.seconds.toFixed(1) }), el("td", {}, el("a", { href: s.record, target: "_blank", text: "record.json" }))));
    }
    root.append(t);
  }

  const seg = j.segmentation;
  if (seg.images.length) {
    root.append(el("h2", { class: "run", text: `Segmentation: ${seg.images.length} test images, worst Jaccard first` }));
    if (seg.summary) {
      root.append(el("p", { class: "muted", text: `mean Jaccard ${Number(seg.summary.jaccard_mean).toFixed(3)} · thresholded ${Number(seg.summary.jaccard_thresholded).toFixed(3)} · Dice ${Number(seg.summary.dice_mean).toFixed(3)}; prediction green, truth red` }));
    }
    const t = el("table", { id: "seg-table" }, el("tr", {}, el("th", { text: "#" }), el("th", { text: "image" }), el("th", { text: "Jaccard" }), el("th", { text: "Dice" }), el("th", { text: "overlay" })));
    root.append(t);
    let shown = 0;
    const more = el("button", { type: "button", class: "more" });
    const addRows = (n) => {
      for (const s of seg.images.slice(shown, shown + n)) {
        shown += 1;
        t.append(
          el("tr", { class: s.jaccard < 0.65 ? "worst" : "" },
            el("td", { class: "num", text: String(shown) }),
            el("td", { text: s.id }),
            el("td", { class: "num", text: s.jaccard.toFixed(3) }),
            el("td", { class: "num", text: Number.isFinite(s.dice) ? s.dice.toFixed(3) : "" }),
            el("td", {}, el("a", { href: s.overlay, target: "_blank" }, el("img", { src: s.overlay, alt: `overlay ${s.id}`, loading: "lazy" }))))
        );
      }
      more.textContent = `show ${Math.min(24, seg.images.length - shown)} more`;
      more.hidden = shown >= seg.images.length;
    };
    more.addEventListener("click", () => addRows(24));
    addRows(12);
    root.append(more);
  }
  for (const [key, title] of [["gan", "GAN samples and novelty"], ["roc", "Classification: ROC curves and confusion matrices"], ["vbp", "VisualBackProp"], ["curves", "Training curves"]]) {
    if (j[key].length) {
      root.append(el("h2", { class: "run", text: title }), figures(j[key]));
    }
  }
  if (!root.children.length) {
    root.append(el("p", { text: "This folder holds models but no pipeline results (run `cargo xtask pipeline` for a full run folder)." }));
  }
}

// The run browser opens directly at /#run.
if (location.hash === "#run") $("tab-run").click();
window.addEventListener("hashchange", () => {
  $(location.hash === "#run" ? "tab-run" : "tab-analyse").click();
});
