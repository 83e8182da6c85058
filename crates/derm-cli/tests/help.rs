//! The `derm` binary starts and documents every stage. (The end-to-end tests live in the
//! workspace's `tests/` package; a test here also makes `cargo test` build the binary they drive
//! in its build phase.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn help(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_derm")).args(args).arg("--help").output().unwrap();
    assert!(o.status.success(), "derm {args:?} --help failed");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn help_lists_every_stage_and_the_config_defaults() {
    let top = help(&[]);
    for stage in
        ["info", "data", "phantom", "hair", "segment", "purify", "synth", "classify", "vbp", "analyze", "serve"]
    {
        assert!(top.contains(stage), "derm --help lacks {stage}:\n{top}");
    }
    // Flags override the config; their help names the default they override.
    let seg = help(&["segment", "train"]);
    assert!(seg.contains("--config") && seg.contains("[config default: 128]"), "{seg}");
}
