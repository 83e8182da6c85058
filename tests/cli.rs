//! End-to-end tests of the `derm` binary on phantoms in a temporary folder: the stages chain
//! through folders, and bad input gets a clear error naming the file, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn derm(args: &[&str]) -> Output {
    Command::new(derm_tests::derm_bin()).args(["-q", "--seed", "3"]).args(args).output().expect("derm runs")
}

fn ok(args: &[&str]) -> String {
    let o = derm(args);
    assert!(o.status.success(), "derm {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(args: &[&str]) -> String {
    let o = derm(args);
    assert!(!o.status.success(), "derm {args:?} should fail");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "derm {args:?} panicked: {e}");
    e
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// `derm vbp` of `model` on the images of `input` into `out`, with `extra` options: its JSON summary.
fn vbp_json(model: &Path, input: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["vbp", "--model", p(model), "--input", p(input), "--json", "--out", p(out)];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&args)).unwrap()
}

#[test]
fn phantoms_hair_segment_vbp_chain_through_folders() {
    let d = tempfile::tempdir().unwrap();
    let ph = d.path().join("ph");
    ok(&["phantom", "--count", "24", "--size", "48", "--balanced", "--out", p(&ph)]);
    let check: serde_json::Value = serde_json::from_str(&ok(&["data", "check", "--root", p(&ph), "--json"])).unwrap();
    assert_eq!(check["splits"][0]["images"], 24);

    let hair = d.path().join("hair");
    let images = ph.join("images");
    let masks = ph.join("masks");
    ok(&["hair", "--input", p(&images), "--lesion-masks", p(&masks), "--out", p(&hair), "--json"]);
    assert!(hair.join("phantom_3_000000_occlusion.png").exists());
    assert!(hair.join("phantom_3_000000_clean.png").exists());

    // The purifier trains on the phantoms' hairy images against their clean versions; its last
    // line says what it trained.
    let pur = d.path().join("pur");
    let args = ["purify", "train", "--root", p(&ph), "--size", "32", "--epochs", "1", "--batch", "4", "--out", p(&pur)];
    let trained = ok(&args);
    let last = trained.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("trained a partial-convolution U-Net, small preset (widths [32, 64, 128, 128]"),
        "{trained}"
    );
    assert!(pur.join("best/model.safetensors").exists() || pur.join("last/model.safetensors").exists());

    let seg = d.path().join("seg");
    let trained = ok(&[
        "segment",
        "train",
        "--root",
        p(&ph),
        "--size",
        "32",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--lr",
        "0.003",
        "--out",
        p(&seg),
    ]);
    assert!(seg.join("best/model.safetensors").exists() && seg.join("history.json").exists());
    let last = trained.lines().last().unwrap_or_default();
    assert!(last.starts_with("trained a dilated U-Net, medium preset (widths [24, 48, 96]"), "{trained}");
    let eval: serde_json::Value =
        serde_json::from_str(&ok(&["segment", "eval", "--model", p(&seg), "--root", p(&ph), "--json"])).unwrap();
    let j = eval["summary"]["jaccard_mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&j));
    // Two evaluations of the same images (the eight views, one view) compare paired by id.
    let (views, one) = (d.path().join("eval_views"), d.path().join("eval_one"));
    ok(&["segment", "eval", "--model", p(&seg), "--root", p(&ph), "--out", p(&views)]);
    ok(&["segment", "eval", "--model", p(&seg), "--root", p(&ph), "--tta", "false", "--out", p(&one)]);
    let c: serde_json::Value =
        serde_json::from_str(&ok(&["segment", "compare", p(&views), p(&one), "--resamples", "50", "--json"])).unwrap();
    let m = &c["comparison"]["metrics"];
    assert_eq!((m[0]["metric"].as_str(), m[0]["resamples"].as_u64()), (Some("per-image Jaccard"), Some(50)), "{c}");
    let (base, other) = (m[0]["base"].as_f64().unwrap(), m[0]["other"].as_f64().unwrap());
    assert!((base - j).abs() < 1e-5 && (m[0]["difference"].as_f64().unwrap() - (other - base)).abs() < 1e-12, "{c}");
    let table = ok(&["segment", "compare", p(&views), p(&views.join("per_image.csv"))]);
    assert!(table.contains("images paired by id") && table.contains("Dice"), "{table}");
    let e = err(&["segment", "compare", p(&views), p(&ph.join("labels.csv"))]);
    assert!(e.contains("labels.csv") && e.contains("missing column"), "{e}");
    let pred = d.path().join("pred");
    ok(&["segment", "predict", "--model", p(&seg), "--input", p(&images), "--out", p(&pred)]);
    assert!(pred.join("phantom_3_000001_segmentation.png").exists());

    let sal = d.path().join("vbp");
    let v = vbp_json(&seg, &images, &sal, &["--lesion-masks", p(&masks), "--limit", "3"]);
    assert_eq!(v["images"], 3);
    assert!(sal.join("phantom_3_000000_overlay.png").exists());

    // A checkpoint of one stage is refused by another, naming what it is.
    let e = err(&["classify", "predict", "--model", p(&seg), "--input", p(&images)]);
    assert!(e.contains("segment"), "{e}");
    // analyze names the missing model.
    let e = err(&["analyze", p(&images.join("phantom_3_000000.png")), "--models", p(d.path())]);
    assert!(e.contains("no segment model"), "{e}");
}

#[test]
fn bad_inputs_get_errors_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let imgs = d.path().join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::write(imgs.join("broken.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let e = err(&["hair", "--input", p(&imgs.join("broken.png")), "--out", p(&d.path().join("o"))]);
    assert!(e.contains("broken.png"), "{e}");

    let e = err(&["segment", "eval", "--model", p(&d.path().join("nothing")), "--root", p(d.path())]);
    assert!(e.contains("nothing"), "{e}");

    // Asking for a device this build or machine lacks is an error, never a silent fall-back to
    // the CPU (a CPU build names the feature; a CUDA build without a GPU names the driver).
    let e = err(&["--device", "cuda", "segment", "predict", "--model", "m", "--input", "i", "--out", "o"]);
    assert!(e.contains("--features cuda") || e.contains("NVIDIA") || e.contains("CUDA"), "{e}");

    // A data set whose label table lacks a column.
    let ph = d.path().join("ph");
    ok(&["phantom", "--count", "4", "--size", "32", "--out", p(&ph)]);
    std::fs::write(ph.join("labels.csv"), "image_id,melanoma\nphantom_3_000000,0\n").unwrap();
    let e = err(&["segment", "train", "--root", p(&ph), "--out", p(&d.path().join("run"))]);
    assert!(e.contains("labels.csv") && e.contains("seborrheic_keratosis"), "{e}");
}

/// The classifier's lesion-mask loss trains by default where the data set has masks (and is
/// saved with the model, which then predicts from images alone); on a data set without masks it
/// is off, and an explicit `--aux-mask-weight` (or an option that trains beside it) there is an
/// error saying why.
#[test]
fn the_lesion_mask_loss_is_on_with_masks_and_refused_without_them_when_asked_for() {
    let d = tempfile::tempdir().unwrap();
    let ph = d.path().join("ph");
    ok(&["phantom", "--count", "16", "--size", "40", "--balanced", "--out", p(&ph)]);
    let args = |out: &Path| -> Vec<String> {
        let a =
            ["classify", "train", "--root", p(&ph), "--width", "8", "--size", "32", "--epochs", "1", "--batch", "8"];
        a.iter().map(|s| s.to_string()).chain(["--out".into(), p(out).into()]).collect()
    };
    let train = |out: &Path, extra: &[&str]| {
        let mut a = args(out);
        a.extend(extra.iter().map(|s| s.to_string()));
        derm(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let with = d.path().join("with");
    let o = train(&with, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("lesion-mask loss on layer3 (weight 1)"), "{o:?}");
    let cfg = std::fs::read_to_string(with.join("last/config.json")).unwrap();
    assert!(cfg.contains("\"aux_mask_weight\": 1.0"), "{cfg}");
    let images = ph.join("images");
    let pred = ok(&["classify", "predict", "--model", p(&with), "--input", p(&images)]);
    assert!(pred.lines().count() >= 16, "{pred}");
    // Its evaluations with and without the views compare paired by id.
    let (views, one) = (d.path().join("eval_views"), d.path().join("eval_one"));
    ok(&["classify", "eval", "--model", p(&with), "--root", p(&ph), "--out", p(&views)]);
    ok(&["classify", "eval", "--model", p(&with), "--root", p(&ph), "--tta", "false", "--out", p(&one)]);
    let c: serde_json::Value =
        serde_json::from_str(&ok(&["classify", "compare", p(&views), p(&one), "--seed", "4", "--json"])).unwrap();
    let m = &c["comparison"]["metrics"];
    assert!(m[0]["metric"].as_str().unwrap().starts_with("mean AUC"), "{c}");
    assert_eq!((c["comparison"]["bootstrap"]["seed"].as_u64(), c["comparison"]["items"].as_u64()), (Some(4), Some(16)));
    let e = err(&["classify", "compare", p(&views), p(&one), "--level", "1.5"]);
    assert!(e.contains("--level"), "{e}");
    // A space-to-depth stem trains, and VisualBackProp carries its saliency back to the whole view.
    let s2d = d.path().join("s2d");
    let o = train(&s2d, &["--space-to-depth", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resnet18-w8-s2d2"), "{o:?}");
    let sal = d.path().join("vbp_s2d");
    let v = vbp_json(&s2d, &images, &sal, &["--limit", "2"]);
    assert_eq!(v["images"], 2);
    let first = std::fs::read_dir(&sal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| f.to_string_lossy().ends_with("_saliency.png"))
        .expect("a saliency map");
    let map = image::open(first).unwrap().to_luma8();
    assert_eq!(map.dimensions(), (32, 32));
    assert!(map.pixels().any(|q| q[0] == 255), "a normalised map reaches 1");

    std::fs::remove_dir_all(ph.join("masks")).unwrap();
    let without = d.path().join("without");
    let o = train(&without, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("lesion-mask"), "{o:?}");
    let cfg = std::fs::read_to_string(without.join("last/config.json")).unwrap();
    assert!(cfg.contains("\"aux_mask_weight\": 0.0"), "{cfg}");
    let o = train(&d.path().join("asked"), &["--aux-mask-weight", "1"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--aux-mask-weight 1") && e.contains("lesion mask"), "{e}");
    // So are the options that train only beside it, when asked for.
    for extra in [&["--aux-descriptor-weight", "1"][..], &["--aux-mask-second-stage", "layer2"]] {
        let o = train(&d.path().join("asked_beside"), extra);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(extra[0]) && e.contains("lesion mask"), "{e}");
    }
}
