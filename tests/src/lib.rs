//! # derm-tests: the workspace's end-to-end tests
//!
//! The tests in this package drive the built binaries the way a user does: `derm` stages
//! handing images, masks and models to each other through folders (`cli`), bad inputs and
//! killed runs across stages (`robust`), `derm serve` (`serve`), and `cargo xtask pipeline`
//! killed and resumed (`pipeline_kill`). This library holds what they share.
//!
//! - [`derm_bin`], [`xtask_bin`]: the binaries of this build (built on first use if missing).
//! - [`kill_when`]: SIGKILL a child at the moment a condition holds.
//! - [`serve`]: a tiny trained run folder and a small HTTP/1.1 client for `derm serve`.
//!
//! **Consumes:** the workspace's `derm` and `xtask` binaries. **Produces:** test verdicts.

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod serve;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The binary `name` of package `package` in the target folder this test runs from (cargo puts
/// test executables in `<target>/<profile>/deps`), built there with cargo first if it is not.
fn built(name: &str, package: &str, cell: &'static OnceLock<PathBuf>) -> &'static PathBuf {
    cell.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("<target>/<profile>/deps/<test>");
        let bin = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
        if !bin.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut c = Command::new(cargo);
            c.args(["build", "-q", "-p", package, "--bin", name]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                c.arg("--release");
            }
            let st = c.status().expect("cargo runs");
            assert!(st.success(), "cargo build -p {package} failed");
        }
        bin
    })
}

/// The `derm` binary of this build.
pub fn derm_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    built("derm", "derm-cli", &BIN)
}

/// The `xtask` binary of this build.
pub fn xtask_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    built("xtask", "xtask", &BIN)
}

/// Waits until `ready` holds or the child exits (at most `timeout`), then SIGKILLs it. True
/// when it was killed while still running.
pub fn kill_when(child: &mut Child, timeout: Duration, ready: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if child.try_wait().expect("the child's status").is_some() {
            return false;
        }
        if ready() {
            child.kill().expect("kill");
            child.wait().expect("wait");
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().ok();
    child.wait().ok();
    panic!("the child was never ready to be killed within {timeout:?}");
}
