//! The pipeline's `report.html`: one self-contained page gathering every stage's figures and
//! numbers, next to the paper's reference figures.

use derm_data::handoff;
use std::path::{Path, PathBuf};

use derm_visual::report::Report;
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
    let both = &cls["both"]["test_time_purification"]["report"];
    let base = &cls["baseline"]["plain"]["report"];
    sec.paragraph(
        "Phantom data by default: these numbers show that every stage trains and that its metric moves; they are not \
         comparable to ISIC results. The reference column is the ISIC 2017 challenge winners as cited by Bisla et al.",
    );
    sec.table(
        &["metric", "derm (this run)", "paper reference"],
        vec![
            vec![
                "segmentation Jaccard (per-image mean)".into(),
                num(seg["eval"]["summary"].get("jaccard_mean")),
                format!("{REF_JACCARD}"),
            ],
            vec![
                "segmentation Jaccard (ISIC 2018 thresholded)".into(),
                num(seg["eval"]["summary"].get("jaccard_thresholded")),
                "".into(),
            ],
            vec!["melanoma AUC, baseline".into(), num(base["auc"].get(0)), format!("{REF_MEL_AUC}")],
            vec!["mean AUC, baseline".into(), num(base.get("mean_auc")), format!("{REF_MEAN_AUC}")],
            vec!["melanoma AUC, full system".into(), num(both["auc"].get(0)), format!("{REF_MEL_AUC}")],
            vec!["mean AUC, full system".into(), num(both.get("mean_auc")), format!("{REF_MEAN_AUC}")],
        ],
    );

    // Data.
    let data = m("data");
    let sec = rep.section("Data");
    sec.kv(vec![
        ("training set", data["train"].as_str().unwrap_or("").to_string()),
        ("test set", data["test"].as_str().unwrap_or("").to_string()),
    ]);
    if let Some(b) = data["budget"].as_object() {
        sec.kv(b.iter().map(|(k, v)| (k.replace('_', " "), v.to_string())).collect());
    }
    let mut rows = Vec::new();
    for split in data["check"]["splits"].as_array().into_iter().flatten() {
        for c in split["classes"].as_array().into_iter().flatten() {
            rows.push(vec![
                split["split"].as_str().unwrap_or("").to_string(),
                c["class"].as_str().unwrap_or("").to_string(),
                c["found"].to_string(),
                c["expected"].to_string(),
            ]);
        }
    }
    sec.table(&["split", "class", "images", "expected"], rows);

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
        for (suffix, cap) in [(handoff::OCCLUSION, "occlusion mask"), (handoff::CLEAN, "classic inpainting")] {
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
    if let Some(rows) = p["eval"].as_array() {
        sec.paragraph("Inside the true occlusion mask, against the clean phantom:");
        sec.table(
            &["method", "hole PSNR (dB)", "hole SSIM", "ms per image"],
            rows.iter()
                .map(|r| {
                    vec![
                        r["method"].as_str().unwrap_or("").to_string(),
                        num(r.get("hole_psnr")),
                        num(r.get("hole_ssim")),
                        num(r.get("ms_per_image")),
                    ]
                })
                .collect(),
        );
    }
    if exists(out, "purify/model/loss_curve.png") {
        sec.image("purify/model/loss_curve.png", "training loss");
    }
    let mut row = Vec::new();
    for img in &test_imgs {
        let id = Path::new(img).file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let pp = format!("purify/test/{}", handoff::purified(&id));
        if exists(out, &pp) {
            row.push((img.clone(), format!("{id} before")));
            row.push((pp, "purified".into()));
        }
    }
    sec.images_row(row);

    // Synthesis.
    let sec = rep.section("Synthesis (DCGAN virtual patients) and novelty check");
    let sy = m("synth");
    if let Some(classes) = sy["novelty"]["classes"].as_array() {
        sec.table(
            &["class", "generated", "kept (novel)", "min MSE", "median MSE", "max MSE", "real-vs-fake accuracy"],
            classes
                .iter()
                .map(|c| {
                    let n = &c["novelty"];
                    vec![
                        c["class"].as_str().unwrap_or("").to_string(),
                        n["generated"].to_string(),
                        n["kept"].to_string(),
                        format!("{:.4}", n["mse_min"].as_f64().unwrap_or(f64::NAN)),
                        format!("{:.4}", n["mse_median"].as_f64().unwrap_or(f64::NAN)),
                        format!("{:.4}", n["mse_max"].as_f64().unwrap_or(f64::NAN)),
                        num(c["real_vs_fake"].get("test_accuracy")),
                    ]
                })
                .collect(),
        );
        sec.paragraph(
            "Real-vs-fake accuracy near 0.5 means a small CNN cannot tell generated from real images of the class.",
        );
    }
    let mut row = Vec::new();
    for class in ["melanoma", "seborrheic_keratosis"] {
        if let Some(last) = files(out, &format!("synth/model/{class}/samples"), ".png", 10_000).pop() {
            row.push((last, format!("{class}: samples at the end of training")));
        }
    }
    for (f, cap) in [
        ("synth/samples/novelty_hist.png", "nearest-training-image MSE of each generated image"),
        ("synth/samples/novelty_pairs.png", "generated (left) and nearest real image at low, median and high MSE"),
    ] {
        if exists(out, f) {
            row.push((f.to_string(), cap.to_string()));
        }
    }
    sec.images_row(row);

    // Classification ablation.
    let sec = rep.section("Classification: ablation as in the paper");
    let mut rows = Vec::new();
    for v in ["baseline", "purified", "synthetic", "both"] {
        for (tag, key) in [("off", "plain"), ("on", "test_time_purification")] {
            let e = &cls[v][key]["report"];
            rows.push(vec![
                v.to_string(),
                tag.to_string(),
                num(e["auc"].get(0)),
                num(e["auc"].get(1)),
                num(e.get("mean_auc")),
                num(e.get("balanced_accuracy")),
                num(e.get("accuracy")),
            ]);
        }
    }
    sec.table(
        &["training data", "test-time purification", "melanoma AUC", "SK AUC", "mean AUC", "balanced acc.", "accuracy"],
        rows,
    );
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
            files(out, &format!("vbp/{v}"), handoff::OVERLAY, 6).into_iter().map(|p| (p, v.to_string())).collect();
        sec.images_row(row);
    }

    // Times.
    let sec = rep.section("Stage times");
    let rows =
        run.order.iter().filter_map(|s| run.record(s).map(|r| vec![s.clone(), format!("{:.1}", r.seconds)])).collect();
    sec.table(&["stage", "seconds"], rows);

    let path = out.join("report.html");
    rep.write(&path)?;
    Ok(path)
}
