//! Robustness of whole runs of the `derm` binary: SIGKILL at several points of a training run and
//! `--resume` give the same final metrics as an uninterrupted run; a second run into the same
//! folder is refused; a read-only or full output folder is a clear error that keeps the previous
//! checkpoint; truncated images are refused, or skipped with `--skip-bad`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn derm_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(derm_tests::derm_bin());
    c.args(["-q", "--seed", "5"]).args(args);
    c
}

fn run(args: &[&str]) -> Output {
    derm_cmd(args).output().expect("derm runs")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "derm {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "derm {args:?} should fail");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "derm {args:?} panicked: {e}");
    e
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn phantoms(dir: &Path, count: usize) -> PathBuf {
    let ph = dir.join("ph");
    ok(&["phantom", "--count", &count.to_string(), "--size", "48", "--balanced", "--out", p(&ph)]);
    ph
}

/// `derm segment train` on the phantoms: 4 batches of 4 per epoch at 32 px.
fn seg_train_args<'a>(ph: &'a Path, out: &'a Path, epochs: &'a str) -> Vec<&'a str> {
    vec![
        "segment",
        "train",
        "--root",
        p(ph),
        "--size",
        "32",
        "--epochs",
        epochs,
        "--batch",
        "4",
        "--lr",
        "0.003",
        "--out",
        p(out),
    ]
}

/// What must not depend on interruptions: every history row's step, epoch, loss and metric, and
/// the saved model's score on the phantoms.
fn final_metrics(out: &Path, ph: &Path) -> (Vec<(u64, u64, String, String)>, String) {
    let h: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("history.json")).unwrap()).unwrap();
    let rows = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (r["step"].as_u64().unwrap(), r["epoch"].as_u64().unwrap(), r["loss"].to_string(), r["metric"].to_string())
        })
        .collect();
    let eval: serde_json::Value =
        serde_json::from_str(&ok(&["segment", "eval", "--model", p(out), "--root", p(ph), "--json"])).unwrap();
    (rows, eval["summary"].to_string())
}

/// The step of the checkpoint in `<out>/last`, if one is there yet.
fn saved_step(out: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(out.join("last/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

#[test]
fn sigkill_at_several_points_then_resume_gives_the_uninterrupted_result() {
    let d = tempfile::tempdir().unwrap();
    let ph = phantoms(d.path(), 20);
    let epochs = "12";

    let whole = d.path().join("whole");
    ok(&seg_train_args(&ph, &whole, epochs));
    let expected = final_metrics(&whole, &ph);
    assert!(expected.0.len() >= 12, "{expected:?}");

    // Kill points: while the data are decoded (before any checkpoint), right after the first
    // checkpoint, in the middle, and near the end; each leg resumes from what the last left.
    let out = d.path().join("killed");
    let mut kills = 0;
    let points: [&dyn Fn(&Path) -> bool; 4] =
        [&|_| true, &|o| saved_step(o).is_some(), &|o| saved_step(o).is_some_and(|s| s >= 20), &|o| {
            saved_step(o).is_some_and(|s| s >= 36)
        }];
    for (i, ready) in points.iter().enumerate() {
        let mut args = seg_train_args(&ph, &out, epochs);
        if i > 0 {
            args.push("--resume");
        }
        let mut child = derm_cmd(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        if i == 0 {
            std::thread::sleep(Duration::from_millis(150));
        }
        if derm_tests::kill_when(&mut child, Duration::from_secs(120), || ready(&out)) {
            kills += 1;
        }
    }
    assert!(kills >= 3, "only {kills} of 4 kill points were reached before the run ended");
    eprintln!("killed {kills} times");
    let mut args = seg_train_args(&ph, &out, epochs);
    args.push("--resume");
    ok(&args);
    assert_eq!(final_metrics(&out, &ph), expected, "a killed and resumed run differs from the uninterrupted one");
    // Nothing half-written is left behind.
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.ends_with(".old"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_second_run_into_the_same_folder_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let ph = phantoms(d.path(), 16);
    let out = d.path().join("run");
    let mut first = derm_cmd(&seg_train_args(&ph, &out, "400")).stdout(Stdio::null()).spawn().unwrap();
    // Wait for the first run to hold the lock (its first checkpoint proves it is training).
    let deadline = Instant::now() + Duration::from_secs(120);
    while saved_step(&out).is_none() {
        assert!(first.try_wait().unwrap().is_none(), "the first run ended early");
        assert!(Instant::now() < deadline, "no checkpoint after 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = err(&seg_train_args(&ph, &out, "400"));
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(e.contains("in use by another derm run") && e.contains("pid"), "{e}");
    // The lock dies with its holder: a resume after the kill goes ahead.
    let mut args = seg_train_args(&ph, &out, "1");
    args.push("--resume");
    ok(&args);
}

/// Makes `dir` refuse new entries: `chmod` for ordinary users, the immutable attribute for root
/// (who ignores permissions). Returns an undo guard, or `None` where neither works here.
struct ReadOnly(PathBuf, bool);

impl ReadOnly {
    fn make(dir: &Path) -> Option<ReadOnly> {
        let root = Command::new("id").arg("-u").output().ok().is_some_and(|o| o.stdout.starts_with(b"0"));
        let done = if root {
            Command::new("chattr").arg("+i").arg(dir).status().is_ok_and(|s| s.success())
        } else {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).is_ok()
        };
        let guard = ReadOnly(dir.to_path_buf(), root);
        (done && std::fs::write(dir.join("probe"), b"x").is_err()).then_some(guard)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.1 {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        } else {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
        }
    }
}

/// A small tmpfs mounted at `dir` (root only), unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, bytes: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).ok()?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .ok()?;
        st.success().then(|| SmallDisk(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.path().is_dir() {
                dir_bytes(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn read_only_or_full_output_folder_is_a_clear_error_and_the_checkpoint_survives() {
    let d = tempfile::tempdir().unwrap();
    let ph = phantoms(d.path(), 16);
    let out = d.path().join("run");
    ok(&seg_train_args(&ph, &out, "1"));
    let before = std::fs::read(out.join("last/model.safetensors")).unwrap();
    let mut resume = seg_train_args(&ph, &out, "3");
    resume.push("--resume");

    let mut tried = Vec::new();
    if let Some(guard) = ReadOnly::make(&out) {
        let e = err(&resume);
        drop(guard);
        assert!(e.contains(p(&out)), "{e}");
        assert_eq!(std::fs::read(out.join("last/model.safetensors")).unwrap(), before);
        ok(&["segment", "eval", "--model", p(&out), "--root", p(&ph)]);
        tried.push("read-only");
    } else {
        eprintln!("read-only case not run: this machine cannot make a folder read-only for this user");
    }

    // A disk with room for the run as it is and a little more, but not a second checkpoint.
    let size = dir_bytes(&out);
    let mnt = d.path().join("small");
    if let Some(disk) = SmallDisk::mount(&mnt, (size + size / 2).div_ceil(4096) * 4096) {
        let small_out = mnt.join("run");
        copy_dir(&out, &small_out);
        let mut resume = seg_train_args(&ph, &small_out, "3");
        resume.push("--resume");
        let e = err(&resume);
        assert!(e.to_lowercase().contains("no space left"), "{e}");
        assert_eq!(std::fs::read(small_out.join("last/model.safetensors")).unwrap(), before);
        ok(&["segment", "eval", "--model", p(&small_out), "--root", p(&ph)]);
        drop(disk);
        tried.push("full disk");
    } else {
        eprintln!("full-disk case not run: mounting a tmpfs needs root");
    }
    eprintln!("output-folder failures exercised: {tried:?}");
}

#[test]
fn truncated_image_is_refused_then_skipped_with_skip_bad() {
    let d = tempfile::tempdir().unwrap();
    let ph = phantoms(d.path(), 12);
    // A phantom image cut short (as a download that stopped), in place of a good one.
    let victim = ph.join("images/phantom_5_000003.png");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let out = d.path().join("run");
    let e = err(&seg_train_args(&ph, &out, "1"));
    assert!(e.contains("phantom_5_000003.png") && e.contains("--skip-bad"), "{e}");
    let check = run(&["data", "check", "--root", p(&ph), "--json"]);
    assert!(String::from_utf8_lossy(&check.stdout).contains("phantom_5_000003.png"), "{check:?}");

    let mut args = seg_train_args(&ph, &out, "1");
    args.push("--skip-bad");
    let o = derm_cmd(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("skipped 1 of 12") && stderr.contains("phantom_5_000003"), "{stderr}");
}

#[test]
fn progress_is_logged_as_lines_when_stderr_is_not_a_terminal() {
    let d = tempfile::tempdir().unwrap();
    let ph = phantoms(d.path(), 12);
    // derm's stderr, with a progress line at every update, for a run that must succeed.
    let logged = |args: &[&str]| {
        let o = Command::new(derm_tests::derm_bin())
            .args(["--seed", "1"])
            .args(args)
            .env("DERM_PROGRESS_SECS", "0")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let stderr = logged(&seg_train_args(&ph, &d.path().join("run"), "2"));
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("[derm] segment ")).collect();
    assert!(lines.len() >= 4, "{stderr}");
    assert!(lines.iter().any(|l| l.contains("ETA") && l.contains("loss")), "{stderr}");
    // A decoupled GAN run trains one model per class, each for the whole budget: each gets its
    // own line, named by its class, with its own elapsed time (one shared line once ran on into
    // the second model and showed the first one's time in its ETA).
    let gan = d.path().join("gan");
    let mut args = vec!["synth", "train", "--root", p(&ph), "--classes", "melanoma,seborrheic_keratosis"];
    args.extend(["--preset", "small", "--epochs", "2", "--out", p(&gan)]);
    let stderr = logged(&args);
    let first = |what: &str| stderr.lines().position(|l| l.starts_with(&format!("[derm] synth {what} ")));
    let (mel, sk) = (first("melanoma"), first("seborrheic_keratosis"));
    assert!(mel.is_some() && sk.is_some() && mel < sk, "{stderr}");
    // -q means quiet.
    let o = run(&seg_train_args(&ph, &d.path().join("q"), "1"));
    assert!(o.status.success() && o.stderr.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_same_seed_gives_bit_identical_gan_and_classifier_weights() {
    // rayon's fold/reduce once summed convolution weight gradients in work-stealing order, and two
    // DCGAN runs with one seed drifted apart in the last bits (which broke resumed runs too).
    let d = tempfile::tempdir().unwrap();
    let ph = phantoms(d.path(), 40);
    let weights = |out: &Path, file: &str| std::fs::read(out.join(file)).unwrap();
    let gan_train = |out: &Path, resume: bool| {
        let mut args = vec!["synth", "train", "--root", p(&ph), "--classes", "melanoma", "--preset", "small"];
        args.extend(["--epochs", "2", "--out", p(out)]);
        if resume {
            args.push("--resume");
        }
        // The last line says what was trained.
        let out = ok(&args);
        let last = out.lines().last().unwrap_or_default();
        assert!(last.starts_with("trained one DCGAN per class (melanoma), small preset (64 px"), "{out}");
    };
    let mut gan = Vec::new();
    let mut cls = Vec::new();
    for run in ["a", "b"] {
        let g = d.path().join(format!("gan_{run}"));
        gan_train(&g, false);
        gan.push(weights(&g, "melanoma/last/model.safetensors"));
        let c = d.path().join(format!("cls_{run}"));
        let mut args = vec!["classify", "train", "--root", p(&ph), "--arch", "resnet18", "--width", "8"];
        args.extend(["--size", "32", "--epochs", "2", "--batch", "8", "--out", p(&c)]);
        ok(&args);
        cls.push(weights(&c, "last/model.safetensors"));
    }
    assert!(gan[0] == gan[1], "two GAN runs with one seed differ");
    // Resuming a finished GAN run changes nothing: its sample grids once updated the generator's
    // batch-norm running averages, so a resumed run ended with other weights.
    let g = d.path().join("gan_a");
    gan_train(&g, true);
    assert!(weights(&g, "melanoma/last/model.safetensors") == gan[0], "resuming a finished GAN run changed it");
    assert!(cls[0] == cls[1], "two classifier runs with one seed differ");
}
