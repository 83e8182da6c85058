//! Shared by the `derm serve` tests and the load check: a tiny phantom-trained run folder, the
//! server started on an ephemeral loopback port, and a small HTTP/1.1 client on std's TcpStream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use crate::derm_bin;

fn derm(args: &[&str]) {
    let o = Command::new(derm_bin()).args(["-q", "--seed", "3"]).args(args).output().expect("derm runs");
    assert!(o.status.success(), "derm {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// Trains tiny segment, purify and classify models on `count` phantoms of `image_size` pixels
/// (models at `model_size`) into `dir/run`, with a segmentation evaluation and predicted test
/// masks as a pipeline run has them. Returns the run folder and the phantom folder.
pub fn tiny_run(dir: &Path, count: usize, image_size: u32, model_size: u32) -> (PathBuf, PathBuf) {
    let ph = dir.join("ph");
    let run = dir.join("run");
    let (n, s, m) = (count.to_string(), image_size.to_string(), model_size.to_string());
    derm(&["phantom", "--count", &n, "--size", &s, "--balanced", "--out", p(&ph)]);
    let seg = run.join("segment/model");
    derm(&["segment", "train", "--root", p(&ph), "--size", &m, "--epochs", "1", "--batch", "4", "--out", p(&seg)]);
    let pur = run.join("purify/model");
    derm(&["purify", "train", "--root", p(&ph), "--size", &m, "--epochs", "1", "--batch", "4", "--out", p(&pur)]);
    let cls = run.join("classify/both");
    derm(&[
        "classify",
        "train",
        "--root",
        p(&ph),
        "--arch",
        "resnet18",
        "--width",
        "8",
        "--size",
        &m,
        "--epochs",
        "1",
        "--batch",
        "4",
        "--out",
        p(&cls),
    ]);
    // What the run browser reads: per-image Jaccard, predicted masks, the test images.
    derm(&["segment", "eval", "--model", p(&seg), "--root", p(&ph), "--out", p(&run.join("segment/eval"))]);
    derm(&[
        "segment",
        "predict",
        "--model",
        p(&seg),
        "--input",
        p(&ph.join("images")),
        "--out",
        p(&run.join("segment/test_masks")),
    ]);
    std::fs::create_dir_all(run.join("data")).unwrap();
    std::os::unix::fs::symlink(&ph, run.join("data/test")).unwrap();
    (run, ph)
}

/// A `derm serve` process on an ephemeral loopback port, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `derm serve --models run --port 0` with `extra` arguments and waits (60 s at most)
    /// for the URL it prints.
    pub fn start(run: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(derm_bin())
            .args(["serve", "--models", p(run), "--port", "0"])
            // Outputs beside the run, so the test's temporary folder takes them away.
            .args(["--results", p(&run.with_file_name("serve_results"))])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("derm serve starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("derm serve printed no address within 60 s");
            }
        };
        let hostport = line.trim().trim_start_matches("http://").trim_end_matches('/');
        let addr: SocketAddr = hostport.parse().unwrap_or_else(|_| panic!("not an address: {line:?}"));
        Server { child, addr }
    }

    /// The server's peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn decode_chunked(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&b[..i]).unwrap().split(';').next().unwrap().trim(), 16)
            .expect("chunk size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + size]);
        b = &b[i + 2 + size + 2..];
    }
    out
}

/// One request on a fresh connection (`Connection: close`), every read and write bounded by
/// 120 s. The body is written from a second thread, so a server that answers early (413) is read.
pub fn request(addr: SocketAddr, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Response {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    if method != "GET" || !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut w = s.try_clone().unwrap();
    let payload = [head.as_bytes(), body].concat();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&payload);
    });
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A reset after a complete early answer (the server stopped reading a large body).
            Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the response to {method} {path}: {e}"),
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))).collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked =
        headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = decode_chunked(&body);
    }
    Response { status, headers, body }
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, None, &[])
}

/// A multipart/form-data body with one file field; returns (content type, body).
pub fn multipart(field: &str, filename: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = "----dermtestboundary7MA4YWxkTrZu0gW";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `POST /api/analyze` with `bytes` in the field `image`.
pub fn analyze(addr: SocketAddr, filename: &str, bytes: &[u8]) -> Response {
    let (ct, body) = multipart("image", filename, bytes);
    request(addr, "POST", "/api/analyze", Some(&ct), &body)
}
