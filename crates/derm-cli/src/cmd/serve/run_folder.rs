//! Browsing the run folder: the report's sections, per-image segmentation results sorted by
//! Jaccard (worst first), GAN sample grids, ROC curves and training curves.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::api::ApiError;
use super::AppState;
use crate::cmd::common;

/// Pipeline stages in their order (others found in the folder follow, sorted).
const STAGES: [&str; 8] = ["data", "hair", "segment", "hair_train", "purify", "synth", "classify", "vbp"];

#[derive(Serialize)]
struct Figure {
    url: String,
    caption: String,
}

#[derive(Serialize)]
struct SegImage {
    id: String,
    jaccard: f64,
    dice: f64,
    overlay: String,
}

fn url(rel: &str) -> String {
    format!("/run/{rel}")
}

/// Sorted names of the files in `root/rel` that end with `suffix`.
fn list(root: &Path, rel: &str, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join(rel))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|f| f.ends_with(suffix) && !f.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn subdirs(root: &Path, rel: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join(rel))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|f| !f.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Minimal unescaping of the report's headings (it escapes &, <, >, " and ').
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'").replace("&amp;", "&")
}

/// The `(anchor, heading)` of each `<section id="..."><h2>...</h2>` of the report.
fn report_sections(html: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find("<section id=\"") {
        rest = &rest[i + 13..];
        let Some(q) = rest.find('"') else { break };
        let anchor = rest[..q].to_string();
        rest = &rest[q..];
        let (Some(a), Some(b)) = (rest.find("<h2>"), rest.find("</h2>")) else { break };
        if b > a {
            out.push((anchor, unescape(&rest[a + 4..b])));
        }
        rest = &rest[b + 5..];
    }
    out
}

/// `(id, jaccard, dice)` of each line of `segment/eval/per_image.csv` (none where it is missing
/// or unreadable).
fn per_image(root: &Path) -> Vec<(String, f64, f64)> {
    derm_segment::PerImageScores::read(&root.join("segment/eval/per_image.csv"))
        .map(|s| s.ids.into_iter().zip(s.jaccard).zip(s.dice).map(|((id, j), d)| (id, j, d)).collect())
        .unwrap_or_default()
}

/// The test-set folder of the run: the data stage's record names it; else `data/test`.
fn test_dir(root: &Path) -> PathBuf {
    derm_core::fsutil::read_json::<Value>(&root.join("data/record.json"))
        .ok()
        .and_then(|r| r["metrics"]["test"].as_str().map(PathBuf::from))
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| root.join("data/test"))
}

fn summarise(root: &Path) -> Value {
    let report = root.join("report.html");
    let sections: Vec<Value> = std::fs::read_to_string(&report)
        .map(|h| report_sections(&h))
        .unwrap_or_default()
        .into_iter()
        .map(|(a, t)| json!({ "anchor": a, "title": t, "url": format!("/run/report.html#{a}") }))
        .collect();

    let mut names: Vec<String> =
        subdirs(root, ".").into_iter().filter(|d| root.join(d).join("record.json").is_file()).collect();
    names.sort_by_key(|n| (STAGES.iter().position(|s| s == n).unwrap_or(STAGES.len()), n.clone()));
    let stages: Vec<Value> = names
        .iter()
        .map(|n| {
            let rec: Value = derm_core::fsutil::read_json(&root.join(n).join("record.json")).unwrap_or(Value::Null);
            json!({ "stage": n, "seconds": rec.get("seconds"), "record": url(&format!("{n}/record.json")) })
        })
        .collect();

    let mut seg: Vec<(String, f64, f64)> = per_image(root);
    seg.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    let seg_images: Vec<SegImage> = seg
        .into_iter()
        .map(|(id, jaccard, dice)| SegImage { overlay: format!("/api/run/overlay/{id}"), id, jaccard, dice })
        .collect();
    let seg_summary: Value = derm_core::fsutil::read_json::<Value>(&root.join("segment/eval/metrics.json"))
        .map(|m| m["summary"].clone())
        .unwrap_or(Value::Null);

    let mut gan = Vec::new();
    for class in subdirs(root, "synth/model") {
        let rel = format!("synth/model/{class}/samples");
        if let Some(last) = list(root, &rel, ".png").pop() {
            gan.push(Figure {
                url: url(&format!("{rel}/{last}")),
                caption: format!("{class}: samples at the end of training"),
            });
        }
    }
    for (f, cap) in [
        ("synth/samples/novelty_hist.png", "nearest-training-image MSE of each generated image"),
        ("synth/samples/novelty_pairs.png", "generated (left) and nearest real image"),
    ] {
        if root.join(f).is_file() {
            gan.push(Figure { url: url(f), caption: cap.into() });
        }
    }

    let mut roc = Vec::new();
    for variant in subdirs(root, "classify") {
        for eval in subdirs(root, &format!("classify/{variant}")).into_iter().filter(|e| e.starts_with("eval")) {
            for f in ["roc.png", "confusion.png"] {
                let rel = format!("classify/{variant}/{eval}/{f}");
                if root.join(&rel).is_file() {
                    let tag = match eval.as_str() {
                        "eval_ttp" => "test-time purification on",
                        "eval_plain" => "test-time purification off",
                        other => other,
                    };
                    roc.push(Figure {
                        url: url(&rel),
                        caption: format!("{variant}, {tag}: {}", f.trim_end_matches(".png")),
                    });
                }
            }
        }
    }

    let mut curves = Vec::new();
    for stage in ["segment", "purify"] {
        let rel = format!("{stage}/model/loss_curve.png");
        if root.join(&rel).is_file() {
            curves.push(Figure { url: url(&rel), caption: format!("{stage}: training loss") });
        }
    }
    for variant in subdirs(root, "classify") {
        let rel = format!("classify/{variant}/loss_curve.png");
        if root.join(&rel).is_file() {
            curves.push(Figure { url: url(&rel), caption: format!("classify {variant}: training loss") });
        }
    }

    let mut vbp = Vec::new();
    for variant in subdirs(root, "vbp") {
        for f in list(root, &format!("vbp/{variant}"), derm_data::handoff::OVERLAY).into_iter().take(6) {
            vbp.push(Figure { url: url(&format!("vbp/{variant}/{f}")), caption: variant.clone() });
        }
    }

    json!({
        "root": root,
        "report": if report.is_file() { Value::String(url("report.html")) } else { Value::Null },
        "sections": sections,
        "stages": stages,
        "segmentation": { "summary": seg_summary, "images": seg_images },
        "gan": gan,
        "roc": roc,
        "curves": curves,
        "vbp": vbp,
    })
}

/// `GET /api/run`: what the run folder holds.
pub(crate) async fn summary(State(st): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let root = st.run_root.clone();
    tokio::task::spawn_blocking(move || summarise(&root))
        .await
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the run folder: {e}")))
}

fn content_type(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "html" => "text/html; charset=utf-8",
        "json" => "application/json",
        "csv" => "text/csv; charset=utf-8",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => return None,
    })
}

/// A path inside the run folder from a URL path: plain names only (no `..`, no root, no hidden
/// files).
fn resolve(root: &Path, rel: &str) -> Option<PathBuf> {
    let rel_path = Path::new(rel);
    let plain = rel_path.components().all(|c| match c {
        Component::Normal(n) => n.to_str().map(|s| !s.starts_with('.') && !s.contains('\\')).unwrap_or(false),
        _ => false,
    });
    if !plain || rel.is_empty() {
        return None;
    }
    // Links are followed: a run folder made from a real data set links its images in.
    let p = root.join(rel_path);
    p.is_file().then_some(p)
}

/// `GET /run/<path>`: a file of the run folder (images, the report, JSON and CSV).
pub(crate) async fn file(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(rel): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let nf = || ApiError::new(StatusCode::NOT_FOUND, "no such file in the run folder");
    let path = resolve(&st.run_root, &rel).ok_or_else(nf)?;
    let ctype = content_type(&path).ok_or_else(nf)?;
    let bytes = super::api::read_file(path).await.map_err(|_| nf())?;
    Ok(([(header::CONTENT_TYPE, ctype), (header::CACHE_CONTROL, "no-cache")], bytes).into_response())
}

fn find_image(dir: &Path, id: &str) -> Option<PathBuf> {
    derm_core::image_io::IMAGE_EXTENSIONS.iter().map(|e| dir.join(format!("{id}.{e}"))).find(|p| p.is_file())
}

/// The overlay of one test image: the prediction in green, the truth in red, the Jaccard on top.
fn render_overlay(root: &Path, id: &str) -> Result<Vec<u8>, ApiError> {
    let nf = |what: &str| ApiError::new(StatusCode::NOT_FOUND, format!("no {what} for {id} in the run folder"));
    let pre = root.join(format!("segment/eval/overlay_{id}.png"));
    if pre.is_file() {
        return std::fs::read(&pre).map_err(|_| nf("overlay"));
    }
    let test = test_dir(root);
    let img_path = find_image(&test.join("images"), id).ok_or_else(|| nf("test image"))?;
    let pred_path = root.join("segment/test_masks").join(derm_data::handoff::segmentation(id));
    if !pred_path.is_file() {
        return Err(nf("predicted mask"));
    }
    let bad = |e: derm_core::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let img = derm_core::image_io::load_rgb(&img_path).map_err(bad)?;
    let pred = derm_core::image_io::load_mask(&pred_path, None).map_err(bad)?;
    let truth = match derm_data::handoff::find_mask(&test.join("masks"), id) {
        Some(p) => Some(derm_core::image_io::load_mask(&p, None).map_err(bad)?),
        None => None,
    };
    let mut out = common::mask_overlay(&img, &pred, truth.as_ref());
    if let Some((_, j, _)) = per_image(root).into_iter().find(|(i, _, _)| i == id) {
        let px = (out.height() as f32 / 12.0).max(10.0);
        derm_visual::plot::draw_text(&mut out, 4, 4, px, &format!("J = {j:.3}"), [255, 255, 255]);
    }
    let mut buf = Vec::new();
    out.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the overlay: {e}")))?;
    Ok(buf)
}

/// `GET /api/run/overlay/<id>`: a segmentation overlay of one test image.
pub(crate) async fn overlay(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let ok = !id.is_empty()
        && !id.starts_with('.')
        && id.len() <= 200
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no such image id"));
    }
    let root = st.run_root.clone();
    let png = tokio::task::spawn_blocking(move || render_overlay(&root, &id))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering the overlay: {e}")))??;
    Ok(([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "private, max-age=600")], png).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_sections_are_read_from_the_html() {
        let html = "<nav>..</nav><section id=\"s1\">\n<h2>Data &amp; more</h2>\n<p>x</p></section>\n\
                    <section id=\"s2\">\n<h2>Segmentation</h2>\n</section>";
        let s = report_sections(html);
        assert_eq!(s, vec![("s1".into(), "Data & more".into()), ("s2".into(), "Segmentation".into())]);
    }

    #[test]
    fn paths_outside_the_run_folder_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        std::fs::write(root.join("a.png"), b"x").unwrap();
        std::fs::write(root.join(".hidden.png"), b"x").unwrap();
        assert!(resolve(&root, "a.png").is_some());
        assert!(resolve(&root, "../a.png").is_none());
        assert!(resolve(&root, "/etc/passwd").is_none());
        assert!(resolve(&root, ".hidden.png").is_none());
        assert!(resolve(&root, "missing.png").is_none());
        assert!(resolve(&root, "").is_none());
    }
}
