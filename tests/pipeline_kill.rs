//! `cargo xtask pipeline` survives SIGKILL: a tiny phantom run (epoch-limited, so its numbers do
//! not depend on the machine's speed) killed at several points and continued with `--resume`
//! ends with the same metrics as an uninterrupted run with the same seed; a second pipeline into
//! the same folder is refused while the first runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn pipeline(out: &Path, resume: bool) -> Command {
    let mut c = Command::new(derm_tests::xtask_bin());
    c.args(["pipeline", "--budget", "tiny", "--seed", "4", "-q", "--out"])
        .arg(out)
        .arg("--derm-bin")
        .arg(derm_tests::derm_bin());
    if resume {
        c.arg("--resume");
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Every stage's metrics with timings dropped and the run folder's path replaced.
fn metrics(out: &Path) -> Vec<(String, Value)> {
    fn clean(v: &Value, dir: &str) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| {
                        !["seconds", "elapsed", "time", "ms_per", "per_s", "_ms"].iter().any(|w| k.contains(w))
                    })
                    .map(|(k, v)| (k.clone(), clean(v, dir)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(|v| clean(v, dir)).collect()),
            Value::String(s) => Value::String(s.replace(dir, "<run>")),
            other => other.clone(),
        }
    }
    let dir = out.display().to_string();
    ["data", "hair", "segment", "hair_train", "purify", "synth", "classify", "vbp"]
        .iter()
        .map(|st| {
            let text = std::fs::read_to_string(out.join(st).join("record.json"))
                .unwrap_or_else(|e| panic!("{st}/record.json: {e}"));
            let rec: Value = serde_json::from_str(&text).unwrap();
            (st.to_string(), clean(&rec["metrics"], &dir))
        })
        .collect()
}

#[test]
fn killed_pipeline_resumes_to_the_uninterrupted_result() {
    let d = tempfile::tempdir().unwrap();
    let whole = d.path().join("whole");
    let o = pipeline(&whole, false).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let expected = metrics(&whole);

    let out = d.path().join("killed");
    let has = |rel: &str| {
        let p = out.join(rel);
        move || p.exists()
    };
    // Kill points: inside the segmenter's training (after its first checkpoint), inside the
    // purifier's, while the GANs train, and between two classifier variants.
    let points: Vec<Box<dyn Fn() -> bool>> = vec![
        Box::new(has("segment/model/last/state.json")),
        Box::new(has("purify/model/last/state.json")),
        Box::new(has("synth/model")),
        Box::new(has("classify/purified/last/state.json")),
    ];
    let mut kills = 0;
    for (i, ready) in points.iter().enumerate() {
        let mut child = pipeline(&out, i > 0).spawn().unwrap();
        if derm_tests::kill_when(&mut child, Duration::from_secs(300), ready) {
            kills += 1;
        }
    }
    assert!(kills >= 3, "only {kills} of 4 kill points were reached");
    let o = pipeline(&out, true).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = metrics(&out);
    for ((st, a), (_, b)) in got.iter().zip(&expected) {
        assert_eq!(a, b, "stage {st}: killed and resumed differs from uninterrupted");
    }
    eprintln!("pipeline killed {kills} times, resumed to the same metrics in all 8 stages");
}

#[test]
fn a_second_pipeline_into_the_same_folder_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let mut first = pipeline(&out, false).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join(".derm.lock").exists() {
        assert!(Instant::now() < deadline && first.try_wait().unwrap().is_none(), "first pipeline did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = pipeline(&out, true).output().unwrap();
    let _ = first.kill();
    let _ = first.wait();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("in use by another derm run"), "{e}");
}
