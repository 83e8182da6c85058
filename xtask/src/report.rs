//! The pipeline's `report.html`: one self-contained page gathering every stage's figures and
//! numbers, next to the paper's reference figures.

use std::path::{Path, PathBuf};

use derm_core::report::Report;
use serde_json::Value;

use crate::pipeline::Run;

/// Paper reference figures (ISIC 2017 challenge winners, as Bisla et al. compare against).
const REF_MEL_AUC: f64 = 0.874;
const REF_MEAN_AUC: f64 = 0.911;
const REF_JACCARD: f64 = 0.765;

fn num(v: Option<&Value>) -> String {
    v.and_then(Value::as_f64).map(|x| format!("{x:.3}")).unwrap_or_else(|| "n/a".into())
}

/// Files in `dir` (relative to `root`) whose name ends with `suffix`, sorted, at most `n`.
fn files(root: &Path, dir: &str, suffix: &str, n: usize) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join(dir))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|f| f.ends_with(suffix))
                .map(|f| format!("{dir}/{f}"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.truncate(n);
    v
}

fn exists(root: &Path, rel: &str) -> bool {
    root.join(rel).exists()
}

/// Writes `report.html` into the run folder and returns its path.
pub fn write(run: &Run, out: &Path) -> anyhow::Result<PathBuf> {
    let mut rep = Report::new("derm pipeline report");
    let m = |stage: &str| run.record(stage).map(|r| r.metrics.clone()).unwrap_or(Value::Null);

    // Summary table next to the paper.
    let seg = m("segment");
    let cls = m("classify");
    let sec = rep.section("Results next to the paper");
    let both = &cls["both"]["test_time_purification"];
    let base = &cls["baseline"]["plain"];
    sec.paragraph(
        "Phantom data by default: these numbers show that every stage trains and that its metric moves; they are not \
         comparable to ISIC results. The reference column is the ISIC 2017 challenge winners as cited by Bisla et al.",
    );
    sec.table(
        &["metric", "derm (this run)", "paper reference"],
        vec![
            vec!["segmentation Jaccard (per-image mean)".into(), num(seg["eval"]["summary"].get("jaccard_mean")), format!("{REF_JACCARD}")],
            vec!["segmentation Jaccard (ISIC 2018 thresholded)".into(), num(seg["eval"]["summary"].get("jaccard_thresholded")), "".into()],
            vec!["melanoma AUC, baseline".into(), num(base["auc"].get("melanoma")), format!("{REF_MEL_AUC}")],
            vec!["mean AUC, baseline".into(), num(base.get("mean_auc")), format!("{REF_MEAN_AUC}")],
            vec!["melanoma AUC, full system".into(), num(both["auc"].get("melanoma")), format!("{REF_MEL_AUC}")],
            vec!["mean AUC, full system".into(), num(both.get("mean_auc")), format!("{REF_MEAN_AUC}")],
        ],
    );

    // Data.
    let data = m("data");
    let sec = rep.section("Data");
    sec.kv(vec![
        ("training set", data["train"].as_str().unwrap_or("").to_string()),
        ("test set", data["test"].as_str().unwrap_or("").to_string()),
        ("budget", data["budget"].to_string()),
    ]);
    if let Some(t) = data["check"].as_object() {
        sec.preformatted(serde_json::to_string_pretty(t).unwrap_or_default());
    }

    // Hair.
    let sec = rep.section("Hair and ruler masks, classic cleaning");
    let h = m("hair");
    sec.kv(vec![
        ("pixel recall", num(h.get("recall"))),
        ("pixel precision", num(h.get("precision"))),
        ("lesion pixels wrongly marked", num(h.get("lesion_pixels_wrongly_marked"))),
    ]);
    let test_imgs = files(out, "data/test/images", ".png", 4);
    let mut row = Vec::new();
    for img in &test_imgs {
        let id = Path::new(img).file_stem().and_then(|s| s.to_str()).unwrap_or("");
        row.push((img.clone(), format!("{id} input")));
        for (suffix, cap) in [("_occlusion.png", "occlusion mask"), ("_clean.png", "classic inpainting")] {
            let p = format!("hair/test/{id}{suffix}");
            if exists(out, &p) {
                row.push((p, cap.to_string()));
            }
        }
    }
    sec.images_row(row);

    // Segmentation.
    let sec = rep.section("Segmentation");
    if let Some(s) = seg["eval"]["summary"].as_object() {
        sec.kv(s.iter().map(|(k, v)| (k.clone(), num(Some(v)))).collect());
    }
    if exists(out, "segment/model/loss_curve.png") {
        sec.image("segment/model/loss_curve.png", "training loss and validation Jaccard");
    }
    sec.paragraph("Prediction in green, ground truth in red; J = per-image Jaccard.");
    sec.images_row(files(out, "segment/eval", ".png", 8).into_iter().map(|p| (p, String::new())).collect());

    // Purification.
    let sec = rep.section("Purification (partial-convolution inpainting)");
    let p = m("purify");
    if !p["eval"].is_null() {
        sec.preformatted(serde_json::to_string_pretty(&p["eval"]).unwrap_or_default());
    }
    if exists(out, "purify/model/loss_curve.png") {
        sec.image("purify/model/loss_curve.png", "training loss");
    }
    let mut row = Vec::new();
    for img in &test_imgs {
        let id = Path::new(img).file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let pp = format!("purify/test/{id}_purified.png");
        if exists(out, &pp) {
            row.push((img.clone(), format!("{id} before")));
            row.push((pp, "purified".into()));
        }
    }
    sec.images_row(row);

    // Synthesis.
    let sec = rep.section("Synthesis (DCGAN virtual patients) and novelty check");
    let sy = m("synth");
    if !sy["novelty"].is_null() {
        sec.preformatted(serde_json::to_string_pretty(&sy["novelty"]).unwrap_or_default());
    }
    let mut row = Vec::new();
    for f in files(out, "synth/samples", ".png", 64) {
        if f.contains("grid") || f.contains("novelty") {
            row.push((f, String::new()));
        }
    }
    sec.images_row(row);

    // Classification ablation.
    let sec = rep.section("Classification: ablation as in the paper");
    let mut rows = Vec::new();
    for v in ["baseline", "purified", "synthetic", "both"] {
        for (tag, key) in [("off", "plain"), ("on", "test_time_purification")] {
            let e = &cls[v][key];
            rows.push(vec![
                v.to_string(),
                tag.to_string(),
                num(e["auc"].get("melanoma")),
                num(e["auc"].get("seborrheic_keratosis")),
                num(e.get("mean_auc")),
                num(e.get("balanced_accuracy")),
                num(e.get("accuracy")),
            ]);
        }
    }
    sec.table(&["training data", "test-time purification", "melanoma AUC", "SK AUC", "mean AUC", "balanced acc.", "accuracy"], rows);
    let mut row = Vec::new();
    for v in ["baseline", "both"] {
        for tag in ["plain", "ttp"] {
            for f in ["roc.png", "confusion.png"] {
                let p = format!("classify/{v}/eval_{tag}/{f}");
                if exists(out, &p) {
                    row.push((p, format!("{v}, purification {}", if tag == "ttp" { "on" } else { "off" })));
                }
            }
        }
    }
    sec.images_row(row);

    // VisualBackProp.
    let sec = rep.section("VisualBackProp: where the classifier looks");
    let vb = m("vbp");
    for v in ["baseline", "both"] {
        sec.kv(vec![
            (format!("{v}: saliency inside the lesion"), num(vb[v].get("mean_mass_inside"))),
            (format!("{v}: lesion area fraction"), num(vb[v].get("mean_area_fraction"))),
        ]);
    }
    for v in ["baseline", "both"] {
        let row: Vec<(String, String)> =
            files(out, &format!("vbp/{v}"), "_overlay.png", 6).into_iter().map(|p| (p, v.to_string())).collect();
        sec.images_row(row);
    }

    // Times.
    let sec = rep.section("Stage times");
    let rows = run
        .order
        .iter()
        .filter_map(|s| run.record(s).map(|r| vec![s.clone(), format!("{:.1}", r.seconds)]))
        .collect();
    sec.table(&["stage", "seconds"], rows);

    let path = out.join("report.html");
    rep.write(&path)?;
    Ok(path)
}
