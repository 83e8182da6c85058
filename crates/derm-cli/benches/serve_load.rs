//! Load check of `derm serve` (a benchmark, not a test): trains a tiny phantom run, starts the
//! server on loopback, fires `--requests` analyses (default 100) from `--clients` concurrent
//! clients (default 8), and prints the p50/p95 latency, the throughput and the server's peak
//! resident memory (VmHWM).
//!
//! ```sh
//! cargo bench -p derm-cli --bench serve_load [-- --requests 100 --clients 8 --image-size 256 --jobs N]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use derm_tests::serve as support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

struct Opts {
    requests: usize,
    clients: usize,
    image_size: u32,
    model_size: u32,
    jobs: Option<usize>,
}

fn parse() -> Opts {
    let mut o = Opts { requests: 100, clients: 8, image_size: 256, model_size: 64, jobs: None };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match (args[i].as_str(), v) {
            ("--requests", Some(v)) => o.requests = v.max(1),
            ("--clients", Some(v)) => o.clients = v.max(1),
            ("--image-size", Some(v)) => o.image_size = v as u32,
            ("--model-size", Some(v)) => o.model_size = v as u32,
            ("--jobs", Some(v)) => o.jobs = Some(v.max(1)),
            // `cargo bench` passes --bench; other flags are not ours.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let k = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[k.min(sorted.len() - 1)]
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    let o = parse();
    let d = tempfile::tempdir().unwrap();
    eprintln!("training a tiny phantom run ({}px phantoms, models at {}px) ...", o.image_size, o.model_size);
    let (run, ph) = support::tiny_run(d.path(), 24, o.image_size, o.model_size);
    let queue = (o.clients * 2).to_string();
    let mut args = vec!["--queue".to_string(), queue, "--keep".into(), "20".into()];
    if let Some(j) = o.jobs {
        args.extend(["--jobs".into(), j.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = support::Server::start(&run, &args);
    let a = server.addr;
    let mut images: Vec<(String, Vec<u8>)> = Vec::new();
    for k in 0..8 {
        let name = format!("phantom_3_{k:06}.png");
        images.push((name.clone(), std::fs::read(ph.join("images").join(&name)).unwrap()));
    }
    let images = Arc::new(images);
    let rss_loaded = server.peak_rss_kib();
    // Warm-up (allocator pools, first-touch of the weights).
    for (n, b) in images.iter().take(2) {
        assert_eq!(support::analyze(a, n, b).status, 200);
    }

    let next = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(o.requests)));
    let failures = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..o.clients)
        .map(|_| {
            let (next, lat, failures, images) = (next.clone(), lat.clone(), failures.clone(), images.clone());
            let total = o.requests;
            std::thread::spawn(move || loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= total {
                    break;
                }
                let (n, b) = &images[k % images.len()];
                let t = Instant::now();
                let r = support::analyze(a, n, b);
                let s = t.elapsed().as_secs_f64();
                if r.status == 200 {
                    lat.lock().unwrap().push(s);
                } else {
                    eprintln!("request {k}: {} {}", r.status, r.text());
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let wall = t0.elapsed().as_secs_f64();
    let peak = server.peak_rss_kib();
    let mut l = lat.lock().unwrap().clone();
    l.sort_by(f64::total_cmp);
    let info = support::get(a, "/api/info").json();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!(
        "derm serve load check: {} analyses of {}x{} phantoms from {} concurrent clients, --jobs {}",
        o.requests, o.image_size, o.image_size, o.clients, info["limits"]["jobs"]
    );
    println!("machine: {} ({cores} cores)", cpu_name());
    println!("ok {} failed {}", l.len(), failures.load(Ordering::SeqCst));
    println!(
        "latency (s): p50 {:.3}  p95 {:.3}  max {:.3}  (queue wait included)",
        percentile(&l, 0.5),
        percentile(&l, 0.95),
        l.last().copied().unwrap_or(f64::NAN)
    );
    println!("throughput: {:.1} analyses/s over {:.1} s", l.len() as f64 / wall, wall);
    let mib = |k: Option<u64>| k.map(|k| format!("{:.0} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "n/a".into());
    println!("server peak RSS (VmHWM): {} (after loading the models: {})", mib(peak), mib(rss_loaded));
    println!("served {}", info["load"]["served"]);
    if failures.load(Ordering::SeqCst) > 0 {
        std::process::exit(1);
    }
}
