//! `derm serve` against a phantom-trained tiny run, over real HTTP on an ephemeral loopback
//! port: the analysis API (status codes, JSON fields, outputs), bad uploads and the limits, the
//! run browser, and the bounded queue.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Cursor;
use std::process::Command;

use derm_tests::serve as support;
use support::{analyze, get, multipart, request, tiny_run, Server};

fn png_bytes(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut buf = Vec::new();
    img.write_to(&mut Cursor::new(&mut buf), format).unwrap();
    buf
}

fn error_of(r: &support::Response) -> String {
    r.json()["error"].as_str().unwrap_or_default().to_string()
}

#[test]
fn api_analyses_uploads_and_serves_every_output() {
    let d = tempfile::tempdir().unwrap();
    let (run, ph) = tiny_run(d.path(), 24, 48, 32);
    let server = Server::start(&run, &["--keep", "3"]);
    let a = server.addr;

    // The page and its assets are embedded and served.
    let page = get(a, "/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page.text().contains("type=\"file\"") && page.text().contains("/assets/app.js"));
    let js = get(a, "/assets/app.js");
    assert_eq!(js.status, 200);
    assert!(js.text().contains("/api/analyze"));
    assert_eq!(get(a, "/assets/style.css").status, 200);
    assert_eq!(get(a, "/assets/nothing.js").status, 404);
    let info = get(a, "/api/info").json();
    assert_eq!(info["classes"].as_array().unwrap().len(), 3);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    assert_eq!(info["limits"]["jobs"].as_u64().unwrap() as usize, cores.min(4));

    let img_path = ph.join("images/phantom_3_000004.png");
    let r = analyze(a, "phantom_3_000004.png", &png_bytes(&img_path));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").unwrap().starts_with("application/json"));
    let j = r.json();
    assert_eq!(j["image"], "phantom_3_000004.png");
    assert_eq!(j["size"], serde_json::json!([48, 48]));
    let classes = j["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 3);
    let sum: f64 = classes.iter().map(|c| c["probability"].as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
    // The predicted class is the one the model's operating point picks: the most probable after
    // the decision weights chosen on validation (classify train chooses them by default) scale
    // each class's probability.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("classify/both/best/config.json")).unwrap()).unwrap();
    let names: Vec<&str> = cfg["classes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let weights = cfg["decision_weights"].as_array().unwrap();
    assert_eq!(weights.len(), names.len(), "an operating point was chosen and saved");
    let weighted = |c: &serde_json::Value| {
        let k = names.iter().position(|n| *n == c["class"].as_str().unwrap()).unwrap();
        c["probability"].as_f64().unwrap() * weights[k].as_f64().unwrap()
    };
    let best = classes.iter().max_by(|x, y| weighted(x).total_cmp(&weighted(y))).unwrap();
    assert_eq!(j["predicted_class"], best["class"]);
    for c in classes {
        assert_eq!(j["probabilities"][c["class"].as_str().unwrap()], c["probability"]);
    }
    for k in ["occluded_fraction", "lesion_fraction", "seconds", "queued_seconds"] {
        let v = j[k].as_f64().unwrap_or(-1.0);
        assert!(v >= 0.0, "{k} = {}", j[k]);
    }
    // Every output is served, as a PNG of the right size.
    let files = j["files"].as_object().unwrap();
    assert_eq!(files.len(), 7);
    for (name, url) in files {
        let f = get(a, url.as_str().unwrap());
        assert_eq!(f.status, 200, "{name}");
        assert_eq!(f.header("content-type"), Some("image/png"));
        let img = image::load_from_memory(&f.body).unwrap();
        if ["input.png", "occlusion.png", "purified.png", "lesion_mask.png", "lesion_overlay.png"]
            .contains(&name.as_str())
        {
            assert_eq!((img.width(), img.height()), (48, 48), "{name}");
        }
    }
    let rec = get(a, j["analysis_json"].as_str().unwrap());
    assert_eq!(rec.status, 200);
    let rec = rec.json();
    assert_eq!(rec["image"], "phantom_3_000004.png");
    assert_eq!(rec["probabilities"], j["probabilities"]);
    assert_eq!(rec["files"].as_array().unwrap().len(), 7);

    // `derm analyze` shares the analysis: the same probabilities and the same files.
    let out = d.path().join("cli_analysis");
    let o = Command::new(support::derm_bin())
        .args(["-q", "analyze", img_path.to_str().unwrap(), "--models", run.to_str().unwrap(), "--json", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for c in classes {
        let name = c["class"].as_str().unwrap();
        let (p1, p2) = (cli["probabilities"][name].as_f64().unwrap(), c["probability"].as_f64().unwrap());
        assert!((p1 - p2).abs() < 1e-5, "{name}: analyze {p1} serve {p2}");
    }
    for f in rec["files"].as_array().unwrap() {
        assert!(out.join(f.as_str().unwrap()).is_file(), "{f}");
    }
    assert!(out.join("analysis.json").is_file());

    // JPEG, BMP and TIFF uploads; names are reduced to a safe file name.
    let img = image::open(&img_path).unwrap().to_rgb8();
    for (name, fmt) in [
        ("../../x y.jpg", image::ImageFormat::Jpeg),
        ("p.bmp", image::ImageFormat::Bmp),
        ("p.tiff", image::ImageFormat::Tiff),
    ] {
        let r = analyze(a, name, &encode(&img, fmt));
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert!(!r.json()["image"].as_str().unwrap().contains('/'));
    }
    // Only the newest three analyses are kept: the first one's files are gone, with a reason.
    let old = get(a, files["input.png"].as_str().unwrap());
    assert_eq!(old.status, 404);
    assert!(error_of(&old).contains("newest 3"), "{}", old.text());
    assert_eq!(get(a, "/api/results/000001/secret.txt").status, 404);
    assert_eq!(get(a, "/api/results/..%2F..%2Fetc/input.png").status, 404);
    assert_eq!(get(a, "/no/such/page").status, 404);
}

#[test]
fn bad_uploads_get_clear_4xx_answers_and_never_stop_the_server() {
    let d = tempfile::tempdir().unwrap();
    let (run, ph) = tiny_run(d.path(), 12, 48, 32);
    let server = Server::start(&run, &["--max-upload-mb", "0.25", "--max-megapixels", "1"]);
    let a = server.addr;
    let good = png_bytes(&ph.join("images/phantom_3_000000.png"));

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("notes.txt", b"these are not the pixels you are looking for".to_vec(), 415, "not an image"),
        ("anim.gif", b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!".to_vec(), 415, "not supported"),
        ("truncated.png", good[..good.len() / 2].to_vec(), 422, "truncated"),
        ("header.png", good[..20].to_vec(), 422, "png"),
        ("empty.png", Vec::new(), 400, "empty"),
        // A BMP header of 2000x2000 pixels (4 megapixels): refused before decoding.
        ("huge.bmp", bmp_header(2000, 2000), 413, "megapixels"),
        // Bigger than the upload limit.
        ("big.png", vec![0x89; 400 * 1024], 413, "limit"),
    ];
    for (name, bytes, status, msg) in cases {
        let r = analyze(a, name, &bytes);
        assert_eq!(r.status, status, "{name}: {}", r.text());
        let e = error_of(&r);
        assert!(e.to_lowercase().contains(msg), "{name}: {e}");
    }
    // Far over the limit (the body limit, before any field is read).
    let (ct, body) = multipart("image", "x.png", &vec![0u8; 3 << 20]);
    let r = request(a, "POST", "/api/analyze", Some(&ct), &body);
    assert_eq!(r.status, 413, "{}", r.text());

    // Wrong field name, no multipart at all, wrong method.
    let (ct, body) = multipart("file", "x.png", &good);
    let r = request(a, "POST", "/api/analyze", Some(&ct), &body);
    assert_eq!(r.status, 400);
    assert!(error_of(&r).contains("`image`"), "{}", r.text());
    let r = request(a, "POST", "/api/analyze", Some("application/json"), b"{}");
    assert_eq!(r.status, 400);
    assert!(error_of(&r).contains("multipart"), "{}", r.text());
    let r = request(a, "POST", "/api/analyze", Some("multipart/form-data; boundary=zzz"), b"--zzz\r\ngarbage");
    assert!((400..500).contains(&r.status), "{}", r.text());
    assert_eq!(get(a, "/api/analyze").status, 405);

    // Still serving.
    let r = analyze(a, "ok.png", &good);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut child = server;
    assert!(child.child.try_wait().unwrap().is_none(), "the server exited");
}

fn bmp_header(w: u32, h: u32) -> Vec<u8> {
    let size = w * h * 3;
    let mut b = b"BM".to_vec();
    b.extend_from_slice(&(54 + size).to_le_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(&54u32.to_le_bytes());
    b.extend_from_slice(&40u32.to_le_bytes());
    b.extend_from_slice(&(w as i32).to_le_bytes());
    b.extend_from_slice(&(h as i32).to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&24u16.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&[0; 16]);
    b.extend_from_slice(&[0; 64]);
    b
}

#[test]
fn run_folder_is_browsed_worst_jaccard_first() {
    let d = tempfile::tempdir().unwrap();
    let (run, ph) = tiny_run(d.path(), 12, 48, 32);
    let server = Server::start(&run, &[]);
    let a = server.addr;
    let j = get(a, "/api/run").json();
    let imgs = j["segmentation"]["images"].as_array().unwrap();
    assert_eq!(imgs.len(), 12);
    let js: Vec<f64> = imgs.iter().map(|i| i["jaccard"].as_f64().unwrap()).collect();
    assert!(js.windows(2).all(|w| w[0] <= w[1]), "not worst first: {js:?}");
    assert!(j["segmentation"]["summary"]["jaccard_mean"].is_number());
    // Overlays: pre-rendered by `segment eval` for the first images, drawn on request for the rest.
    for i in imgs {
        let r = get(a, i["overlay"].as_str().unwrap());
        assert_eq!(r.status, 200, "{}", r.text());
        let img = image::load_from_memory(&r.body).unwrap();
        assert_eq!((img.width(), img.height()), (48, 48));
    }
    assert_eq!(get(a, "/api/run/overlay/no_such_image").status, 404);
    assert_eq!(get(a, "/api/run/overlay/..").status, 404);
    // Files of the run folder, and nothing outside it.
    let csv = get(a, "/run/segment/eval/per_image.csv");
    assert_eq!(csv.status, 200);
    assert!(csv.text().starts_with("id,jaccard"));
    assert_eq!(get(a, "/run/segment/model/best/model.safetensors").status, 404);
    assert_eq!(get(a, "/run/../../../etc/passwd").status, 404);
    assert_eq!(get(a, "/run/%2E%2E/%2E%2E/etc/passwd").status, 404);
    assert_eq!(get(a, "/run/data/test/images/phantom_3_000000.png").status, 200);

    // A results folder kept across restarts: ids go on from the earlier analyses, which stay.
    let img = std::fs::read(ph.join("images/phantom_3_000003.png")).unwrap();
    let first = analyze(a, "a.png", &img).json();
    assert_eq!(first["id"], "000001");
    drop(server);
    let server = Server::start(&run, &[]);
    let second = analyze(server.addr, "b.png", &img).json();
    assert_eq!(second["id"], "000002");
    assert_eq!(get(server.addr, first["files"]["purified.png"].as_str().unwrap()).status, 200);
}

#[test]
fn concurrent_uploads_are_queued_or_refused_never_dropped() {
    let d = tempfile::tempdir().unwrap();
    let (run, ph) = tiny_run(d.path(), 12, 160, 32);
    let server = Server::start(&run, &["--jobs", "1", "--queue", "2"]);
    let a = server.addr;
    let bytes = std::sync::Arc::new(png_bytes(&ph.join("images/phantom_3_000001.png")));
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let b = bytes.clone();
            std::thread::spawn(move || analyze(a, &format!("c{i}.png"), &b))
        })
        .collect();
    let answers: Vec<support::Response> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = answers.iter().filter(|r| r.status == 200).count();
    for r in &answers {
        assert!(r.status == 200 || r.status == 503, "{} {}", r.status, r.text());
        if r.status == 503 {
            assert!(error_of(r).contains("busy"), "{}", r.text());
        }
    }
    assert!(ok >= 1, "no analysis succeeded");
    let info = get(a, "/api/info").json();
    assert_eq!(info["load"]["running"], 0);
    assert_eq!(info["load"]["waiting"], 0);
    assert_eq!(info["load"]["served"].as_u64().unwrap() as usize, ok);
}

#[test]
fn serve_without_models_says_what_is_missing() {
    let d = tempfile::tempdir().unwrap();
    let o =
        Command::new(support::derm_bin()).args(["serve", "--port", "0", "--models"]).arg(d.path()).output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no segment model") && !e.contains("panicked"), "{e}");
}
