//! Times each stage of the hair mask at 512x512 on the benchmark's synthetic hairy image (the
//! one `cargo xtask bench --only hair` uses), and the line closing in each orientation.
//!
//! `cargo run -p derm-hair --example hair_stages` (set `TUNE=1` to keep freed buffers in the heap
//! as the `derm` binary and `xtask` do, see `derm_core::runtime`).

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
    let mut r = derm_core::Rng::new(0);
    let mut img = image::RgbImage::from_fn(512, 512, |x, y| {
        let v = (8.0 * ((x as f64 / 40.0).sin() + (y as f64 / 55.0).cos())) as i32;
        image::Rgb([(205 + v) as u8, (150 + v) as u8, (130 + v) as u8])
    });
    for _ in 0..30 {
        let (mut x, mut y) = (r.uniform(0.0, 512.0), r.uniform(0.0, 512.0));
        let mut ang = r.uniform(0.0, std::f64::consts::TAU);
        for _ in 0..400 {
            ang += r.uniform(-0.05, 0.05);
            x += ang.cos();
            y += ang.sin();
            for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                let (px, py) = (x as i64 + dx, y as i64 + dy);
                if (0..512).contains(&px) && (0..512).contains(&py) {
                    img.put_pixel(px as u32, py as u32, image::Rgb([30, 20, 15]));
                }
            }
        }
    }
    if std::env::var("TUNE").is_ok() {
        derm_core::runtime::tune_allocator();
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
