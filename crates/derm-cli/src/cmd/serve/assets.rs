//! The page's HTML, CSS and JavaScript, embedded in the binary (no CDN: works offline).

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::api::ApiError;

const INDEX_HTML: &str = include_str!("../../../assets/serve/index.html");
const APP_JS: &str = include_str!("../../../assets/serve/app.js");
const STYLE_CSS: &str = include_str!("../../../assets/serve/style.css");

/// `GET /`: the page.
pub(crate) async fn index() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], INDEX_HTML)
        .into_response()
}

/// `GET /assets/<file>`: the script and the style sheet.
pub(crate) async fn asset(Path(file): Path<String>) -> Response {
    let (ctype, body) = match file.as_str() {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "style.css" => ("text/css; charset=utf-8", STYLE_CSS),
        _ => return ApiError::new(StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    ([(header::CONTENT_TYPE, ctype), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}
