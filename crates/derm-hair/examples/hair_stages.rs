//! Times each stage of the hair mask at 512x512 on the benchmark's synthetic hairy image (the
//! one `cargo xtask bench --only hair` uses), and the line closing in each orientation.
//!
//! `cargo run -p derm-hair --example hair_stages` (set `TUNE=1` to keep freed buffers in the heap
//! as the `derm` binary and `xtask` do, see `derm_kernels::runtime`).

use derm_hair::{color::luminance_u8, morph::*, HairConfig};
use std::time::Instant;
fn t<R>(name: &str, n: usize, mut f: impl FnMut() -> R) -> R {
    let mut r = f();
    let s = Instant::now();
    for _ in 0..n {
        r = f();
    }
    println!("{name:<20} {:.3} ms", s.elapsed().as_secs_f64() * 1e3 / n as f64);
    r
}
fn main() -> derm_core::Result<()> {
    let img = derm_hair::eval::benchmark_image();
    if std::env::var("TUNE").is_ok() {
        derm_kernels::runtime::tune_allocator();
    }
    let cfg = HairConfig { rulers: false, ..Default::default() };
    let (w, h) = (512, 512);
    let s = cfg.scale(512, 512);
    println!("scale {s}");
    let n = 200;
    let l = t("luminance", n, || luminance_u8(&img));
    let radius = ((cfg.line_length * s - 1.0) / 2.0).round().max(1.0) as usize;
    let bh = t("black_hat", n, || black_hat_lines(&l, w, h, radius));
    let thr = (cfg.threshold * 2.55).round().max(1.0) as u8;
    let m0: Vec<u8> = bh.iter().map(|&v| if v >= thr { 255 } else { 0 }).collect();
    let m = t("remove_small", n, || {
        let mut m = m0.clone();
        remove_small(&mut m, w, h, (cfg.min_area * s * s).round() as usize);
        m
    });
    let ink = t("ink_mask", n, || derm_hair::mask::ink_mask(&img, &cfg));
    let d = t("dilate", n, || dilate_disc(&m, w, h, cfg.dilate_radius * s));
    t("fill_holes", n, || {
        let mut m = d.clone();
        fill_holes(&mut m, w, h, (cfg.max_hole_area * s * s).round() as usize);
        m
    });
    derm_hair::hair_mask(&img, None, &cfg)?;
    t("hair_mask total", n, || derm_hair::hair_mask(&img, None, &cfg))?;
    let _ = ink;
    per_dir();
    Ok(())
}
/// Each orientation's closing and a transpose, on a pseudo-random plane.
fn per_dir() {
    let l: Vec<u8> = (0..512 * 512).map(|i| ((i * 7919) % 251) as u8).collect();
    for d in LineDir::ALL {
        t(&format!("closing {d:?}"), 200, || line_closing(&l, 512, 512, d, 11));
    }
    t("transpose", 200, || transpose(&l, 512, 512));
}
