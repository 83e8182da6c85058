//! Side-by-side composite (image | occlusion in red over the image | cleaned) of `derm hair`
//! output, each panel scaled to a height of 256 px.
//!
//! `cargo run -p derm-hair --example hair_composite -- IMAGE OCCLUSION CLEAN OUT.png`

use derm_core::image_io::{load_mask, load_rgb, resize_mask, resize_rgb, save_png};
use image::RgbImage;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() == 5, "usage: hair_composite IMAGE OCCLUSION CLEAN OUT.png");
    let img = load_rgb(a[1].as_ref())?;
    let occ = load_mask(a[2].as_ref(), Some(img.dimensions()))?;
    let cln = load_rgb(a[3].as_ref())?;
    let (w, h) = img.dimensions();
    let (nw, nh) = ((w as f32 * 256.0 / h as f32).round() as u32, 256);
    let (img, occ, cln) = (resize_rgb(&img, nw, nh), resize_mask(&occ, nw, nh), resize_rgb(&cln, nw, nh));
    let mut c = RgbImage::new(3 * nw, nh);
    for (x, y, p) in img.enumerate_pixels() {
        c.put_pixel(x, y, *p);
        let o = if occ.get_pixel(x, y).0[0] != 0 { image::Rgb([255, 0, 0]) } else { *p };
        c.put_pixel(nw + x, y, o);
        c.put_pixel(2 * nw + x, y, *cln.get_pixel(x, y));
    }
    save_png(a[4].as_ref(), &c)?;
    Ok(())
}
