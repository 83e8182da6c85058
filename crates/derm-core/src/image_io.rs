//! Image and mask IO, resizing, cropping, and conversion to and from NCHW tensors.
//!
//! Every image derm reads goes through [`load_rgb`]: PNG, JPEG, BMP or TIFF, gray, RGBA,
//! 16-bit or palette, with EXIF orientation applied, always returned as 8-bit RGB. Masks go
//! through [`load_mask`], which accepts 0/255, 0/1 and RGB masks and returns a binary mask
//! (0 or 255), checked against the size of its image.
//!
//! Decoding is strict: decoders fill a JPEG that was cut short with flat grey and say nothing,
//! so before decoding, a JPEG's segments are walked to its end-of-image marker
//! ([`check_jpeg_structure`]), a PNG's chunks to `IEND` ([`check_png_structure`]) and a BMP's
//! recorded size is compared with its length ([`check_bmp_size`]); TIFF and everything else
//! rely on the decoder's own errors. A truncated or corrupt file is an error naming the file.

use std::io::Cursor;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::{Error, Result};

/// Image file extensions derm reads (lowercase).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// The largest decoded image derm accepts, in bytes (1 GiB: a 16-bit RGBA image of 11 000 x
/// 11 000 pixels; dermoscopy runs to about 6000 x 4000).
pub const MAX_DECODED_BYTES: u64 = 1 << 30;

/// True when `path` has one of [`IMAGE_EXTENSIONS`].
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

fn decode(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_bytes(bytes, path)
}

/// Decodes an image held in memory (an upload, say); `origin` names it in errors. The same
/// checks as for files apply.
pub fn load_rgb_bytes(bytes: Vec<u8>, origin: &Path) -> Result<RgbImage> {
    Ok(decode_bytes(bytes, origin)?.to_rgb8())
}

fn decode_bytes(bytes: Vec<u8>, path: &Path) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::Image { path: path.into(), msg: "empty file".into() });
    }
    let img_err = |msg: String| Error::Image { path: path.into(), msg };
    let format = image::guess_format(&bytes).ok();
    match format {
        Some(image::ImageFormat::Jpeg) => check_jpeg_structure(&bytes).map_err(img_err)?,
        Some(image::ImageFormat::Png) => check_png_structure(&bytes).map_err(img_err)?,
        Some(image::ImageFormat::Bmp) => check_bmp_size(&bytes).map_err(img_err)?,
        _ => {}
    }
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| img_err(format!("cannot read: {e}")))?;
    if reader.format().is_none() {
        return Err(img_err("not a recognised image format (png, jpeg, bmp, tiff)".into()));
    }
    let mut decoder = reader.into_decoder().map_err(|e| img_err(format!("cannot decode: {e}")))?;
    // Not every decoder honours the allocation limit (a corrupt TIFF header declaring 75 GB made
    // one abort the process): check the declared size before anything is allocated.
    let (w, h) = decoder.dimensions();
    if decoder.total_bytes() > MAX_DECODED_BYTES {
        return Err(img_err(format!(
            "declares {w}x{h} pixels ({} MB decoded), above derm's limit of {} MB: corrupt header or not a dermoscopy image",
            decoder.total_bytes() >> 20,
            MAX_DECODED_BYTES >> 20
        )));
    }
    let orientation = decoder.orientation().ok();
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| img_err(format!("corrupt or truncated image: {e}")))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    if img.width() == 0 || img.height() == 0 {
        return Err(img_err("image has zero width or height".into()));
    }
    Ok(img)
}

/// Walks a JPEG's marker segments and entropy-coded data up to its end-of-image marker.
///
/// Decoders fill a JPEG cut short with flat grey and report success, so a download that stopped
/// half-way would enter training unnoticed; a complete file reaches `FF D9` by its segment
/// structure. Segment lengths are followed (so an embedded EXIF thumbnail's own end marker is
/// skipped), entropy-coded data is scanned for the next marker (stuffed `FF 00` and restart
/// markers belong to the data), and bytes after the end marker are allowed.
pub fn check_jpeg_structure(bytes: &[u8]) -> std::result::Result<(), String> {
    let truncated = |what: &str| Err(format!("truncated jpeg: the file ends {what} before its end-of-image marker"));
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != 0xD8 {
        return Err("not a jpeg: no start-of-image marker".into());
    }
    let n = bytes.len();
    let mut i = 2;
    loop {
        // Junk between segments is tolerated (as libjpeg does, with a warning): find the next 0xFF.
        while i < n && bytes[i] != 0xFF {
            i += 1;
        }
        // Fill bytes.
        while i + 1 < n && bytes[i + 1] == 0xFF {
            i += 1;
        }
        if i + 1 >= n {
            return truncated("after the last segment");
        }
        let marker = bytes[i + 1];
        match marker {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            0x00 => return Err(format!("corrupt jpeg: stray 0xFF00 at byte {i}")),
            _ => {}
        }
        if i + 4 > n {
            return truncated("inside a segment header");
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        if len < 2 {
            return Err(format!("corrupt jpeg: segment 0xFF{marker:02X} at byte {i} has length {len}"));
        }
        let end = i + 2 + len;
        if end > n {
            return truncated(&format!("inside segment 0xFF{marker:02X}"));
        }
        i = end;
        if marker == 0xDA {
            // Entropy-coded data runs to the next marker that is not a stuffed byte or a restart.
            loop {
                match bytes[i..].iter().position(|&b| b == 0xFF) {
                    None => return truncated("inside the compressed image data"),
                    Some(k) => i += k,
                }
                match bytes.get(i + 1) {
                    None => return truncated("inside the compressed image data"),
                    Some(0x00) | Some(0xD0..=0xD7) => i += 2,
                    Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

/// Walks a PNG's chunks up to `IEND`: a file cut after its last image-data chunk still decodes.
pub fn check_png_structure(bytes: &[u8]) -> std::result::Result<(), String> {
    const SIG: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    if bytes.len() < 8 || bytes[..8] != SIG {
        return Err("not a png: bad signature".into());
    }
    let mut i = 8usize;
    loop {
        if i + 8 > bytes.len() {
            return Err("truncated png: the file ends before its IEND chunk".into());
        }
        let len = u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize;
        let kind = &bytes[i + 4..i + 8];
        let end = i.checked_add(12).and_then(|v| v.checked_add(len));
        match end {
            Some(e) if e <= bytes.len() => {
                if kind == b"IEND" {
                    return Ok(());
                }
                i = e;
            }
            _ => {
                return Err(format!(
                    "truncated png: chunk {} at byte {i} needs {len} bytes, the file ends first",
                    String::from_utf8_lossy(kind)
                ))
            }
        }
    }
}

/// Compares a BMP's recorded file size with its length (when the header records one).
pub fn check_bmp_size(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.len() < 14 {
        return Err("truncated bmp: shorter than its file header".into());
    }
    let size = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) as usize;
    if size > bytes.len() {
        return Err(format!("truncated bmp: the header says {size} bytes, the file has {}", bytes.len()));
    }
    Ok(())
}

/// Reads an image as 8-bit RGB, with EXIF orientation applied. 16-bit sources are scaled to 8
/// bits, gray is replicated, alpha is dropped, palettes are expanded.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(decode(path)?.to_rgb8())
}

/// Reads a mask as binary (0 or 255). A mask whose values are all 0 or 1 is read as 0/1; otherwise
/// values of 128 and above (on the 8-bit luma) are foreground. RGB masks are read through their
/// luma. When `expect` is given, a mask of another size is an error.
pub fn load_mask(path: &Path, expect: Option<(u32, u32)>) -> Result<GrayImage> {
    let gray = decode(path)?.to_luma8();
    if let Some((w, h)) = expect {
        if gray.dimensions() != (w, h) {
            return Err(Error::Mask {
                path: path.into(),
                msg: format!("mask is {}x{} but its image is {}x{}", gray.width(), gray.height(), w, h),
            });
        }
    }
    Ok(binarize(&gray))
}

/// Binarises a gray mask to 0/255 with the rule of [`load_mask`].
pub fn binarize(gray: &GrayImage) -> GrayImage {
    let max = gray.pixels().map(|p| p.0[0]).max().unwrap_or(0);
    let thr = if max <= 1 { 1 } else { 128 };
    GrayImage::from_fn(gray.width(), gray.height(), |x, y| {
        image::Luma([if gray.get_pixel(x, y).0[0] >= thr { 255 } else { 0 }])
    })
}

/// Writes a PNG atomically (temporary file, then rename), creating parent folders.
pub fn save_png<P, C>(path: &Path, img: &image::ImageBuffer<P, C>) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut buf = Vec::new();
    img.write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Png)
        .map_err(|e| Error::Image { path: path.into(), msg: format!("cannot encode png: {e}") })?;
    crate::fsutil::write_atomic(path, &buf)
}

/// Per-output-pixel source taps (index, weight) for one axis.
fn axis_weights(src: usize, dst: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|o| {
            if scale > 1.0 {
                // Area: the output pixel covers [o*scale, (o+1)*scale) of the source.
                let a = o as f64 * scale;
                let b = a + scale;
                let mut taps = Vec::new();
                let mut i = a.floor() as usize;
                while (i as f64) < b && i < src {
                    let lo = a.max(i as f64);
                    let hi = b.min(i as f64 + 1.0);
                    if hi > lo {
                        taps.push((i, ((hi - lo) / scale) as f32));
                    }
                    i += 1;
                }
                taps
            } else {
                // Bilinear with half-pixel centres (align_corners = false), clamped at the edges.
                let c = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (c.floor() as usize).min(src - 1);
                let i1 = (i0 + 1).min(src - 1);
                let t = (c - i0 as f64) as f32;
                if i0 == i1 || t == 0.0 {
                    vec![(i0, 1.0)]
                } else {
                    vec![(i0, 1.0 - t), (i1, t)]
                }
            }
        })
        .collect()
}

/// Resizes an interleaved f32 plane of `c` channels: area averaging when shrinking, bilinear
/// when enlarging, separately per axis.
pub fn resize_f32(src: &[f32], w: usize, h: usize, c: usize, nw: usize, nh: usize) -> Vec<f32> {
    let wx = axis_weights(w, nw);
    let wy = axis_weights(h, nh);
    let mut tmp = vec![0f32; h * nw * c];
    for y in 0..h {
        for (ox, taps) in wx.iter().enumerate() {
            for ch in 0..c {
                let mut s = 0f32;
                for &(ix, wt) in taps {
                    s += wt * src[(y * w + ix) * c + ch];
                }
                tmp[(y * nw + ox) * c + ch] = s;
            }
        }
    }
    let mut out = vec![0f32; nh * nw * c];
    for (oy, taps) in wy.iter().enumerate() {
        for x in 0..nw * c {
            let mut s = 0f32;
            for &(iy, wt) in taps {
                s += wt * tmp[iy * nw * c + x];
            }
            out[oy * nw * c + x] = s;
        }
    }
    out
}

fn resize_u8(raw: &[u8], w: u32, h: u32, c: usize, nw: u32, nh: u32) -> Vec<u8> {
    let f: Vec<f32> = raw.iter().map(|&v| v as f32).collect();
    resize_f32(&f, w as usize, h as usize, c, nw as usize, nh as usize)
        .into_iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// Resizes an RGB image (area when shrinking, bilinear when enlarging).
pub fn resize_rgb(img: &RgbImage, nw: u32, nh: u32) -> RgbImage {
    if img.dimensions() == (nw, nh) {
        return img.clone();
    }
    let data = resize_u8(img.as_raw(), img.width(), img.height(), 3, nw, nh);
    RgbImage::from_raw(nw, nh, data).unwrap_or_else(|| RgbImage::new(nw, nh))
}

/// Resizes a binary mask and re-binarises it at one half.
pub fn resize_mask(mask: &GrayImage, nw: u32, nh: u32) -> GrayImage {
    if mask.dimensions() == (nw, nh) {
        return mask.clone();
    }
    let data = resize_u8(mask.as_raw(), mask.width(), mask.height(), 1, nw, nh)
        .into_iter()
        .map(|v| if v >= 128 { 255 } else { 0 })
        .collect();
    GrayImage::from_raw(nw, nh, data).unwrap_or_else(|| GrayImage::new(nw, nh))
}

/// Resizes a gray image without binarising.
pub fn resize_gray(img: &GrayImage, nw: u32, nh: u32) -> GrayImage {
    if img.dimensions() == (nw, nh) {
        return img.clone();
    }
    let data = resize_u8(img.as_raw(), img.width(), img.height(), 1, nw, nh);
    GrayImage::from_raw(nw, nh, data).unwrap_or_else(|| GrayImage::new(nw, nh))
}

/// Scales so the short side is `short`, keeping the aspect ratio.
pub fn resize_short_side(img: &RgbImage, short: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let s = short as f64 / w.min(h) as f64;
    let nw = ((w as f64 * s).round() as u32).max(short);
    let nh = ((h as f64 * s).round() as u32).max(short);
    resize_rgb(img, nw, nh)
}

/// A crop window (x, y, width, height).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Width.
    pub w: u32,
    /// Height.
    pub h: u32,
}

impl Crop {
    /// The centred `w` x `h` window of an image of `iw` x `ih` (clamped to the image).
    pub fn center(iw: u32, ih: u32, w: u32, h: u32) -> Crop {
        let (w, h) = (w.min(iw), h.min(ih));
        Crop { x: (iw - w) / 2, y: (ih - h) / 2, w, h }
    }
    /// A uniformly placed `w` x `h` window.
    pub fn random(iw: u32, ih: u32, w: u32, h: u32, rng: &mut Rng) -> Crop {
        let (w, h) = (w.min(iw), h.min(ih));
        let x = rng.below((iw - w + 1) as usize) as u32;
        let y = rng.below((ih - h + 1) as usize) as u32;
        Crop { x, y, w, h }
    }
    /// Applies the window to any image buffer.
    pub fn apply<I: image::GenericImageView + 'static>(
        &self,
        img: &I,
    ) -> image::ImageBuffer<I::Pixel, Vec<<I::Pixel as image::Pixel>::Subpixel>> {
        image::imageops::crop_imm(img, self.x, self.y, self.w, self.h).to_image()
    }
}

/// Per-channel normalisation `(v / 255 - mean) / std`, optionally after colour constancy
/// ([`shades_of_gray`]), which removes the colour cast of the camera and light so that images
/// from other clinics look alike to a network.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    /// Per-channel mean in [0, 1] units.
    pub mean: [f32; 3],
    /// Per-channel standard deviation in [0, 1] units.
    pub std: [f32; 3],
    /// Shades of Gray colour constancy with this Minkowski norm before normalising (6 is the
    /// ISIC 2018 winners' choice; 1 is grey world); `None`: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shades_of_gray: Option<f32>,
}

impl Normalize {
    /// ImageNet statistics, used by the classifier.
    pub const IMAGENET: Normalize =
        Normalize { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], shades_of_gray: None };
    /// Mean 0.5 and std 0.5: maps [0, 255] to [-1, 1] (segmentation, purification, GANs).
    pub const HALF: Normalize = Normalize { mean: [0.5; 3], std: [0.5; 3], shades_of_gray: None };
    /// No normalisation beyond scaling to [0, 1].
    pub const UNIT: Normalize = Normalize { mean: [0.0; 3], std: [1.0; 3], shades_of_gray: None };
}

/// The per-channel gains of Shades of Gray colour constancy (Finlayson and Trezzi 2004): the
/// light's colour is estimated as the Minkowski `p`-norm mean of each channel, and each channel
/// is scaled so that the estimate becomes grey (of the estimates' mean, so brightness stays).
/// A flat channel (all zero) keeps gain 1.
pub fn shades_of_gray_gains(img: &RgbImage, p: f32) -> [f32; 3] {
    let p = f64::from(p.max(1.0));
    let mut sums = [0f64; 3];
    for px in img.pixels() {
        for (sum, v) in sums.iter_mut().zip(px.0) {
            *sum += (f64::from(v) / 255.0).powf(p);
        }
    }
    let n = (img.width() as f64 * img.height() as f64).max(1.0);
    let e = sums.map(|s| (s / n).powf(1.0 / p));
    let grey = (e[0] + e[1] + e[2]) / 3.0;
    e.map(|ec| if ec > 1e-9 { (grey / ec) as f32 } else { 1.0 })
}

/// `img` with Shades of Gray colour constancy of norm `p` applied (values clamped to 255).
pub fn shades_of_gray(img: &RgbImage, p: f32) -> RgbImage {
    let g = shades_of_gray_gains(img, p);
    let mut out = img.clone();
    for px in out.pixels_mut() {
        for (v, gain) in px.0.iter_mut().zip(g) {
            *v = (f32::from(*v) * gain).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize::HALF
    }
}

/// Stacks RGB images of one size into a normalised (N, 3, H, W) f32 tensor.
pub fn images_to_tensor(imgs: &[&RgbImage], norm: Normalize, device: &Device) -> Result<Tensor> {
    let Some(first) = imgs.first() else {
        return Err(Error::invalid("images_to_tensor: no images"));
    };
    let (w, h) = first.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; imgs.len() * 3 * plane];
    for (n, img) in imgs.iter().enumerate() {
        if img.dimensions() != (w, h) {
            return Err(Error::invalid(format!(
                "images_to_tensor: image {n} is {}x{}, the first is {w}x{h}",
                img.width(),
                img.height()
            )));
        }
        let base = n * 3 * plane;
        let gain = norm.shades_of_gray.map_or([1.0; 3], |p| shades_of_gray_gains(img, p));
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                let v = (p.0[c] as f32 * gain[c]).min(255.0);
                data[base + c * plane + i] = (v / 255.0 - norm.mean[c]) / norm.std[c];
            }
        }
    }
    Ok(Tensor::from_vec(data, (imgs.len(), 3, h as usize, w as usize), device)?)
}

/// Stacks binary masks of one size into an (N, 1, H, W) f32 tensor of 0 and 1.
pub fn masks_to_tensor(masks: &[&GrayImage], device: &Device) -> Result<Tensor> {
    let Some(first) = masks.first() else {
        return Err(Error::invalid("masks_to_tensor: no masks"));
    };
    let (w, h) = first.dimensions();
    let mut data = Vec::with_capacity(masks.len() * (w * h) as usize);
    for (n, m) in masks.iter().enumerate() {
        if m.dimensions() != (w, h) {
            return Err(Error::invalid(format!("masks_to_tensor: mask {n} has another size")));
        }
        data.extend(m.as_raw().iter().map(|&v| if v >= 128 { 1f32 } else { 0f32 }));
    }
    Ok(Tensor::from_vec(data, (masks.len(), 1, h as usize, w as usize), device)?)
}

/// Turns a normalised (N, 3, H, W) tensor back into RGB images (values clamped).
pub fn tensor_to_images(t: &Tensor, norm: Normalize) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = t.dims4()?;
    if c != 3 {
        return Err(Error::invalid(format!("tensor_to_images: expected 3 channels, got {c}")));
    }
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    Ok((0..n)
        .map(|i| {
            let base = i * 3 * plane;
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let j = y as usize * w + x as usize;
                let px = |ch: usize| {
                    let v = (data[base + ch * plane + j] * norm.std[ch] + norm.mean[ch]) * 255.0;
                    v.round().clamp(0.0, 255.0) as u8
                };
                image::Rgb([px(0), px(1), px(2)])
            })
        })
        .collect())
}

/// Turns an (N, 1, H, W) tensor of values in [0, 1] into gray images (0..255).
pub fn tensor_to_gray(t: &Tensor) -> Result<Vec<GrayImage>> {
    let (n, c, h, w) = t.dims4()?;
    if c != 1 {
        return Err(Error::invalid(format!("tensor_to_gray: expected 1 channel, got {c}")));
    }
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..n)
        .map(|i| {
            let base = i * h * w;
            GrayImage::from_fn(w as u32, h as u32, |x, y| {
                let v = data[base + y as usize * w + x as usize];
                image::Luma([(v * 255.0).round().clamp(0.0, 255.0) as u8])
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shades_of_gray_removes_a_colour_cast_and_keeps_neutral_images() {
        // Grey patches of several levels under a reddish light: R x1.25, B x0.8.
        let cast = RgbImage::from_fn(40, 30, |x, y| {
            let v = 40.0 + 4.0 * ((x / 8 + y / 6) % 5) as f32 * 10.0;
            image::Rgb([(v * 1.25).round() as u8, v.round() as u8, (v * 0.8).round() as u8])
        });
        let fixed = shades_of_gray(&cast, 6.0);
        let mean = |img: &RgbImage, c: usize| img.pixels().map(|p| f64::from(p.0[c])).sum::<f64>() / 1200.0;
        let m: Vec<f64> = (0..3).map(|c| mean(&fixed, c)).collect();
        assert!((m[0] - m[2]).abs() < 1.5 && (m[0] - m[1]).abs() < 1.5, "channel means after: {m:?}");
        assert!((mean(&cast, 0) - mean(&cast, 2)).abs() > 30.0, "the test image has a cast");
        // A neutral image is left as it is; a black one too (no division by zero).
        let grey = RgbImage::from_fn(9, 7, |x, y| image::Rgb([(20 * (x + y)) as u8; 3]));
        assert_eq!(shades_of_gray(&grey, 6.0), grey);
        assert_eq!(shades_of_gray(&RgbImage::new(3, 3), 6.0), RgbImage::new(3, 3));
        // The network input applies the same correction; configs without the field still load.
        let norm = Normalize { shades_of_gray: Some(6.0), ..Normalize::UNIT };
        let t = images_to_tensor(&[&cast], norm, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let means: Vec<f32> = v.chunks(1200).map(|ch| ch.iter().sum::<f32>() / 1200.0 * 255.0).collect();
        assert!((means[0] - means[2]).abs() < 1.5, "{means:?}");
        let old: Normalize = serde_json::from_str(r#"{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}"#).unwrap();
        assert_eq!(old, Normalize::HALF);
    }

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn reads_gray_rgba_and_16_bit_as_rgb8() {
        let d = tmp();
        let p = d.path().join("g.png");
        GrayImage::from_pixel(3, 2, image::Luma([40])).save(&p).unwrap();
        let img = load_rgb(&p).unwrap();
        assert_eq!(img.dimensions(), (3, 2));
        assert_eq!(img.get_pixel(1, 1).0, [40, 40, 40]);
        let p = d.path().join("a.png");
        image::RgbaImage::from_pixel(2, 2, image::Rgba([10, 20, 30, 0])).save(&p).unwrap();
        assert_eq!(load_rgb(&p).unwrap().get_pixel(0, 0).0, [10, 20, 30]);
        let p = d.path().join("16.png");
        image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_pixel(2, 2, image::Rgb([65535, 0, 32896]))
            .save(&p)
            .unwrap();
        assert_eq!(load_rgb(&p).unwrap().get_pixel(0, 0).0, [255, 0, 128]);
    }

    #[test]
    fn corrupt_truncated_and_empty_files_name_the_file() {
        let d = tmp();
        let p = d.path().join("x.png");
        let mut buf = Vec::new();
        RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3]))
            .write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Png)
            .unwrap();
        std::fs::write(&p, &buf[..buf.len() / 2]).unwrap();
        let e = load_rgb(&p).unwrap_err().to_string();
        assert!(e.contains("x.png"), "{e}");
        let p = d.path().join("e.jpg");
        std::fs::write(&p, b"").unwrap();
        assert!(load_rgb(&p).unwrap_err().to_string().contains("empty"));
        let p = d.path().join("t.jpg");
        std::fs::write(&p, b"hello, not an image").unwrap();
        let e = load_rgb(&p).unwrap_err().to_string();
        assert!(e.contains("t.jpg") && e.contains("not a recognised"), "{e}");
        let e = load_rgb(&d.path().join("missing.png")).unwrap_err().to_string();
        assert!(e.contains("missing.png"), "{e}");
    }

    fn encoded(format: image::ImageFormat) -> Vec<u8> {
        // A noisy image, so compressed data is long and not one repeated run.
        let img = RgbImage::from_fn(40, 30, |x, y| {
            let v = (x * 37 + y * 101 + x * y * 7) as u8;
            image::Rgb([v, v.wrapping_mul(3), 255 - v])
        });
        let mut buf = Vec::new();
        img.write_to(&mut Cursor::new(&mut buf), format).unwrap();
        buf
    }

    #[test]
    fn truncated_files_of_every_format_are_errors_naming_the_file() {
        let d = tmp();
        for (format, ext) in [
            (image::ImageFormat::Jpeg, "jpg"),
            (image::ImageFormat::Png, "png"),
            (image::ImageFormat::Bmp, "bmp"),
            (image::ImageFormat::Tiff, "tif"),
        ] {
            let full = encoded(format);
            let p = d.path().join(format!("whole.{ext}"));
            std::fs::write(&p, &full).unwrap();
            assert_eq!(load_rgb(&p).unwrap().dimensions(), (40, 30), "{ext}");
            // Cut anywhere from the header to the last byte: never accepted.
            for keep in [full.len() / 10, full.len() / 2, full.len() * 9 / 10, full.len() - 2, full.len() - 1] {
                let p = d.path().join(format!("cut_{keep}.{ext}"));
                std::fs::write(&p, &full[..keep]).unwrap();
                let e = load_rgb(&p).expect_err(&format!("{ext} cut to {keep} of {} bytes was accepted", full.len()));
                assert!(e.to_string().contains(&format!("cut_{keep}.{ext}")), "{e}");
            }
        }
    }

    #[test]
    fn jpeg_walk_skips_thumbnails_and_allows_trailing_bytes() {
        let full = encoded(image::ImageFormat::Jpeg);
        let mut trailing = full.clone();
        trailing.extend_from_slice(b"\0\0camera padding");
        assert!(check_jpeg_structure(&trailing).is_ok());
        // An APP1 segment holding a complete thumbnail (with its own FF D9) before the image data:
        // cutting the main image must still be caught.
        let mut thumb = vec![0xFF, 0xE1, 0x00, 0x00];
        thumb.extend_from_slice(b"Exif\0\0");
        thumb.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xD9]);
        let len = (thumb.len() - 2) as u16;
        thumb[2..4].copy_from_slice(&len.to_be_bytes());
        let mut with_thumb = full[..2].to_vec();
        with_thumb.extend_from_slice(&thumb);
        with_thumb.extend_from_slice(&full[2..]);
        assert!(check_jpeg_structure(&with_thumb).is_ok());
        let cut = &with_thumb[..with_thumb.len() - 100];
        assert!(check_jpeg_structure(cut).unwrap_err().contains("truncated"));
        let d = tmp();
        let p = d.path().join("thumb.jpg");
        std::fs::write(&p, &with_thumb).unwrap();
        assert_eq!(load_rgb(&p).unwrap().dimensions(), (40, 30));
        assert!(load_rgb_bytes(cut.to_vec(), Path::new("upload.jpg")).unwrap_err().to_string().contains("upload.jpg"));
    }

    #[test]
    fn masks_0_1_and_0_255_and_rgb_binarise_and_size_is_checked() {
        let d = tmp();
        let p = d.path().join("m01.png");
        GrayImage::from_fn(4, 4, |x, _| image::Luma([(x % 2) as u8])).save(&p).unwrap();
        let m = load_mask(&p, Some((4, 4))).unwrap();
        assert_eq!(m.get_pixel(1, 0).0[0], 255);
        assert_eq!(m.get_pixel(0, 0).0[0], 0);
        let p = d.path().join("rgb.png");
        RgbImage::from_fn(4, 4, |x, _| if x < 2 { image::Rgb([255, 255, 255]) } else { image::Rgb([0, 0, 0]) })
            .save(&p)
            .unwrap();
        let m = load_mask(&p, None).unwrap();
        assert_eq!((m.get_pixel(0, 0).0[0], m.get_pixel(3, 0).0[0]), (255, 0));
        let e = load_mask(&p, Some((5, 4))).unwrap_err().to_string();
        assert!(e.contains("rgb.png") && e.contains("4x4") && e.contains("5x4"), "{e}");
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 2x1 JPEG with orientation 6 (rotate 90 degrees clockwise) must read as 1x2.
        let img =
            RgbImage::from_fn(16, 8, |x, _| if x < 8 { image::Rgb([250, 0, 0]) } else { image::Rgb([0, 0, 250]) });
        let mut jpg = Vec::new();
        img.write_to(&mut Cursor::new(&mut jpg), image::ImageFormat::Jpeg).unwrap();
        // Insert an APP1 Exif segment after SOI.
        let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        exif.extend_from_slice(&[0x01, 0x12, 0x00, 0x03, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
        let len = (exif.len() + 2) as u16;
        let mut out = jpg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&exif);
        out.extend_from_slice(&jpg[2..]);
        let d = tmp();
        let p = d.path().join("o.jpg");
        std::fs::write(&p, out).unwrap();
        let r = load_rgb(&p).unwrap();
        assert_eq!(r.dimensions(), (8, 16));
        // After a clockwise turn the left (red) half is at the top.
        assert!(r.get_pixel(4, 2).0[0] > 200, "{:?}", r.get_pixel(4, 2));
    }

    #[test]
    fn area_shrink_averages_and_bilinear_enlarge_interpolates() {
        let img = RgbImage::from_fn(4, 4, |x, _| image::Rgb([if x < 2 { 0 } else { 200 }, 0, 0]));
        let s = resize_rgb(&img, 2, 2);
        assert_eq!(s.get_pixel(0, 0).0[0], 0);
        assert_eq!(s.get_pixel(1, 1).0[0], 200);
        let s = resize_rgb(&img, 1, 1);
        assert_eq!(s.get_pixel(0, 0).0[0], 100);
        let small = RgbImage::from_fn(2, 1, |x, _| image::Rgb([if x == 0 { 0 } else { 100 }, 0, 0]));
        let big = resize_rgb(&small, 4, 1);
        let v: Vec<u8> = (0..4).map(|x| big.get_pixel(x, 0).0[0]).collect();
        assert_eq!(v, vec![0, 25, 75, 100]);
    }

    #[test]
    fn tensor_round_trip_and_crops() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([(x * 40) as u8, (y * 60) as u8, 7]));
        for norm in [Normalize::HALF, Normalize::IMAGENET] {
            let t = images_to_tensor(&[&img, &img], norm, &Device::Cpu).unwrap();
            assert_eq!(t.dims(), &[2, 3, 3, 5]);
            let back = tensor_to_images(&t, norm).unwrap();
            assert_eq!(back[1], img);
        }
        let c = Crop::center(5, 3, 3, 3);
        assert_eq!((c.x, c.y), (1, 0));
        let cropped = c.apply(&img);
        assert_eq!(cropped.get_pixel(0, 0), img.get_pixel(1, 0));
        let mut rng = Rng::new(1);
        for _ in 0..20 {
            let c = Crop::random(5, 3, 2, 2, &mut rng);
            assert!(c.x + c.w <= 5 && c.y + c.h <= 3);
        }
    }
}
