//! Progress for long work (only the binary shows it; libraries report through callbacks).
//!
//! On a terminal, an indicatif bar with elapsed time and ETA. When stderr is not a terminal (CI,
//! `nohup`, a batch scheduler's log file), a bar would draw nothing, so progress becomes a plain
//! log line every few seconds instead (`DERM_PROGRESS_SECS`, default 15):
//!
//! ```text
//! [derm] segment 120/400 (30.0%) epoch 2 loss 0.4123 val 0.7100 | elapsed 1m05s, ETA 2m48s
//! ```
//!
//! Under `--quiet` nothing is shown.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Seconds between log lines when stderr is not a terminal, unless `DERM_PROGRESS_SECS` says.
const DEFAULT_LOG_SECS: f64 = 15.0;

/// A progress display: a terminal bar, periodic log lines, or nothing.
pub struct Progress {
    kind: Kind,
}

enum Kind {
    Hidden,
    Bar(ProgressBar),
    Log(Mutex<LogState>),
}

struct LogState {
    what: String,
    len: Option<u64>,
    pos: u64,
    msg: String,
    start: Instant,
    last: Instant,
    every: Duration,
    printed_pos: Option<u64>,
}

use derm_core::train::format_duration as hms;

impl LogState {
    fn line(&self) -> String {
        let el = self.start.elapsed().as_secs_f64();
        let (count, eta) = match self.len.filter(|&l| l > 0) {
            Some(len) => {
                let frac = self.pos as f64 / len as f64;
                let eta =
                    if self.pos > 0 && frac < 1.0 { format!(", ETA {}", hms(el / frac - el)) } else { String::new() };
                (format!("{}/{len} ({:.1}%)", self.pos, 100.0 * frac), eta)
            }
            None => (format!("{}", self.pos), String::new()),
        };
        let msg = if self.msg.is_empty() { String::new() } else { format!(" {}", self.msg) };
        format!("[derm] {} {count}{msg} | elapsed {}{eta}", self.what, hms(el))
    }

    fn tick(&mut self) {
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            self.printed_pos = Some(self.pos);
            eprintln!("{}", self.line());
        }
    }
}

fn log_every() -> Duration {
    let secs = std::env::var("DERM_PROGRESS_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .unwrap_or(DEFAULT_LOG_SECS);
    Duration::from_secs_f64(secs)
}

impl Progress {
    /// A display for `len` steps of `what` (0: length not known yet).
    pub fn new(len: u64, what: &str, quiet: bool) -> Progress {
        Progress::with_terminal(len, what, quiet, std::io::stderr().is_terminal())
    }

    fn with_terminal(len: u64, what: &str, quiet: bool, terminal: bool) -> Progress {
        if quiet {
            return Progress { kind: Kind::Hidden };
        }
        if !terminal {
            let now = Instant::now();
            return Progress {
                kind: Kind::Log(Mutex::new(LogState {
                    what: what.to_string(),
                    len: (len > 0).then_some(len),
                    pos: 0,
                    msg: String::new(),
                    start: now,
                    last: now,
                    every: log_every(),
                    printed_pos: None,
                })),
            };
        }
        let pb = ProgressBar::new(len);
        let style =
            ProgressStyle::with_template("{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ETA {eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        pb.set_style(style);
        pb.set_prefix(what.to_string());
        Progress { kind: Kind::Bar(pb) }
    }

    fn with_log(&self, f: impl FnOnce(&mut LogState)) {
        if let Kind::Log(m) = &self.kind {
            if let Ok(mut st) = m.lock() {
                f(&mut st);
            }
        }
    }

    /// The number of steps, when known.
    pub fn length(&self) -> Option<u64> {
        match &self.kind {
            Kind::Hidden => None,
            Kind::Bar(b) => b.length(),
            Kind::Log(m) => m.lock().ok().and_then(|s| s.len),
        }
    }

    /// Sets the number of steps.
    pub fn set_length(&self, len: u64) {
        match &self.kind {
            Kind::Bar(b) => b.set_length(len),
            _ => self.with_log(|s| s.len = Some(len)),
        }
    }

    /// Sets the steps done.
    pub fn set_position(&self, pos: u64) {
        match &self.kind {
            Kind::Bar(b) => b.set_position(pos),
            _ => self.with_log(|s| {
                s.pos = pos;
                s.tick();
            }),
        }
    }

    /// Adds `n` steps done.
    pub fn inc(&self, n: u64) {
        match &self.kind {
            Kind::Bar(b) => b.inc(n),
            _ => self.with_log(|s| {
                s.pos += n;
                s.tick();
            }),
        }
    }

    /// Sets the message shown after the count (epoch, loss, metric).
    pub fn set_message(&self, msg: String) {
        match &self.kind {
            Kind::Bar(b) => b.set_message(msg),
            _ => self.with_log(|s| s.msg = msg),
        }
    }

    /// Clears the bar; in log mode, prints the final state once (unless it was just printed, or
    /// the work took under a second and printed nothing).
    pub fn finish_and_clear(&self) {
        match &self.kind {
            Kind::Bar(b) => b.finish_and_clear(),
            _ => self.with_log(|s| {
                let worth = s.printed_pos.is_some() || s.start.elapsed() >= Duration::from_secs(1);
                if worth && s.printed_pos != Some(s.pos) && s.pos > 0 {
                    s.printed_pos = Some(s.pos);
                    eprintln!("{}", s.line());
                }
            }),
        }
    }
}

/// A display of `len` steps with a message, hidden under `--quiet`.
pub fn bar(len: u64, what: &str, quiet: bool) -> Progress {
    Progress::new(len, what, quiet)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_count_percent_and_eta() {
        let p = Progress::with_terminal(400, "segment", false, false);
        p.set_position(120);
        p.set_message("epoch 2 loss 0.4123".into());
        let Kind::Log(m) = &p.kind else { panic!("not in log mode") };
        let line = m.lock().unwrap().line();
        assert!(line.starts_with("[derm] segment 120/400 (30.0%) epoch 2 loss 0.4123 | elapsed "), "{line}");
        assert!(line.contains("ETA"), "{line}");
        assert!(matches!(Progress::with_terminal(4, "x", true, false).kind, Kind::Hidden));
        assert!(matches!(Progress::with_terminal(4, "x", false, true).kind, Kind::Bar(_)));
    }
}
