//! The `xtask` binary starts and lists its tasks. (The pipeline's kill-and-resume test lives in
//! the workspace's `tests/` package; a test here also makes `cargo test` build this binary in its
//! build phase.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn help_lists_the_tasks() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_xtask")).arg("--help").output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for task in ["pipeline", "bench", "vendor"] {
        assert!(s.contains(task), "xtask --help lacks {task}:\n{s}");
    }
}
