//! `derm serve`: a local web page (and JSON API) to analyse an image with a run's models and to
//! browse the run folder.
//!
//! The models load once at start. Analyses run on blocking threads, at most `--jobs` at a time;
//! up to `--queue` more wait their turn, and beyond that a request is answered 503 at once, so a
//! burst of uploads cannot exhaust memory. Uploads are capped (`--max-upload-mb`, and
//! `--max-megapixels` on the decoded size, checked from the header before decoding). The page's
//! HTML, CSS and JavaScript are embedded in the binary; nothing is fetched from elsewhere.

mod api;
mod assets;
mod run_folder;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::cmd::analyze::{Analyzer, ModelDirs};
use crate::GlobalOpts;

/// Arguments of `derm serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A pipeline run folder (with segment/model, purify/model and classify/<variant>), or a
    /// folder holding `segment`, `purify` and `classify` model folders.
    #[arg(long)]
    pub models: PathBuf,
    /// Which classifier of the run (both, baseline, purified, synthetic).
    #[arg(long, default_value = "both")]
    pub classifier: String,
    /// TCP port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on. The default is the loopback interface: only this machine can
    /// connect. Use 0.0.0.0 to expose the server to the network (it has no authentication).
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Analyses run at the same time (default: the number of cores, at most 4). Hair masking,
    /// resizing and PNG encoding are single-threaded, so two jobs on two cores serve more than one.
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Analyses that may wait for a free slot; more are answered 503 (busy).
    #[arg(long, default_value_t = 32)]
    pub queue: usize,
    /// Largest upload in MiB (larger ones are answered 413).
    #[arg(long, default_value_t = 20.0)]
    pub max_upload_mb: f64,
    /// Largest image in megapixels, read from the file header before decoding (413 above it).
    #[arg(long, default_value_t = 40.0)]
    pub max_megapixels: f64,
    /// How many analyses keep their outputs for download (the oldest are deleted).
    #[arg(long, default_value_t = 100)]
    pub keep: usize,
    /// Folder for the analyses' outputs (default: a temporary folder removed at exit).
    #[arg(long)]
    pub results: Option<PathBuf>,
}

/// What every request handler shares.
pub(crate) struct AppState {
    pub analyzer: Arc<Analyzer>,
    pub slots: Arc<tokio::sync::Semaphore>,
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub queue: usize,
    pub jobs: usize,
    pub max_upload: usize,
    pub max_pixels: u64,
    pub results_dir: PathBuf,
    pub keep: usize,
    pub kept: Mutex<VecDeque<String>>,
    pub counter: AtomicU64,
    pub served: AtomicU64,
    pub run_root: PathBuf,
    pub device: String,
}

/// The routes of the page and the API.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    // The body limit leaves room for the multipart framing around the largest allowed image; the
    // image field itself is checked against `max_upload` exactly.
    let body_limit = state.max_upload.saturating_add(64 * 1024);
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/{file}", get(assets::asset))
        .route("/api/info", get(api::info))
        .route("/api/analyze", post(api::analyze).layer(DefaultBodyLimit::max(body_limit)))
        .route("/api/results/{id}/{file}", get(api::result_file))
        .route("/api/run", get(run_folder::summary))
        .route("/api/run/overlay/{id}", get(run_folder::overlay))
        .route("/run/{*path}", get(run_folder::file))
        .fallback(api::not_found)
        .with_state(state)
}

/// Removes the temporary results folder when the server stops.
struct TempResults(Option<PathBuf>);

impl Drop for TempResults {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("derm serve: stopping");
}

impl ServeArgs {
    /// Loads the models, binds, and serves until Ctrl-C or SIGTERM.
    pub fn run(&self, g: &GlobalOpts) -> anyhow::Result<()> {
        let jobs =
            self.jobs.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4));
        if jobs == 0 {
            anyhow::bail!("--jobs must be at least 1");
        }
        if !(self.max_upload_mb > 0.0 && self.max_megapixels > 0.0) {
            anyhow::bail!("--max-upload-mb and --max-megapixels must be positive");
        }
        let device = g.device()?;
        let dirs = ModelDirs::locate(&self.models, &self.classifier)?;
        let t = std::time::Instant::now();
        let analyzer = Analyzer::load(dirs, &device)?;
        tracing::info!(seconds = t.elapsed().as_secs_f64(), "models loaded");

        let (results_dir, _cleanup) = match &self.results {
            Some(d) => (d.clone(), TempResults(None)),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0);
                let d = std::env::temp_dir().join(format!("derm-serve-{}-{nanos:08x}", std::process::id()));
                (d.clone(), TempResults(Some(d)))
            }
        };
        derm_core::fsutil::create_dir_all(&results_dir)?;
        // A results folder kept from an earlier session: new ids follow its analyses, which count
        // towards --keep.
        let mut earlier: Vec<(u64, String)> = std::fs::read_dir(&results_dir)
            .with_context(|| format!("reading {}", results_dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok().map(|k| (k, n.to_string()))))
            .collect();
        earlier.sort_unstable();
        let last_id = earlier.last().map(|(k, _)| *k).unwrap_or(0);
        let kept: VecDeque<String> = earlier.into_iter().map(|(_, n)| n).collect();
        let run_root =
            std::fs::canonicalize(&self.models).with_context(|| format!("resolving {}", self.models.display()))?;
        let state = Arc::new(AppState {
            analyzer: Arc::new(analyzer),
            slots: Arc::new(tokio::sync::Semaphore::new(jobs)),
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            queue: self.queue,
            jobs,
            max_upload: (self.max_upload_mb * 1024.0 * 1024.0) as usize,
            max_pixels: (self.max_megapixels * 1e6) as u64,
            results_dir,
            keep: self.keep.max(1),
            kept: Mutex::new(kept),
            counter: AtomicU64::new(last_id),
            served: AtomicU64::new(0),
            run_root,
            device: g.device.clone(),
        });

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(jobs + 4)
            .enable_io()
            .build()
            .context("starting the async runtime")?;
        let addr = SocketAddr::new(self.bind, self.port);
        rt.block_on(async move {
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            let local = listener.local_addr()?;
            let host = if local.ip().is_unspecified() { "127.0.0.1".to_string() } else { local.ip().to_string() };
            let host = if local.ip().is_ipv6() && !local.ip().is_unspecified() { format!("[{host}]") } else { host };
            if local.ip().is_loopback() {
                eprintln!(
                    "derm serve: listening on loopback only ({local}); other machines cannot connect (see --bind)"
                );
            } else {
                eprintln!(
                    "derm serve: listening on {local}, reachable from the network; the server has no authentication"
                );
            }
            eprintln!("derm serve: models of {}; press Ctrl-C to stop", self.models.display());
            // The URL on stdout, alone on its line, so scripts and tests can read the port.
            println!("http://{host}:{}/", local.port());
            use std::io::Write;
            let _ = std::io::stdout().flush();
            axum::serve(listener, router(state)).with_graceful_shutdown(shutdown_signal()).await?;
            anyhow::Ok(())
        })
    }
}
