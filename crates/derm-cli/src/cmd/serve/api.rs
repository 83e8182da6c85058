//! The analysis API: `POST /api/analyze` (multipart field `image`), the outputs under
//! `/api/results/<id>/<file>`, and `/api/info`.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use image::ImageFormat;
use serde::Serialize;
use serde_json::json;

use super::AppState;
use crate::cmd::analyze::OUTPUT_FILES;

/// An error answered as JSON `{"error": message}` with its status.
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() && self.status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(status = %self.status, "{}", self.message);
        } else {
            tracing::info!(status = %self.status, "{}", self.message);
        }
        (self.status, Json(json!({ "error": self.message, "status": self.status.as_u16() }))).into_response()
    }
}

/// 404 for unknown paths.
pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such page or API route")
}

/// The server's models, limits and load.
pub(crate) async fn info(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let d = st.analyzer.dirs();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "device": st.device,
        "classes": st.analyzer.classes(),
        "models": { "segment": d.segment, "purify": d.purify, "classify": d.classify },
        "run": st.run_root,
        "limits": {
            "max_upload_bytes": st.max_upload,
            "max_pixels": st.max_pixels,
            "jobs": st.jobs,
            "queue": st.queue,
        },
        "load": {
            "running": st.running.load(Ordering::Relaxed),
            "waiting": st.waiting.load(Ordering::Relaxed),
            "served": st.served.load(Ordering::Relaxed),
        },
        "formats": ["png", "jpeg", "bmp", "tiff"],
    }))
}

/// Counts a request in a counter for as long as it lives (also when the client goes away).
struct Counted<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Counted<'a> {
    fn new(c: &'a std::sync::atomic::AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Counted(c)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The upload's name reduced to a safe file name.
fn safe_name(name: Option<&str>) -> String {
    let base = name.and_then(|n| n.rsplit(['/', '\\']).next()).unwrap_or("");
    let s: String =
        base.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')).take(100).collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "upload".into()
    } else {
        s
    }
}

fn mb(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Checks the upload's format and size from its header, before anything is decoded.
fn check_header(bytes: &[u8], max_pixels: u64) -> Result<(ImageFormat, u32, u32), ApiError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("cannot read the upload: {e}")))?;
    let Some(format) = reader.format() else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the upload is not an image derm reads (PNG, JPEG, BMP or TIFF expected)",
        ));
    };
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Bmp | ImageFormat::Tiff) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{format:?} images are not supported: upload PNG, JPEG, BMP or TIFF"),
        ));
    }
    let (w, h) = reader.into_dimensions().map_err(|e| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("corrupt or truncated {format:?} image: {e}"))
    })?;
    if w == 0 || h == 0 {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "the image has zero width or height"));
    }
    let px = w as u64 * h as u64;
    if px > max_pixels {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the image is {w}x{h} ({:.1} megapixels); this server takes at most {:.1} megapixels",
                px as f64 / 1e6,
                max_pixels as f64 / 1e6
            ),
        ));
    }
    Ok((format, w, h))
}

/// The answer to a successful analysis.
#[derive(Serialize)]
pub(crate) struct AnalyzeResponse {
    id: String,
    image: String,
    size: [u32; 2],
    predicted_class: Option<String>,
    /// Class name to probability.
    probabilities: BTreeMap<String, f64>,
    /// The classes in the classifier's order, with their probabilities.
    classes: Vec<ClassProbability>,
    occluded_fraction: f64,
    lesion_fraction: f64,
    /// Seconds of analysis.
    seconds: f64,
    /// Seconds the request waited for a free slot.
    queued_seconds: f64,
    /// Output file name to URL.
    files: BTreeMap<String, String>,
    /// URL of `analysis.json`.
    analysis_json: String,
}

#[derive(Serialize)]
pub(crate) struct ClassProbability {
    class: String,
    probability: f64,
}

fn multipart_error(e: axum::extract::multipart::MultipartError, max_upload: usize) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(status, format!("the upload is larger than this server's limit of {}", mb(max_upload)))
    } else {
        ApiError::new(status, format!("bad multipart upload: {}", e.body_text()))
    }
}

/// `POST /api/analyze`: the image in the multipart field `image`.
pub(crate) async fn analyze(
    State(st): State<Arc<AppState>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<AnalyzeResponse>, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{}: send the image as multipart/form-data in a field named `image`", e.body_text()),
        )
    })?;
    let mut upload: Option<(String, Vec<u8>)> = None;
    while let Some(mut field) = multipart.next_field().await.map_err(|e| multipart_error(e, st.max_upload))? {
        if field.name() != Some("image") {
            continue;
        }
        let name = safe_name(field.file_name());
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, st.max_upload))? {
            if bytes.len() + chunk.len() > st.max_upload {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the image is larger than this server's limit of {}", mb(st.max_upload)),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        upload = Some((name, bytes));
        break;
    }
    let Some((name, bytes)) = upload else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "no multipart field named `image` in the upload"));
    };
    if bytes.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the uploaded file is empty"));
    }
    let (format, _, _) = check_header(&bytes, st.max_pixels)?;

    // Wait for a slot, or refuse at once when the queue is full.
    let queued = Instant::now();
    let permit = match st.slots.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(tokio::sync::TryAcquireError::Closed) => {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"))
        }
        Err(tokio::sync::TryAcquireError::NoPermits) => {
            let waiting = Counted::new(&st.waiting);
            if st.waiting.load(Ordering::SeqCst) > st.queue {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the server is busy ({} analyses already waiting); try again in a moment", st.queue),
                ));
            }
            let p = st
                .slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"))?;
            drop(waiting);
            p
        }
    };
    let queued_seconds = queued.elapsed().as_secs_f64();

    let id = format!("{:06}", st.counter.fetch_add(1, Ordering::SeqCst) + 1);
    let dir = st.results_dir.join(&id);
    let analyzer = st.analyzer.clone();
    let st2 = st.clone();
    let name2 = name.clone();
    let dir2 = dir.clone();
    let ext = format.extensions_str().first().copied().unwrap_or("img");
    let upload_path = dir.join(format!("upload.{ext}"));
    let job = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let _permit = permit;
        let _running = Counted::new(&st2.running);
        let internal = |e: anyhow::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
        derm_core::fsutil::write_atomic(&upload_path, &bytes).map_err(|e| internal(e.into()))?;
        drop(bytes);
        let img = derm_core::image_io::load_rgb(&upload_path).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("cannot decode {name2}: {}", strip_path(&e, &upload_path)),
            )
        })?;
        let a = analyzer.analyze(img, Path::new(&name2)).map_err(internal)?;
        a.save(&dir2).map_err(internal)?;
        Ok(a.record)
    })
    .await;
    let record = match job {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the analysis failed: {e}")));
        }
    };
    remember(&st, &id);
    st.served.fetch_add(1, Ordering::Relaxed);
    tracing::info!(id = %id, image = %name, seconds = record.seconds, "analysed");

    let files = OUTPUT_FILES.iter().map(|f| (f.to_string(), format!("/api/results/{id}/{f}"))).collect();
    let ordered = st
        .analyzer
        .classes()
        .iter()
        .map(|c| ClassProbability {
            class: c.clone(),
            probability: record.probabilities.get(c).copied().unwrap_or(0.0),
        })
        .collect();
    Ok(Json(AnalyzeResponse {
        analysis_json: format!("/api/results/{id}/analysis.json"),
        id,
        image: name,
        size: record.size,
        predicted_class: record.predicted_class,
        probabilities: record.probabilities,
        classes: ordered,
        occluded_fraction: record.occluded_fraction,
        lesion_fraction: record.lesion_fraction,
        seconds: record.seconds,
        queued_seconds,
        files,
    }))
}

/// An error message without the server's temporary path in it.
fn strip_path(e: &derm_core::Error, path: &Path) -> String {
    e.to_string().replace(&format!("{}: ", path.display()), "").replace(&path.display().to_string(), "the upload")
}

/// Keeps the newest `keep` analyses and deletes older outputs.
fn remember(st: &AppState, id: &str) {
    let old: Vec<String> = match st.kept.lock() {
        Ok(mut q) => {
            q.push_back(id.to_string());
            let mut old = Vec::new();
            while q.len() > st.keep {
                if let Some(o) = q.pop_front() {
                    old.push(o);
                }
            }
            old
        }
        Err(_) => Vec::new(),
    };
    for o in old {
        let _ = std::fs::remove_dir_all(st.results_dir.join(o));
    }
}

/// `GET /api/results/<id>/<file>`: an output of an analysis.
pub(crate) async fn result_file(
    State(st): State<Arc<AppState>>,
    axum::extract::Path((id, file)): axum::extract::Path<(String, String)>,
) -> Result<Response, ApiError> {
    let valid_id = !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit());
    let known = file == "analysis.json" || OUTPUT_FILES.contains(&file.as_str());
    if !valid_id || !known {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no such result file"));
    }
    let path: PathBuf = st.results_dir.join(&id).join(&file);
    let bytes = read_file(path).await.map_err(|_| {
        ApiError::new(StatusCode::NOT_FOUND, format!("result {id} is gone (only the newest {} are kept)", st.keep))
    })?;
    let ctype = if file.ends_with(".json") { "application/json" } else { "image/png" };
    Ok((
        [
            (header::CONTENT_TYPE, ctype.to_string()),
            (header::CACHE_CONTROL, "private, max-age=3600".to_string()),
            (header::CONTENT_DISPOSITION, format!("inline; filename=\"{id}_{file}\"")),
        ],
        bytes,
    )
        .into_response())
}

/// Reads a file on a blocking thread.
pub(crate) async fn read_file(path: PathBuf) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || std::fs::read(path)).await.map_err(std::io::Error::other)?
}
