//! The `xtask` binary starts and lists its tasks. (The pipeline's kill-and-resume test lives in
//! the workspace's `tests/` package; a test here also makes `cargo test` build this binary in its
//! build phase.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn help_lists_the_tasks() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_xtask")).arg("--help").output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for task in ["pipeline", "bench", "vendor", "device-check"] {
        assert!(s.contains(task), "xtask --help lacks {task}:\n{s}");
    }
}

/// The GPU check's comparison, run with the forced device path on the CPU: every op and every
/// network's gradients within tolerance of the f64 reference, and no host read in a step.
#[test]
fn device_check_passes_on_the_forced_device_path() {
    let d = tempfile::tempdir().unwrap();
    let json = d.path().join("check.json");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["device-check", "--device", "cpu", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(rows.len() >= 20);
    let nets: Vec<&serde_json::Value> = rows.iter().filter(|r| !r["step_host_reads"].is_null()).collect();
    assert_eq!(nets.len(), 4);
    assert!(nets.iter().all(|r| r["step_host_reads"] == 0 && r["pass"] == true));
}
