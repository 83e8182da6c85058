//! The pipeline's `report.html`: one self-contained page gathering every stage's figures and
//! numbers, next to the paper's reference figures.

use derm_data::handoff;
use std::path::{Path, PathBuf};

use derm_visual::report::Report;

use crate::contract::{
    ClassifyMetrics, DataMetrics, HairMetrics, PurifyMetrics, SegmentMetrics, SynthMetrics, VbpMetrics,
};
use crate::pipeline::Run;

/// Paper reference figures (ISIC 2017 challenge winners, as Bisla et al. compare against).
const REF_MEL_AUC: f64 = 0.874;
const REF_MEAN_AUC: f64 = 0.911;
const REF_JACCARD: f64 = 0.765;

/// A measured value; `None` where the stage cannot measure it (said where it happens).
fn num(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "n/a".into())
}

/// The name of a report's melanoma class and its AUC.
fn melanoma_auc(r: &derm_classify::ClassificationReport) -> (String, Option<f64>) {
    let k = r.melanoma_class;
    (r.classes.get(k).cloned().unwrap_or_default(), r.auc.get(k).copied().flatten())
}

/// The summary table next to the paper: segmentation Jaccard, and the AUC of the data set's
/// melanoma class (from its manifest, through the classifier's report) and the mean AUC of the
/// baseline and the full system.
fn results_rows(seg: &SegmentMetrics, cls: &ClassifyMetrics) -> anyhow::Result<Vec<Vec<String>>> {
    let variant = |v: &str| cls.get(v).ok_or_else(|| anyhow::anyhow!("the classify record has no variant {v:?}"));
    let base = &variant("baseline")?.plain.report;
    let both = &variant("both")?.test_time_purification.report;
    let (base_name, base_auc) = melanoma_auc(base);
    let (both_name, both_auc) = melanoma_auc(both);
    Ok(vec![
        vec![
            "segmentation Jaccard (per-image mean)".into(),
            num(Some(seg.eval.summary.jaccard_mean)),
            format!("{REF_JACCARD}"),
        ],
        vec![
            "segmentation Jaccard (ISIC 2018 thresholded)".into(),
            num(Some(seg.eval.summary.jaccard_thresholded)),
            "".into(),
        ],
        vec![format!("{base_name} AUC, baseline"), num(base_auc), format!("{REF_MEL_AUC}")],
        vec!["mean AUC, baseline".into(), num(base.mean_auc), format!("{REF_MEAN_AUC}")],
        vec![format!("{both_name} AUC, full system"), num(both_auc), format!("{REF_MEL_AUC}")],
        vec!["mean AUC, full system".into(), num(both.mean_auc), format!("{REF_MEAN_AUC}")],
    ])
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
    let data: DataMetrics = run.metrics("data")?;
    let hair: HairMetrics = run.metrics("hair")?;
    let seg: SegmentMetrics = run.metrics("segment")?;
    let pur: PurifyMetrics = run.metrics("purify")?;
    let syn: SynthMetrics = run.metrics("synth")?;
    let cls: ClassifyMetrics = run.metrics("classify")?;
    let vb: VbpMetrics = run.metrics("vbp")?;

    // Summary table next to the paper.
    let sec = rep.section("Results next to the paper");
    let reference = "The reference column is the ISIC 2017 challenge winners as cited by Bisla et al.";
    sec.paragraph(&if run.data() == "phantom" {
        format!(
            "Phantom data: these numbers show that every stage trains and that its metric moves; they are not \
             comparable to ISIC results. {reference}"
        )
    } else {
        format!(
            "Real images ({}): the test part is held out from the same archive (by lesion group where the \
             manifest gives one, else by id; see Data), not the challenge's own test set, and the networks trained for the budget below, not to convergence on a GPU. \
             {reference}",
            run.data()
        )
    });
    sec.table(&["metric", "derm (this run)", "paper reference"], results_rows(&seg, &cls)?);

    // Data.
    let sec = rep.section("Data");
    sec.kv(vec![("training set", data.train.clone()), ("test set", data.test.clone())]);
    if let serde_json::Value::Object(b) = serde_json::to_value(&data.budget)? {
        sec.kv(b.iter().map(|(k, v)| (k.replace('_', " "), v.to_string())).collect());
    }
    let mut rows = Vec::new();
    for split in &data.check.splits {
        for c in &split.classes {
            rows.push(vec![
                split.split.clone(),
                c.class.clone(),
                c.found.to_string(),
                c.expected.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    sec.table(&["split", "class", "images", "expected"], rows);

    // Hair.
    let sec = rep.section("Hair and ruler masks, classic cleaning");
    match hair.scores {
        Some(h) => sec.kv(vec![
            ("pixel recall", num(Some(h.recall))),
            ("pixel precision", num(Some(h.precision))),
            ("lesion pixels wrongly marked", num(Some(h.lesion_pixels_wrongly_marked))),
        ]),
        None => sec.paragraph(
            "Real images have no drawn occlusion masks to score against (`derm hair eval` measures \
             the masks on real images with painted hairs).",
        ),
    };
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
    if let serde_json::Value::Object(s) = serde_json::to_value(seg.eval.summary)? {
        sec.kv(s.iter().map(|(k, v)| (k.replace('_', " "), num(v.as_f64()))).collect());
    }
    sec.kv(vec![("training", format!("{} steps in {:.0} s", seg.steps, seg.train_seconds))]);
    if exists(out, "segment/model/loss_curve.png") {
        sec.image("segment/model/loss_curve.png", "training loss and validation Jaccard");
    }
    sec.paragraph("Prediction in green, ground truth in red; J = per-image Jaccard.");
    sec.images_row(files(out, "segment/eval", ".png", 8).into_iter().map(|p| (p, String::new())).collect());

    // Purification.
    let sec = rep.section("Purification (partial-convolution inpainting)");
    match &pur.eval {
        Some(rows) => {
            sec.paragraph(if run.data() == "phantom" {
                "Inside the true occlusion mask, against the clean phantom:"
            } else {
                "Real images have no occlusion-free originals: each test image gets a hole shaped like another test \
                 image's occlusion mask, less its own occlusions, and the fill is scored against its own pixels \
                 there:"
            });
            sec.table(
                &["method", "hole PSNR (dB)", "hole SSIM", "ms per image"],
                rows.iter()
                    .map(|r| {
                        vec![
                            r.method.clone(),
                            num(Some(r.hole_psnr)),
                            num(Some(r.hole_ssim)),
                            num(Some(r.ms_per_image)),
                        ]
                    })
                    .collect(),
            );
        }
        None => {
            sec.paragraph("This run's record has no inpainting scores.");
        }
    }
    if exists(out, "purify/model/loss_curve.png") {
        sec.image("purify/model/loss_curve.png", "training loss");
    }
    let mut row = Vec::new();
    for img in &test_imgs {
        let id = Path::new(img).file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let pp = format!("purify/test/{}", handoff::purified(id));
        if exists(out, &pp) {
            row.push((img.clone(), format!("{id} before")));
            row.push((pp, "purified".into()));
        }
    }
    sec.images_row(row);

    // Synthesis.
    let sec = rep.section("Synthesis (DCGAN virtual patients) and novelty check");
    sec.table(
        &["class", "generated", "kept (novel)", "min MSE", "median MSE", "max MSE", "real-vs-fake accuracy"],
        syn.novelty
            .classes
            .iter()
            .map(|c| {
                let n = &c.novelty;
                vec![
                    c.class.clone(),
                    n.generated.to_string(),
                    n.kept.to_string(),
                    format!("{:.4}", n.mse_min),
                    format!("{:.4}", n.mse_median),
                    format!("{:.4}", n.mse_max),
                    num(c.real_vs_fake.as_ref().map(|r| r.test_accuracy)),
                ]
            })
            .collect(),
    );
    sec.paragraph(
        "Real-vs-fake accuracy near 0.5 means a small CNN cannot tell generated from real images of the class.",
    );
    let mut row = Vec::new();
    for class in syn.novelty.classes.iter().map(|c| c.class.as_str()) {
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
    let mut mel_name = String::from("melanoma");
    for v in ["baseline", "purified", "synthetic", "both"] {
        let Some(scores) = cls.get(v) else { anyhow::bail!("the classify record has no variant {v:?}") };
        for (tag, e) in [("off", &scores.plain.report), ("on", &scores.test_time_purification.report)] {
            let (name, auc) = melanoma_auc(e);
            mel_name = name;
            rows.push(vec![
                v.to_string(),
                tag.to_string(),
                num(auc),
                num(e.mean_auc),
                num(Some(e.balanced_accuracy)),
                num(Some(e.accuracy)),
            ]);
        }
    }
    sec.table(
        &[
            "training data",
            "test-time purification",
            &format!("{mel_name} AUC"),
            "mean AUC",
            "balanced acc.",
            "accuracy",
        ],
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
    for (v, s) in [("baseline", &vb.baseline), ("both", &vb.both)] {
        sec.kv(vec![
            (format!("{v}: saliency inside the lesion"), num(s.mean_mass_inside)),
            (format!("{v}: lesion area fraction"), num(s.mean_area_fraction)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::VariantScores;

    fn eval(classes: &[&str], melanoma: Option<usize>, auc: &[f64]) -> derm_classify::EvalSummary {
        let classes: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
        // Probabilities that give class k the AUC asked for is more than this test needs: build the
        // report, then set the AUCs it would print.
        let mut report =
            derm_classify::score(&[vec![1.0, 0.0, 0.0], vec![0.0, 0.0, 1.0]], &[0, 2], &classes, melanoma, &[]);
        report.auc = auc.iter().map(|&a| Some(a)).collect();
        derm_classify::EvalSummary {
            model: "m".into(),
            data: derm_classify::eval::DataRef { name: "ph2".into(), split: "test".into(), root: "r".into() },
            tta: false,
            tta_views: 1,
            purified_input: None,
            lesion_windows: false,
            lesion_masks: None,
            report,
        }
    }

    #[test]
    fn the_melanoma_auc_is_the_manifests_melanoma_class() {
        // PH2 lists melanoma last; its manifest gives the index through the data set.
        let ph2 = derm_data::manifest::Manifest::load("ph2").unwrap();
        let k = ph2.melanoma_index();
        assert_eq!(k, Some(2));
        let e = eval(&["common_nevus", "atypical_nevus", "melanoma"], k, &[0.11, 0.22, 0.93]);
        let cls = ClassifyMetrics::from([
            ("baseline".to_string(), VariantScores { plain: e.clone(), test_time_purification: e.clone() }),
            ("both".to_string(), VariantScores { plain: e.clone(), test_time_purification: e }),
        ]);
        let seg = SegmentMetrics {
            eval: derm_segment::EvalSummary { summary: Default::default(), worst: Vec::new(), tta_views: 1 },
            train_seconds: 1.0,
            steps: 1,
        };
        let rows = results_rows(&seg, &cls).unwrap();
        assert_eq!(rows[2], vec!["melanoma AUC, baseline".to_string(), "0.930".into(), format!("{REF_MEL_AUC}")]);
        assert_eq!(rows[4][1], "0.930");
        // A manifest that names another class (ISIC 2016 task 3's "malignant") is followed too.
        let isic16 = derm_data::manifest::Manifest::load("isic2016-task3").unwrap();
        let e = eval(&["benign", "malignant", "x"], isic16.melanoma_index(), &[0.4, 0.8, 0.5]);
        assert_eq!(e.report.melanoma_class, 1);
        // A record without the `both` variant is an error, not "n/a".
        let only = ClassifyMetrics::from([(
            "baseline".to_string(),
            VariantScores { plain: e.clone(), test_time_purification: e },
        )]);
        assert!(results_rows(&seg, &only).unwrap_err().to_string().contains("both"));
    }
}
