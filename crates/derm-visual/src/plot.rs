//! Figures drawn straight into [`RgbImage`]s, ready for [`derm_core::image_io::save_png`]: line plots
//! (loss curves, ROC curves), histograms, confusion matrices, heat-map and mask overlays, and
//! sample grids.
//!
//! Text is DejaVu Sans (Bitstream Vera licence, `assets/LICENSE-DejaVu.txt`), embedded in the crate
//! and rasterised with `ab_glyph`, so drawing needs neither system fonts nor a network. Every
//! function here is infallible: inputs that do not fit (a heat map of the wrong length, a
//! confusion matrix with a short row) are drawn as well as they can be and logged with `tracing`.
//!
//! **Consumes:** numbers, `RgbImage`s, `GrayImage` masks. **Produces:** `RgbImage`s.

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, Glyph, PxScale, ScaleFont};
use image::{GrayImage, Rgb, RgbImage};

use derm_core::image_io::{resize_mask, resize_rgb};

static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn font() -> Option<&'static FontRef<'static>> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).ok()).as_ref()
}

const WHITE: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [34, 34, 34];
const MUTED: [u8; 3] = [100, 100, 100];
const GRID: [u8; 3] = [228, 228, 228];
const MINOR_GRID: [u8; 3] = [243, 243, 243];
const FRAME: [u8; 3] = [120, 120, 120];
const TITLE_PX: f32 = 21.0;
const LABEL_PX: f32 = 17.0;
const TICK_PX: f32 = 15.0;
const LEGEND_PX: f32 = 15.0;

/// Matplotlib's "tab10" colours, used for series without a colour of their own.
pub const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

// ---------------------------------------------------------------------------------------------
// Pixels and text
// ---------------------------------------------------------------------------------------------

/// Blends `color` over the pixel at (x, y) with opacity `a`; pixels outside the image are skipped.
fn blend(img: &mut RgbImage, x: i32, y: i32, color: [u8; 3], a: f32) {
    if x < 0 || y < 0 || x as u32 >= img.width() || y as u32 >= img.height() || a <= 0.0 {
        return;
    }
    let a = a.min(1.0);
    let p = img.get_pixel_mut(x as u32, y as u32);
    for (c, &t) in p.0.iter_mut().zip(color.iter()) {
        *c = (*c as f32 * (1.0 - a) + t as f32 * a).round() as u8;
    }
}

/// Fills the rectangle [x0, x1) x [y0, y1) (clipped to the image) with `color` at opacity `a`.
fn fill_rect(img: &mut RgbImage, x0: i32, y0: i32, x1: i32, y1: i32, color: [u8; 3], a: f32) {
    for y in y0.max(0)..y1.min(img.height() as i32) {
        for x in x0.max(0)..x1.min(img.width() as i32) {
            blend(img, x, y, color, a);
        }
    }
}

/// Draws the 1-pixel outline of the rectangle [x0, x1] x [y0, y1] (inclusive).
fn stroke_rect(img: &mut RgbImage, x0: i32, y0: i32, x1: i32, y1: i32, color: [u8; 3]) {
    fill_rect(img, x0, y0, x1 + 1, y0 + 1, color, 1.0);
    fill_rect(img, x0, y1, x1 + 1, y1 + 1, color, 1.0);
    fill_rect(img, x0, y0, x0 + 1, y1 + 1, color, 1.0);
    fill_rect(img, x1, y0, x1 + 1, y1 + 1, color, 1.0);
}

/// A coverage mask of rendered text, `w` x `h`, row-major, values in [0, 1].
struct TextMask {
    w: usize,
    h: usize,
    a: Vec<f32>,
}

fn layout<F: Font, SF: ScaleFont<F>>(sf: &SF, text: &str) -> (Vec<Glyph>, f32) {
    let mut caret = 0.0f32;
    let mut prev = None;
    let mut glyphs = Vec::with_capacity(text.len());
    for ch in text.chars().filter(|c| !c.is_control()) {
        let id = sf.glyph_id(ch);
        if let Some(p) = prev {
            caret += sf.kern(p, id);
        }
        glyphs.push(id.with_scale_and_position(sf.scale(), point(caret, sf.ascent())));
        caret += sf.h_advance(id);
        prev = Some(id);
    }
    (glyphs, caret)
}

fn text_mask(px: f32, text: &str) -> Option<TextMask> {
    let f = font()?;
    let sf = f.as_scaled(PxScale::from(px.max(1.0)));
    let (glyphs, width) = layout(&sf, text);
    let w = width.ceil().max(0.0) as usize + 2;
    let h = text_height(px) as usize;
    let mut a = vec![0f32; w * h];
    for g in glyphs {
        if let Some(og) = f.outline_glyph(g) {
            let b = og.px_bounds();
            og.draw(|gx, gy, c| {
                let x = b.min.x as i32 + gx as i32;
                let y = b.min.y as i32 + gy as i32;
                if x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h {
                    let i = y as usize * w + x as usize;
                    a[i] = (a[i] + c).min(1.0);
                }
            });
        }
    }
    Some(TextMask { w, h, a })
}

/// Width in pixels of `text` set at `px` pixels (the font's ascent-to-descent height).
pub fn text_width(px: f32, text: &str) -> u32 {
    match font() {
        Some(f) => layout(&f.as_scaled(PxScale::from(px.max(1.0))), text).1.ceil().max(0.0) as u32,
        None => 0,
    }
}

/// Height in pixels of one line of text set at `px`.
pub fn text_height(px: f32) -> u32 {
    match font() {
        Some(f) => {
            let sf = f.as_scaled(PxScale::from(px.max(1.0)));
            (sf.ascent() - sf.descent()).ceil().max(1.0) as u32 + 1
        }
        None => px.ceil().max(1.0) as u32,
    }
}

/// Draws `text` with its line box's top-left corner at (x, y), `px` pixels high, anti-aliased
/// onto the image. Parts outside the image are clipped.
pub fn draw_text(img: &mut RgbImage, x: i32, y: i32, px: f32, text: &str, color: [u8; 3]) {
    if let Some(m) = text_mask(px, text) {
        for my in 0..m.h {
            for mx in 0..m.w {
                let c = m.a[my * m.w + mx];
                if c > 0.0 {
                    blend(img, x + mx as i32, y + my as i32, color, c);
                }
            }
        }
    }
}

/// Draws `text` rotated a quarter turn anticlockwise (reading upwards), its box's top-left
/// corner at (x, y). The box is [`text_height`] wide and [`text_width`] (+2) high.
pub fn draw_text_vertical(img: &mut RgbImage, x: i32, y: i32, px: f32, text: &str, color: [u8; 3]) {
    if let Some(m) = text_mask(px, text) {
        for my in 0..m.h {
            for mx in 0..m.w {
                let c = m.a[my * m.w + mx];
                if c > 0.0 {
                    blend(img, x + my as i32, y + (m.w - 1 - mx) as i32, color, c);
                }
            }
        }
    }
}

/// Draws `text` centred horizontally on `cx`.
fn draw_text_centered(img: &mut RgbImage, cx: i32, y: i32, px: f32, text: &str, color: [u8; 3]) {
    let w = text_width(px, text) as i32;
    draw_text(img, cx - w / 2, y, px, text, color);
}

/// Draws `text` with its right edge at `rx`.
fn draw_text_right(img: &mut RgbImage, rx: i32, y: i32, px: f32, text: &str, color: [u8; 3]) {
    let w = text_width(px, text) as i32;
    draw_text(img, rx - w, y, px, text, color);
}

/// `text`, cut and ended with an ellipsis so that it fits in `max_w` pixels.
fn fit_text(px: f32, text: &str, max_w: u32) -> String {
    if text_width(px, text) <= max_w {
        return text.to_string();
    }
    let chars: Vec<char> = text.chars().collect();
    for n in (0..chars.len()).rev() {
        let s: String = chars[..n].iter().collect::<String>() + "…";
        if text_width(px, &s) <= max_w {
            return s;
        }
    }
    String::new()
}

// ---------------------------------------------------------------------------------------------
// Anti-aliased strokes
// ---------------------------------------------------------------------------------------------

/// A coverage layer the size of an image: strokes are accumulated with `max`, so joints and
/// overlapping segments of one series do not darken, then composited once.
struct Layer {
    w: i32,
    h: i32,
    a: Vec<f32>,
}

impl Layer {
    fn new(w: u32, h: u32) -> Self {
        Layer { w: w as i32, h: h as i32, a: vec![0.0; w as usize * h as usize] }
    }

    /// A segment between two points in continuous pixel coordinates (pixel (i, j) has its centre
    /// at (i + 0.5, j + 0.5)), `width` pixels wide, with round caps.
    fn segment(&mut self, p0: (f64, f64), p1: (f64, f64), width: f64) {
        let (x0, y0) = p0;
        let (x1, y1) = p1;
        if ![x0, y0, x1, y1].iter().all(|v| v.is_finite()) {
            return;
        }
        let r = width / 2.0;
        let pad = r + 1.0;
        let bx0 = (x0.min(x1) - pad).floor().max(0.0) as i32;
        let bx1 = ((x0.max(x1) + pad).ceil().min(self.w as f64)) as i32;
        let by0 = (y0.min(y1) - pad).floor().max(0.0) as i32;
        let by1 = ((y0.max(y1) + pad).ceil().min(self.h as f64)) as i32;
        let (dx, dy) = (x1 - x0, y1 - y0);
        let len2 = dx * dx + dy * dy;
        for py in by0..by1 {
            for px in bx0..bx1 {
                let (cx, cy) = (px as f64 + 0.5, py as f64 + 0.5);
                let t = if len2 > 0.0 { (((cx - x0) * dx + (cy - y0) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
                let (qx, qy) = (x0 + t * dx - cx, y0 + t * dy - cy);
                let d = (qx * qx + qy * qy).sqrt();
                let c = (r + 0.5 - d).clamp(0.0, 1.0) as f32;
                if c > 0.0 {
                    let i = (py * self.w + px) as usize;
                    self.a[i] = self.a[i].max(c);
                }
            }
        }
    }

    /// A dashed segment: `dash` pixels drawn, `gap` pixels skipped.
    fn dashed(&mut self, p0: (f64, f64), p1: (f64, f64), width: f64, dash: f64, gap: f64) {
        let (dx, dy) = (p1.0 - p0.0, p1.1 - p0.1);
        let len = (dx * dx + dy * dy).sqrt();
        if !len.is_finite() || len == 0.0 {
            return;
        }
        let (ux, uy) = (dx / len, dy / len);
        let mut s = 0.0;
        while s < len {
            let e = (s + dash).min(len);
            self.segment((p0.0 + ux * s, p0.1 + uy * s), (p0.0 + ux * e, p0.1 + uy * e), width);
            s += dash + gap;
        }
    }

    /// A filled disc of radius `r` centred at (cx, cy).
    fn disc(&mut self, cx: f64, cy: f64, r: f64) {
        self.segment((cx, cy), (cx, cy), 2.0 * r);
    }

    /// Blends `color` onto `img` through the coverage, inside the clip rectangle [x0, x1) x [y0, y1).
    fn composite(&self, img: &mut RgbImage, color: [u8; 3], clip: (i32, i32, i32, i32)) {
        let (x0, y0, x1, y1) = clip;
        for y in y0.max(0)..y1.min(self.h) {
            for x in x0.max(0)..x1.min(self.w) {
                let c = self.a[(y * self.w + x) as usize];
                if c > 0.0 {
                    blend(img, x, y, color, c);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Axes and ticks
// ---------------------------------------------------------------------------------------------

/// One axis: its data range, whether it is logarithmic, whether ticks must be integers.
#[derive(Debug, Clone, Copy)]
struct AxisSpec {
    lo: f64,
    hi: f64,
    log: bool,
    integer: bool,
}

impl AxisSpec {
    /// Position of `v` on the axis in [0, 1] (outside for values out of range), `None` where the
    /// value cannot be placed (non-finite, or not positive on a log axis).
    fn norm(&self, v: f64) -> Option<f64> {
        if !v.is_finite() {
            return None;
        }
        if self.log {
            if v <= 0.0 {
                return None;
            }
            let (a, b) = (self.lo.log10(), self.hi.log10());
            Some((v.log10() - a) / (b - a))
        } else {
            Some((v - self.lo) / (self.hi - self.lo))
        }
    }
}

struct Ticks {
    major: Vec<f64>,
    minor: Vec<f64>,
    labels: Vec<String>,
}

/// A "nice" tick step (1, 2, 2.5 or 5 times a power of ten) giving about `target` intervals.
fn nice_step(range: f64, target: usize, integer: bool) -> f64 {
    let raw = range / target.max(1) as f64;
    if !raw.is_finite() || raw <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nf = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 && (!integer || mag >= 10.0) {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    let step = nf * mag;
    if integer {
        step.max(1.0).round()
    } else {
        step
    }
}

/// The fewest decimals (up to 8) that print every value exactly.
fn decimals_for(vals: &[f64]) -> usize {
    vals.iter()
        .map(|&v| {
            (0..=8)
                .find(|&d| {
                    let s = v * 10f64.powi(d as i32);
                    (s - s.round()).abs() < 1e-6 * s.abs().max(1.0)
                })
                .unwrap_or(8)
        })
        .max()
        .unwrap_or(0)
}

/// `v` in short scientific notation: `1e-4`, `2.5e6`.
fn sci(v: f64) -> String {
    let e = v.abs().log10().floor() as i32;
    let m = v / 10f64.powi(e);
    let ms = format!("{m:.2}");
    let ms = ms.trim_end_matches('0').trim_end_matches('.');
    if ms == "1" {
        format!("1e{e}")
    } else if ms == "-1" {
        format!("-1e{e}")
    } else {
        format!("{ms}e{e}")
    }
}

/// Labels for linear ticks: shared decimals, or scientific notation for very large or small values.
fn linear_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let big = ticks.iter().fold(0f64, |m, v| m.max(v.abs()));
    let clean: Vec<f64> = ticks.iter().map(|&v| if v.abs() < step.abs() * 1e-6 { 0.0 } else { v }).collect();
    if big >= 1e5 || (big > 0.0 && big < 1e-3) {
        return clean.iter().map(|&v| if v == 0.0 { "0".into() } else { sci(v) }).collect();
    }
    let d = decimals_for(&clean);
    clean.iter().map(|&v| format!("{v:.d$}")).collect()
}

fn log_label(v: f64) -> String {
    if !(1e-2..1e4).contains(&v) {
        sci(v)
    } else {
        let d = decimals_for(&[v]);
        format!("{v:.d$}")
    }
}

fn linear_ticks(spec: &AxisSpec, target: usize) -> Ticks {
    let (lo, hi) = (spec.lo, spec.hi);
    let step = nice_step(hi - lo, target, spec.integer);
    let eps = step * 1e-9;
    let mut major = Vec::new();
    let mut k = (lo / step).ceil();
    while k * step <= hi + eps && major.len() < 100 {
        major.push(k * step);
        k += 1.0;
    }
    let labels = linear_labels(&major, step);
    Ticks { major, minor: Vec::new(), labels }
}

fn log_ticks(spec: &AxisSpec, target: usize) -> Ticks {
    let (lo, hi) = (spec.lo, spec.hi);
    let within = |v: f64| v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9);
    let a = lo.log10().floor() as i32;
    let b = hi.log10().ceil() as i32;
    let decades = (b - a).max(1);
    let every = ((decades as f64 / target.max(1) as f64).ceil() as i32).max(1);
    let mut major: Vec<f64> =
        (a..=b).filter(|k| (k - a) % every == 0).map(|k| 10f64.powi(k)).filter(|&v| within(v)).collect();
    // Under about two decades, powers of ten alone are too sparse: add 2 and 5, then every digit.
    for mantissas in [&[1.0, 2.0, 5.0][..], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0][..]] {
        if major.len() < 3 {
            major =
                (a..=b).flat_map(|k| mantissas.iter().map(move |m| m * 10f64.powi(k))).filter(|&v| within(v)).collect();
        }
    }
    if major.len() < 2 {
        // Less than a factor of 2.5 in range: linear ticks read better.
        let t = linear_ticks(spec, target);
        return Ticks { major: t.major.into_iter().filter(|&v| v > 0.0).collect(), ..t }.relabel_positive();
    }
    let minor = if decades <= 6 {
        (a..=b)
            .flat_map(|k| (2..=9).map(move |m| m as f64 * 10f64.powi(k)))
            .filter(|&v| within(v) && !major.iter().any(|&t| (t - v).abs() < v * 1e-9))
            .collect()
    } else {
        Vec::new()
    };
    let labels = major.iter().map(|&v| log_label(v)).collect();
    Ticks { major, minor, labels }
}

impl Ticks {
    fn relabel_positive(self) -> Ticks {
        let step = if self.major.len() >= 2 { self.major[1] - self.major[0] } else { 1.0 };
        let labels = linear_labels(&self.major, step);
        Ticks { labels, ..self }
    }
}

fn ticks_for(spec: &AxisSpec, target: usize) -> Ticks {
    if spec.log {
        log_ticks(spec, target)
    } else {
        linear_ticks(spec, target)
    }
}

/// A data range that can be drawn: finite, non-empty, positive on a log axis.
fn sane_range(lo: f64, hi: f64, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() { (lo.min(hi), lo.max(hi)) } else { (0.0, 1.0) };
    if log {
        if hi <= 0.0 {
            return (0.1, 1.0);
        }
        if lo <= 0.0 {
            lo = hi / 10.0;
        }
        if hi / lo < 1.0 + 1e-9 {
            return (lo / 2.0, hi * 2.0);
        }
        return (lo, hi);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = if lo == 0.0 { 0.5 } else { lo.abs() * 0.1 };
        lo -= d;
        hi += d;
    }
    (lo, hi)
}

/// Widens a range by `frac` of its span on each side (in log space for a log axis).
fn pad_range(lo: f64, hi: f64, log: bool, frac: f64) -> (f64, f64) {
    if log {
        let (a, b) = (lo.log10(), hi.log10());
        let d = (b - a) * frac;
        (10f64.powf(a - d), 10f64.powf(b + d))
    } else {
        let d = (hi - lo) * frac;
        (lo - d, hi + d)
    }
}

/// A figure with a frame, grid, ticks, tick labels, title and axis labels drawn, ready for data.
/// The plot area's frame lies on pixel columns `left` and `right` and rows `top` and `bottom`.
struct Chart {
    img: RgbImage,
    left: i32,
    top: i32,
    right: i32,
    bottom: i32,
    x: AxisSpec,
    y: AxisSpec,
}

impl Chart {
    fn new(w: u32, h: u32, title: &str, x_label: &str, y_label: &str, x: AxisSpec, y: AxisSpec) -> Chart {
        let w = w.max(160);
        let h = h.max(120);
        let mut img = RgbImage::from_pixel(w, h, Rgb(WHITE));
        let (wi, hi) = (w as i32, h as i32);
        let th = text_height(TICK_PX) as i32;
        let lh = text_height(LABEL_PX) as i32;
        let mut top = 14;
        if !title.is_empty() {
            let t = fit_text(TITLE_PX, title, w.saturating_sub(20));
            draw_text_centered(&mut img, wi / 2, 10, TITLE_PX, &t, INK);
            top = 10 + text_height(TITLE_PX) as i32 + 12;
        }
        let mut bottom_margin = 5 + 4 + th + 10;
        if !x_label.is_empty() {
            bottom_margin += lh + 4;
        }
        let bottom = hi - bottom_margin;
        let plot_h = (bottom - top).max(20);
        let yt = ticks_for(&y, (plot_h / 60).clamp(3, 10) as usize);
        let max_yw = yt.labels.iter().map(|l| text_width(TICK_PX, l) as i32).max().unwrap_or(0);
        let mut left = 12 + max_yw + 6 + 5;
        if !y_label.is_empty() {
            left += lh + 8;
        }
        let right = wi - 26;
        let plot_w = (right - left).max(20);

        let mut chart = Chart { img, left, top, right: left + plot_w, bottom: top + plot_h, x, y };
        // X ticks: the most that fit with a gap between neighbouring labels.
        let mut xt = ticks_for(&x, 2);
        for target in (2..=((plot_w / 80).clamp(2, 10) as usize)).rev() {
            let t = ticks_for(&x, target);
            let pos: Vec<f64> = t.major.iter().filter_map(|&v| chart.fx(v)).collect();
            let ws: Vec<f64> = t.labels.iter().map(|l| text_width(TICK_PX, l) as f64).collect();
            let fits = pos.windows(2).zip(ws.windows(2)).all(|(p, w)| p[1] - p[0] >= (w[0] + w[1]) / 2.0 + 14.0);
            if fits {
                xt = t;
                break;
            }
        }
        chart.draw_grid(&xt, &yt);
        let (l, t, r, b) = (chart.left, chart.top, chart.right, chart.bottom);
        let img = &mut chart.img;
        stroke_rect(img, l, t, r, b, FRAME);
        for (v, s) in xt.major.iter().zip(&xt.labels) {
            if let Some(px) = Some(v).and_then(|&v| x.norm(v)).map(|n| l as f64 + n * (r - l) as f64) {
                let c = px.round() as i32;
                fill_rect(img, c, b + 1, c + 1, b + 6, FRAME, 1.0);
                draw_text_centered(img, c, b + 8, TICK_PX, s, INK);
            }
        }
        for (v, s) in yt.major.iter().zip(&yt.labels) {
            if let Some(py) = y.norm(*v).map(|n| b as f64 - n * (b - t) as f64) {
                let c = py.round() as i32;
                fill_rect(img, l - 5, c, l, c + 1, FRAME, 1.0);
                draw_text_right(img, l - 8, c - th / 2, TICK_PX, s, INK);
            }
        }
        if !x_label.is_empty() {
            draw_text_centered(img, (l + r) / 2, b + 8 + th + 6, LABEL_PX, x_label, INK);
        }
        if !y_label.is_empty() {
            let lw = text_width(LABEL_PX, y_label) as i32 + 2;
            draw_text_vertical(img, 10, (t + b) / 2 - lw / 2, LABEL_PX, y_label, INK);
        }
        chart
    }

    fn draw_grid(&mut self, xt: &Ticks, yt: &Ticks) {
        let (l, t, r, b) = (self.left, self.top, self.right, self.bottom);
        let (x, y) = (self.x, self.y);
        for (vals, color) in [(&xt.minor, MINOR_GRID), (&xt.major, GRID)] {
            for &v in vals {
                if let Some(n) = x.norm(v) {
                    let c = (l as f64 + n * (r - l) as f64).round() as i32;
                    if c > l && c < r {
                        fill_rect(&mut self.img, c, t + 1, c + 1, b, color, 1.0);
                    }
                }
            }
        }
        for (vals, color) in [(&yt.minor, MINOR_GRID), (&yt.major, GRID)] {
            for &v in vals {
                if let Some(n) = y.norm(v) {
                    let c = (b as f64 - n * (b - t) as f64).round() as i32;
                    if c > t && c < b {
                        fill_rect(&mut self.img, l + 1, c, r, c + 1, color, 1.0);
                    }
                }
            }
        }
    }

    /// Continuous pixel x of a data value (the frame's left column's centre is `lo`).
    fn fx(&self, v: f64) -> Option<f64> {
        self.x.norm(v).map(|n| self.left as f64 + 0.5 + n * (self.right - self.left) as f64)
    }

    /// Continuous pixel y of a data value.
    fn fy(&self, v: f64) -> Option<f64> {
        self.y.norm(v).map(|n| self.bottom as f64 + 0.5 - n * (self.bottom - self.top) as f64)
    }

    /// Where data strokes may be drawn: the plot area, overlapping the frame by 2 pixels so that
    /// curves lying on the range's edge (ROC curves along the top) stay visible.
    fn clip(&self) -> (i32, i32, i32, i32) {
        (self.left - 2, self.top - 2, self.right + 3, self.bottom + 3)
    }
}

// ---------------------------------------------------------------------------------------------
// Line plots
// ---------------------------------------------------------------------------------------------

/// One line of a [`line_plot`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Name shown in the legend (e.g. `"MEL (AUC 0.871)"`); empty names are left out of it.
    pub name: String,
    /// (x, y) points, joined in order. Non-finite points (and non-positive y on a log axis) break
    /// the line.
    pub points: Vec<(f64, f64)>,
    /// Line colour; `None` takes the next colour of [`PALETTE`].
    pub color: Option<[u8; 3]>,
}

impl Series {
    /// A series with the palette's colour.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points, color: None }
    }
}

/// Where a legend goes inside the plot area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LegendPos {
    /// The corner that hides the least of the data.
    #[default]
    Auto,
    /// Top right.
    TopRight,
    /// Top left.
    TopLeft,
    /// Bottom right.
    BottomRight,
    /// Bottom left.
    BottomLeft,
    /// No legend.
    None,
}

/// Options of [`line_plot`].
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Logarithmic y axis (points with y <= 0 are left out).
    pub log_y: bool,
    /// Fixed x range; `None` fits the data.
    pub x_range: Option<(f64, f64)>,
    /// Fixed y range; `None` fits the data with a 5 % margin.
    pub y_range: Option<(f64, f64)>,
    /// Draws the dashed diagonal y = x (the chance line of a ROC curve).
    pub diagonal: bool,
    /// Line width in pixels.
    pub line_width: f32,
    /// Marks each point with a dot when a series has at most this many points (0: never).
    pub markers_up_to: usize,
    /// Legend placement.
    pub legend: LegendPos,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions {
            width: 800,
            height: 500,
            log_y: false,
            x_range: None,
            y_range: None,
            diagonal: false,
            line_width: 2.0,
            markers_up_to: 40,
            legend: LegendPos::Auto,
        }
    }
}

impl PlotOptions {
    /// Square-ish options for ROC curves: both axes fixed to [0, 1] (with a hair of margin so
    /// curves along the edges stay visible) and the chance diagonal.
    pub fn roc() -> Self {
        PlotOptions {
            width: 640,
            height: 600,
            x_range: Some((-0.01, 1.01)),
            y_range: Some((-0.01, 1.01)),
            diagonal: true,
            markers_up_to: 0,
            ..PlotOptions::default()
        }
    }
}

/// Draws `series` as lines on one pair of axes, with grid, tick labels, title, axis labels and a
/// legend. Returns an image of `opts.width` x `opts.height` pixels.
pub fn line_plot(title: &str, x_label: &str, y_label: &str, series: &[Series], opts: &PlotOptions) -> RgbImage {
    let log = opts.log_y;
    let valid = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!log || y > 0.0);
    let pts = || series.iter().flat_map(|s| s.points.iter().copied()).filter(valid);
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in pts() {
        xlo = xlo.min(x);
        xhi = xhi.max(x);
        ylo = ylo.min(y);
        yhi = yhi.max(y);
    }
    let (xlo, xhi) = match opts.x_range {
        Some((a, b)) => sane_range(a, b, false),
        None => sane_range(xlo, xhi, false),
    };
    let (ylo, yhi) = match opts.y_range {
        Some((a, b)) => sane_range(a, b, log),
        None => {
            let (a, b) = sane_range(ylo, yhi, log);
            pad_range(a, b, log, 0.05)
        }
    };
    let xs = AxisSpec { lo: xlo, hi: xhi, log: false, integer: false };
    let ys = AxisSpec { lo: ylo, hi: yhi, log, integer: false };
    let mut chart = Chart::new(opts.width, opts.height, title, x_label, y_label, xs, ys);
    let (w, h) = chart.img.dimensions();
    let clip = chart.clip();

    if opts.diagonal {
        let lo = xlo.max(if log { ylo } else { ylo.min(xlo) });
        let hi = xhi.min(yhi);
        if let (Some(x0), Some(y0), Some(x1), Some(y1)) = (chart.fx(lo), chart.fy(lo), chart.fx(hi), chart.fy(hi)) {
            let mut layer = Layer::new(w, h);
            layer.dashed((x0, y0), (x1, y1), 1.5, 7.0, 5.0);
            layer.composite(&mut chart.img, [150, 150, 150], clip);
        }
    }

    let mut legend = Vec::new();
    let mut samples = Vec::new();
    for (i, s) in series.iter().enumerate() {
        let color = s.color.unwrap_or(PALETTE[i % PALETTE.len()]);
        let mut layer = Layer::new(w, h);
        let mut prev: Option<(f64, f64)> = None;
        let n_valid = s.points.iter().filter(|p| valid(p)).count();
        let markers = n_valid == 1 || n_valid <= opts.markers_up_to;
        for &p in &s.points {
            let q = if valid(&p) { chart.fx(p.0).zip(chart.fy(p.1)) } else { None };
            match (prev, q) {
                (Some(a), Some(b)) => {
                    layer.segment(a, b, opts.line_width as f64);
                    let steps = (((b.0 - a.0).hypot(b.1 - a.1)) / 6.0).ceil().clamp(1.0, 1000.0) as usize;
                    samples.extend((0..=steps).map(|k| {
                        let t = k as f64 / steps as f64;
                        (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1))
                    }));
                }
                (None, Some(b)) => samples.push(b),
                _ => {}
            }
            if let (true, Some(b)) = (markers, q) {
                layer.disc(b.0, b.1, (opts.line_width as f64 * 1.6).max(2.5));
            }
            prev = q;
        }
        layer.composite(&mut chart.img, color, clip);
        if !s.name.is_empty() {
            legend.push((s.name.clone(), color));
        }
    }
    draw_legend(&mut chart, &legend, &samples, opts.legend);
    chart.img
}

/// Draws a legend box inside the plot area, in the corner given or the one covering the fewest
/// of `samples` (pixel positions along the data).
fn draw_legend(chart: &mut Chart, entries: &[(String, [u8; 3])], samples: &[(f64, f64)], pos: LegendPos) {
    if entries.is_empty() || pos == LegendPos::None {
        return;
    }
    let lh = text_height(LEGEND_PX) as i32 + 4;
    let max_w = (chart.right - chart.left - 60).max(40) as u32;
    let names: Vec<String> = entries.iter().map(|(n, _)| fit_text(LEGEND_PX, n, max_w)).collect();
    let tw = names.iter().map(|n| text_width(LEGEND_PX, n) as i32).max().unwrap_or(0);
    let bw = 10 + 26 + 8 + tw + 12;
    let bh = 8 + entries.len() as i32 * lh + 6;
    let m = 10;
    let corner = |p: LegendPos| match p {
        LegendPos::TopLeft => (chart.left + m, chart.top + m),
        LegendPos::BottomRight => (chart.right - m - bw, chart.bottom - m - bh),
        LegendPos::BottomLeft => (chart.left + m, chart.bottom - m - bh),
        _ => (chart.right - m - bw, chart.top + m),
    };
    let (bx, by) = if pos == LegendPos::Auto {
        let order = [LegendPos::TopRight, LegendPos::BottomRight, LegendPos::TopLeft, LegendPos::BottomLeft];
        let covered = |p: LegendPos| {
            let (x, y) = corner(p);
            samples
                .iter()
                .filter(|s| {
                    s.0 >= (x - 4) as f64
                        && s.0 <= (x + bw + 4) as f64
                        && s.1 >= (y - 4) as f64
                        && s.1 <= (y + bh + 4) as f64
                })
                .count()
        };
        let best = order.iter().copied().min_by_key(|&p| covered(p)).unwrap_or(LegendPos::TopRight);
        corner(best)
    } else {
        corner(pos)
    };
    let img = &mut chart.img;
    fill_rect(img, bx, by, bx + bw, by + bh, WHITE, 0.9);
    stroke_rect(img, bx, by, bx + bw - 1, by + bh - 1, [200, 200, 200]);
    let (w, h) = img.dimensions();
    for (k, ((_, color), name)) in entries.iter().zip(&names).enumerate() {
        let y = by + 8 + k as i32 * lh;
        let cy = y as f64 + lh as f64 / 2.0 - 1.5;
        let mut layer = Layer::new(w, h);
        layer.segment(((bx + 10) as f64, cy), ((bx + 36) as f64, cy), 3.0);
        layer.composite(img, *color, (0, 0, w as i32, h as i32));
        draw_text(img, bx + 44, y, LEGEND_PX, name, INK);
    }
}

// ---------------------------------------------------------------------------------------------
// Histograms
// ---------------------------------------------------------------------------------------------

/// Counts `values` into `bins` equal bins over [lo, hi]; the last bin includes `hi`. Values
/// outside the range and non-finite values are not counted.
pub fn bin_counts(values: &[f64], bins: usize, lo: f64, hi: f64) -> Vec<usize> {
    let mut counts = vec![0usize; bins];
    if bins == 0 || hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) || !lo.is_finite() || !hi.is_finite() {
        return counts;
    }
    let width = (hi - lo) / bins as f64;
    for &v in values {
        if !v.is_finite() || v < lo || v > hi {
            continue;
        }
        let i = (((v - lo) / width).floor() as usize).min(bins - 1);
        counts[i] += 1;
    }
    counts
}

/// A histogram of `values` in `bins` bins over their range, with an optional marker line at
/// `marker.0` labelled `marker.1` (e.g. a novelty threshold). Image size 800 x 500.
pub fn histogram(title: &str, x_label: &str, values: &[f64], bins: usize, marker: Option<(f64, &str)>) -> RgbImage {
    let bins = bins.max(1);
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let mut lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let mut hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if let Some((m, _)) = marker.filter(|m| m.0.is_finite()) {
        lo = lo.min(m);
        hi = hi.max(m);
    }
    let (lo, hi) = sane_range(lo, hi, false);
    let counts = if finite.is_empty() { vec![0; bins] } else { bin_counts(&finite, bins, lo, hi) };
    let max_count = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let (xlo, xhi) = pad_range(lo, hi, false, 0.02);
    let xs = AxisSpec { lo: xlo, hi: xhi, log: false, integer: false };
    let ys = AxisSpec { lo: 0.0, hi: max_count * 1.08, log: false, integer: true };
    let mut chart = Chart::new(800, 500, title, x_label, "count", xs, ys);

    let width = (hi - lo) / bins as f64;
    let base = chart.bottom;
    for (i, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let e0 = lo + i as f64 * width;
        let (Some(xa), Some(xb), Some(yt)) = (chart.fx(e0), chart.fx(e0 + width), chart.fy(c as f64)) else {
            continue;
        };
        let (xa, xb) = (xa.round() as i32, xb.round() as i32);
        let gap = if xb - xa >= 5 { 1 } else { 0 };
        let yt = (yt.round() as i32).min(base - 1);
        fill_rect(&mut chart.img, xa, yt, (xb - gap).max(xa + 1), base, [76, 120, 168], 1.0);
    }

    let (w, h) = chart.img.dimensions();
    if finite.is_empty() {
        let cy = (chart.top + chart.bottom) / 2 - 10;
        draw_text_centered(&mut chart.img, (chart.left + chart.right) / 2, cy, LABEL_PX, "no data", MUTED);
    } else {
        // The count goes in the top margin at the right, or inside the plot at the top left when
        // the title leaves no room there.
        let n = format!("n = {}", finite.len());
        let nw = text_width(TICK_PX, &n) as i32;
        let th = text_height(TICK_PX) as i32;
        let title_right = w as i32 / 2 + text_width(TITLE_PX, title).min(w.saturating_sub(20)) as i32 / 2;
        if title.is_empty() || title_right + 16 < chart.right - nw {
            draw_text_right(&mut chart.img, chart.right, chart.top - th - 2, TICK_PX, &n, MUTED);
        } else {
            fill_rect(
                &mut chart.img,
                chart.left + 5,
                chart.top + 4,
                chart.left + 11 + nw,
                chart.top + 7 + th,
                WHITE,
                0.85,
            );
            draw_text(&mut chart.img, chart.left + 8, chart.top + 6, TICK_PX, &n, MUTED);
        }
    }
    if let Some((m, label)) = marker {
        if let Some(mx) = chart.fx(m) {
            let red = [214, 39, 40];
            let mut layer = Layer::new(w, h);
            layer.dashed((mx, (chart.top + 1) as f64), (mx, chart.bottom as f64), 2.0, 8.0, 5.0);
            let clip = chart.clip();
            layer.composite(&mut chart.img, red, clip);
            if !label.is_empty() {
                let tw = text_width(TICK_PX, label) as i32;
                let th = text_height(TICK_PX) as i32;
                let y = chart.top + 8;
                let x = if mx as i32 + 8 + tw + 4 < chart.right { mx as i32 + 8 } else { mx as i32 - 8 - tw };
                fill_rect(&mut chart.img, x - 3, y - 2, x + tw + 3, y + th + 1, WHITE, 0.85);
                draw_text(&mut chart.img, x, y, TICK_PX, label, red);
            }
        }
    }
    chart.img
}

// ---------------------------------------------------------------------------------------------
// Confusion matrices
// ---------------------------------------------------------------------------------------------

/// Matplotlib's "Blues" for v in [0, 1].
fn blues(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 9] = [
        [247.0, 251.0, 255.0],
        [222.0, 235.0, 247.0],
        [198.0, 219.0, 239.0],
        [158.0, 202.0, 225.0],
        [107.0, 174.0, 214.0],
        [66.0, 146.0, 198.0],
        [33.0, 113.0, 181.0],
        [8.0, 81.0, 156.0],
        [8.0, 48.0, 107.0],
    ];
    let v = if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
    let f = v * (STOPS.len() - 1) as f32;
    let i = (f.floor() as usize).min(STOPS.len() - 2);
    let t = f - i as f32;
    let mut out = [0u8; 3];
    for (k, o) in out.iter_mut().enumerate() {
        *o = (STOPS[i][k] * (1.0 - t) + STOPS[i + 1][k] * t).round() as u8;
    }
    out
}

/// A confusion matrix: rows are true classes, columns predicted ones; each cell is coloured by
/// its share of the row and shows the count and that share in per cent. A missing count (short
/// row) is taken as 0.
pub fn confusion_matrix_image(title: &str, class_names: &[String], counts: &[Vec<u64>]) -> RgbImage {
    let n = class_names.len().max(counts.len()).max(1);
    if counts.len() != class_names.len() || counts.iter().any(|r| r.len() != counts.len()) {
        tracing::warn!(
            classes = class_names.len(),
            rows = counts.len(),
            "confusion matrix shape does not fit its classes"
        );
    }
    let name = |i: usize| class_names.get(i).cloned().unwrap_or_else(|| format!("{i}"));
    let count = |i: usize, j: usize| counts.get(i).and_then(|r| r.get(j)).copied().unwrap_or(0);
    let cell: i32 = if n <= 8 { 88 } else { (800 / n as i32).max(40) };
    let count_px = if cell >= 70 { 19.0 } else { 14.0 };
    let pct_px = if cell >= 70 { 14.0 } else { 11.0 };
    let name_px = 15.0;
    let nh = text_height(name_px) as i32;
    let lh = text_height(LABEL_PX) as i32;

    let row_w = (0..n).map(|i| text_width(name_px, &name(i)) as i32).max().unwrap_or(0);
    let col_w = row_w;
    let vertical_cols = col_w > cell - 8;
    let col_h = if vertical_cols { col_w + 2 } else { nh };

    let title_h = if title.is_empty() { 0 } else { text_height(TITLE_PX) as i32 + 16 };
    let left = 12 + lh + 10 + row_w + 10;
    let top = 12 + title_h;
    let grid = cell * n as i32;
    let bar_w = 16;
    let bar_x = left + grid + 18;
    let bar_label_w = text_width(TICK_PX, "100%") as i32;
    let w = (bar_x + bar_w + 6 + bar_label_w + 16).max(left + grid + 20);
    let h = top + grid + 8 + col_h + 8 + lh + 14;
    let mut img = RgbImage::from_pixel(w as u32, h as u32, Rgb(WHITE));

    if !title.is_empty() {
        let t = fit_text(TITLE_PX, title, (w - 20).max(10) as u32);
        draw_text_centered(&mut img, w / 2, 12, TITLE_PX, &t, INK);
    }
    for i in 0..n {
        let total: u64 = (0..n).map(|j| count(i, j)).sum();
        for j in 0..n {
            let c = count(i, j);
            let x0 = left + j as i32 * cell;
            let y0 = top + i as i32 * cell;
            let (bg, fg, pct) = if total == 0 {
                ([250, 250, 250], MUTED, "–".to_string())
            } else {
                let v = c as f64 / total as f64;
                let fg = if v > 0.5 { WHITE } else { INK };
                (blues(v as f32), fg, format!("{:.1}%", 100.0 * v))
            };
            fill_rect(&mut img, x0, y0, x0 + cell, y0 + cell, bg, 1.0);
            let cs = c.to_string();
            let cph = text_height(count_px) as i32;
            let pph = text_height(pct_px) as i32;
            let cy = y0 + (cell - cph - pph) / 2;
            draw_text_centered(&mut img, x0 + cell / 2, cy, count_px, &cs, fg);
            draw_text_centered(&mut img, x0 + cell / 2, cy + cph, pct_px, &pct, fg);
        }
    }
    // White separators between cells, then a frame.
    for k in 1..n as i32 {
        fill_rect(&mut img, left + k * cell, top, left + k * cell + 1, top + grid, WHITE, 1.0);
        fill_rect(&mut img, left, top + k * cell, left + grid, top + k * cell + 1, WHITE, 1.0);
    }
    stroke_rect(&mut img, left - 1, top - 1, left + grid, top + grid, FRAME);

    for i in 0..n {
        let cy = top + i as i32 * cell + cell / 2 - nh / 2;
        draw_text_right(&mut img, left - 8, cy, name_px, &name(i), INK);
        let cx = left + i as i32 * cell + cell / 2;
        if vertical_cols {
            let tw = text_width(name_px, &name(i)) as i32 + 2;
            draw_text_vertical(&mut img, cx - nh / 2, top + grid + 8 + (col_h - tw), name_px, &name(i), INK);
        } else {
            draw_text_centered(&mut img, cx, top + grid + 8, name_px, &name(i), INK);
        }
    }
    let tw = text_width(LABEL_PX, "true") as i32 + 2;
    draw_text_vertical(&mut img, 12, top + grid / 2 - tw / 2, LABEL_PX, "true", INK);
    draw_text_centered(&mut img, left + grid / 2, top + grid + 8 + col_h + 8, LABEL_PX, "predicted", INK);

    // Colour bar of the row share.
    for y in 0..grid {
        let v = 1.0 - y as f32 / (grid - 1).max(1) as f32;
        fill_rect(&mut img, bar_x, top + y, bar_x + bar_w, top + y + 1, blues(v), 1.0);
    }
    stroke_rect(&mut img, bar_x - 1, top - 1, bar_x + bar_w, top + grid, FRAME);
    let th = text_height(TICK_PX) as i32;
    draw_text(&mut img, bar_x + bar_w + 6, top - 2, TICK_PX, "100%", INK);
    draw_text(&mut img, bar_x + bar_w + 6, top + grid / 2 - th / 2, TICK_PX, "50%", INK);
    draw_text(&mut img, bar_x + bar_w + 6, top + grid - th + 2, TICK_PX, "0%", INK);
    img
}

// ---------------------------------------------------------------------------------------------
// Colour maps and overlays
// ---------------------------------------------------------------------------------------------

/// Matplotlib's perceptually uniform "inferno" (black, purple, orange, pale yellow) for v in
/// [0, 1], as a degree-6 polynomial fit; luminance rises monotonically. Values outside [0, 1]
/// are clamped, NaN is 0.
pub fn colormap(v: f32) -> [u8; 3] {
    const C: [[f64; 3]; 7] = [
        [0.000_218_940_369_119_226_5, 0.001_651_004_631_001_012, -0.019_480_898_437_091_84],
        [0.106_513_419_485_611_6, 0.563_956_436_788_409_1, 3.932_712_388_889_277],
        [11.602_493_082_471_87, -3.972_853_965_665_698, -15.942_394_106_291_4],
        [-41.703_996_131_394_59, 17.436_398_882_053_13, 44.354_145_198_728_13],
        [77.162_935_699_427, -33.402_358_942_100_92, -81.807_309_257_389_93],
        [-71.319_428_244_992_14, 32.626_064_263_977_23, 73.209_519_858_032_02],
        [25.131_126_224_773_41, -12.242_668_952_385_67, -23.070_325_002_871_72],
    ];
    let t = if v.is_finite() { v.clamp(0.0, 1.0) as f64 } else { 0.0 };
    let mut out = [0u8; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let mut acc = 0.0;
        for c in C.iter().rev() {
            acc = acc * t + c[k];
        }
        *o = (acc.clamp(0.0, 1.0) * 255.0).round() as u8;
    }
    out
}

/// Blends `colormap(heat)` over `img` with opacity `alpha` (0: image only, 1: heat map only).
/// `heat` is row-major, one value in [0, 1] per pixel; when its length does not match the image
/// the image is returned unchanged (and a warning logged).
pub fn heatmap_overlay(img: &RgbImage, heat: &[f32], alpha: f32) -> RgbImage {
    let (w, h) = img.dimensions();
    if heat.len() != w as usize * h as usize {
        tracing::warn!(len = heat.len(), w, h, "heat map does not match the image; drawn without it");
        return img.clone();
    }
    let a = if alpha.is_finite() { alpha.clamp(0.0, 1.0) } else { 0.5 };
    let mut out = img.clone();
    for (p, &v) in out.pixels_mut().zip(heat) {
        let c = colormap(v);
        for (ch, &t) in p.0.iter_mut().zip(c.iter()) {
            *ch = (*ch as f32 * (1.0 - a) + t as f32 * a).round() as u8;
        }
    }
    out
}

/// Draws a mask on an image: its contour in `color` (the foreground pixels with a background
/// 4-neighbour, thickened outwards to about 2 pixels at 256 x 256 and proportionally more for
/// larger images), and unless `contour_only`, the foreground tinted with the colour too. A mask of
/// another size is resized to the image first. Pixels away from the contour and outside the
/// mask are left unchanged.
pub fn mask_overlay(img: &RgbImage, mask: &GrayImage, color: [u8; 3], contour_only: bool) -> RgbImage {
    let (w, h) = img.dimensions();
    let mask = if mask.dimensions() == (w, h) { mask.clone() } else { resize_mask(mask, w, h) };
    let (wi, hi) = (w as i32, h as i32);
    let fg = |x: i32, y: i32| mask.get_pixel(x as u32, y as u32).0[0] >= 128;
    let mut contour = vec![false; w as usize * h as usize];
    for y in 0..hi {
        for x in 0..wi {
            if fg(x, y) {
                let edge = [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)]
                    .iter()
                    .any(|&(a, b)| a >= 0 && b >= 0 && a < wi && b < hi && !fg(a, b));
                contour[(y * wi + x) as usize] = edge;
            }
        }
    }
    // Outward thickening by k pixels: background pixels within a (2k+1)^2 window of the contour.
    let k = ((w.min(h) as f32 / 256.0 * 2.0).round() as i32 - 1).max(0);
    let mut out = img.clone();
    for y in 0..hi {
        for x in 0..wi {
            let i = (y * wi + x) as usize;
            let draw = contour[i]
                || (k > 0
                    && !fg(x, y)
                    && (y - k..=y + k).any(|yy| {
                        yy >= 0
                            && yy < hi
                            && (x - k..=x + k).any(|xx| xx >= 0 && xx < wi && contour[(yy * wi + xx) as usize])
                    }));
            if draw {
                out.put_pixel(x as u32, y as u32, Rgb(color));
            } else if !contour_only && fg(x, y) {
                blend(&mut out, x, y, color, 0.3);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Layouts
// ---------------------------------------------------------------------------------------------

/// Gap in pixels between and around the cells of a [`grid`].
pub const GRID_GAP: u32 = 4;

/// `img` scaled to fit in `w` x `h` keeping its aspect ratio, centred on a white canvas.
fn fit_into(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (iw, ih) = img.dimensions();
    if iw == 0 || ih == 0 {
        return RgbImage::from_pixel(w, h, Rgb(WHITE));
    }
    if (iw, ih) == (w, h) {
        return img.clone();
    }
    let s = (w as f64 / iw as f64).min(h as f64 / ih as f64);
    let nw = ((iw as f64 * s).round() as u32).clamp(1, w);
    let nh = ((ih as f64 * s).round() as u32).clamp(1, h);
    let r = resize_rgb(img, nw, nh);
    let mut out = RgbImage::from_pixel(w, h, Rgb(WHITE));
    image::imageops::replace(&mut out, &r, ((w - nw) / 2) as i64, ((h - nh) / 2) as i64);
    out
}

/// Lays `images` out in rows of `cols`, each scaled to fit a `cell` x `cell` square (aspect ratio
/// kept, centred on white), with an optional caption under each. The result is
/// `cols * cell + (cols + 1) * GRID_GAP` wide and `rows * (cell + caption) + (rows + 1) * GRID_GAP`
/// high, where `rows = ceil(len / cols)` (at least 1) and `caption` is 0 without labels.
pub fn grid(images: &[RgbImage], cols: usize, cell: u32, labels: Option<&[String]>) -> RgbImage {
    let cols = cols.max(1);
    let cell = cell.max(8);
    let rows = images.len().div_ceil(cols).max(1);
    let cap_px = (cell as f32 / 12.0).clamp(12.0, 16.0);
    let cap_h = if labels.is_some() { text_height(cap_px) + 6 } else { 0 };
    let g = GRID_GAP;
    let w = cols as u32 * cell + (cols as u32 + 1) * g;
    let h = rows as u32 * (cell + cap_h) + (rows as u32 + 1) * g;
    let mut out = RgbImage::from_pixel(w, h, Rgb(WHITE));
    for (i, im) in images.iter().enumerate() {
        let (c, r) = ((i % cols) as u32, (i / cols) as u32);
        let x = g + c * (cell + g);
        let y = g + r * (cell + cap_h + g);
        image::imageops::replace(&mut out, &fit_into(im, cell, cell), x as i64, y as i64);
        if let Some(l) = labels.and_then(|ls| ls.get(i)) {
            let t = fit_text(cap_px, l, cell);
            draw_text_centered(&mut out, (x + cell / 2) as i32, (y + cell + 3) as i32, cap_px, &t, INK);
        }
    }
    out
}

/// Puts images next to each other, each scaled to the tallest one's height (aspect ratio kept),
/// with a label above each (missing labels are left blank).
pub fn side_by_side(images: &[&RgbImage], labels: &[&str]) -> RgbImage {
    let h = images.iter().map(|i| i.height()).max().unwrap_or(0).max(1);
    let scaled: Vec<RgbImage> = images
        .iter()
        .map(|im| {
            let (iw, ih) = im.dimensions();
            let nw = if ih == 0 { 1 } else { ((iw as f64 * h as f64 / ih as f64).round() as u32).max(1) };
            fit_into(im, nw, h)
        })
        .collect();
    let px = (h as f32 / 20.0).clamp(14.0, 24.0);
    let has_labels = labels.iter().any(|l| !l.is_empty());
    let lab_h = if has_labels { text_height(px) + 8 } else { 0 };
    let gap = 6u32;
    let w = scaled.iter().map(|i| i.width() + gap).sum::<u32>() + gap;
    let mut out = RgbImage::from_pixel(w.max(1), h + lab_h + 2 * gap, Rgb(WHITE));
    let mut x = gap;
    for (k, im) in scaled.iter().enumerate() {
        if let Some(l) = labels.get(k).filter(|l| !l.is_empty()) {
            let t = fit_text(px, l, im.width());
            draw_text_centered(&mut out, (x + im.width() / 2) as i32, (gap + 2) as i32, px, &t, INK);
        }
        image::imageops::replace(&mut out, im, x as i64, (gap + lab_h) as i64);
        x += im.width() + gap;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn non_white(img: &RgbImage) -> usize {
        img.pixels().filter(|p| p.0 != WHITE).count()
    }

    #[test]
    fn text_draws_pixels_and_width_grows() {
        let mut img = RgbImage::from_pixel(120, 30, Rgb(WHITE));
        draw_text(&mut img, 2, 2, 16.0, "Hello", INK);
        assert!(non_white(&img) > 20);
        assert!(text_width(16.0, "Hello, world") > text_width(16.0, "Hello"));
        assert!(text_width(24.0, "Hello") > text_width(12.0, "Hello"));
        assert_eq!(text_width(16.0, ""), 0);
        // Clipped drawing never panics.
        draw_text(&mut img, -50, -10, 40.0, "clip me", INK);
        draw_text(&mut img, 110, 25, 40.0, "clip me", INK);
        let mut v = RgbImage::from_pixel(30, 80, Rgb(WHITE));
        draw_text_vertical(&mut v, 2, 2, 16.0, "axis", INK);
        assert!(non_white(&v) > 10);
    }

    #[test]
    fn line_plot_has_size_and_series_colour() {
        let red = [200, 10, 10];
        let s = vec![
            Series {
                name: "loss".into(),
                points: (0..20).map(|i| (i as f64, 1.0 / (1.0 + i as f64))).collect(),
                color: Some(red),
            },
            Series::new("metric", vec![(0.0, 0.2), (19.0, 0.8)]),
        ];
        let img = line_plot("t", "epoch", "value", &s, &PlotOptions { width: 320, height: 200, ..Default::default() });
        assert_eq!(img.dimensions(), (320, 200));
        assert!(img.pixels().any(|p| p.0 == red));
        let log = line_plot("", "", "", &s, &PlotOptions { log_y: true, ..Default::default() });
        assert!(log.pixels().any(|p| p.0 == red));
        let roc = line_plot(
            "roc",
            "fpr",
            "tpr",
            &[Series::new("a", vec![(0.0, 0.0), (0.2, 0.9), (1.0, 1.0)])],
            &PlotOptions::roc(),
        );
        assert!(roc.pixels().any(|p| p.0 == PALETTE[0]));
        // Degenerate inputs draw an empty frame rather than failing.
        let e = line_plot("", "", "", &[Series::new("nan", vec![(f64::NAN, 1.0)])], &PlotOptions::default());
        assert_eq!(e.dimensions(), (800, 500));
    }

    #[test]
    fn ticks_are_nice() {
        let t = linear_ticks(&AxisSpec { lo: 0.0, hi: 1.0, log: false, integer: false }, 5);
        assert_eq!(t.labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        let t = log_ticks(&AxisSpec { lo: 1e-4, hi: 1.0, log: true, integer: false }, 6);
        assert_eq!(t.labels, ["1e-4", "1e-3", "0.01", "0.1", "1"]);
        let t = linear_ticks(&AxisSpec { lo: 0.0, hi: 3.2, log: false, integer: true }, 8);
        assert!(t.major.iter().all(|v| v.fract() == 0.0));
    }

    #[test]
    fn bin_counts_cover_the_range() {
        assert_eq!(bin_counts(&[0.0, 0.1, 0.5, 0.99, 1.0, 1.5, -0.1, f64::NAN], 2, 0.0, 1.0), vec![2, 3]);
        assert_eq!(bin_counts(&[1.0], 0, 0.0, 1.0), Vec::<usize>::new());
        assert_eq!(bin_counts(&[1.0], 3, 1.0, 1.0), vec![0, 0, 0]);
        let img = histogram("h", "mse", &[0.1, 0.2, 0.2, 0.3], 3, Some((0.25, "threshold")));
        assert_eq!(img.dimensions(), (800, 500));
        assert!(img.pixels().any(|p| p.0 == [76, 120, 168]));
    }

    #[test]
    fn confusion_matrix_cells_show_row_share() {
        let names: Vec<String> = ["MEL", "NV", "BCC"].iter().map(|s| s.to_string()).collect();
        let counts = vec![vec![5, 0, 0], vec![1, 3, 0], vec![0, 0, 0]];
        let img = confusion_matrix_image("cm", &names, &counts);
        assert!(img.width() >= 3 * 88 && img.height() >= 3 * 88);
        // Pixel near the top-left corner of the first cell: a full row share is the darkest blue.
        assert!(img.pixels().any(|p| p.0 == blues(1.0)));
        // Short rows are zeros, not a panic.
        let _ = confusion_matrix_image("", &names, &[vec![1]]);
    }

    #[test]
    fn colormap_is_monotone_in_luminance() {
        assert_ne!(colormap(0.0), colormap(1.0));
        let lum = |c: [u8; 3]| 0.2126 * c[0] as f64 + 0.7152 * c[1] as f64 + 0.0722 * c[2] as f64;
        let mut prev = -1.0;
        for i in 0..=64 {
            let l = lum(colormap(i as f32 / 64.0));
            assert!(l >= prev, "luminance falls at {i}");
            prev = l;
        }
        assert_eq!(colormap(f32::NAN), colormap(0.0));
    }

    #[test]
    fn heatmap_overlay_blends() {
        let img = RgbImage::from_pixel(4, 3, Rgb([100, 100, 100]));
        let heat = vec![1.0; 12];
        assert_eq!(heatmap_overlay(&img, &heat, 0.0), img);
        assert_eq!(heatmap_overlay(&img, &heat, 1.0).get_pixel(0, 0).0, colormap(1.0));
        assert_eq!(heatmap_overlay(&img, &heat[..5], 0.5), img);
    }

    #[test]
    fn mask_overlay_changes_only_near_contour() {
        let img = RgbImage::from_pixel(64, 64, Rgb([10, 20, 30]));
        let mask = GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([if (20..44).contains(&x) && (20..44).contains(&y) { 255 } else { 0 }])
        });
        let out = mask_overlay(&img, &mask, [0, 255, 0], true);
        assert_eq!(out.get_pixel(20, 30).0, [0, 255, 0]);
        assert_eq!(out.get_pixel(32, 32), img.get_pixel(32, 32));
        assert_eq!(out.get_pixel(5, 5), img.get_pixel(5, 5));
        assert_eq!(out.get_pixel(19, 30), img.get_pixel(19, 30), "1 px at 64 x 64");
        let filled = mask_overlay(&img, &mask, [0, 255, 0], false);
        assert_ne!(filled.get_pixel(32, 32), img.get_pixel(32, 32));
        assert_eq!(filled.get_pixel(5, 5), img.get_pixel(5, 5));
        // At 256 the contour is 2 px: one inside, one outside.
        let big = RgbImage::from_pixel(256, 256, Rgb([10, 20, 30]));
        let out = mask_overlay(&big, &mask, [0, 255, 0], true);
        assert_eq!(out.get_pixel(80, 120).0, [0, 255, 0]);
        assert_eq!(out.get_pixel(79, 120).0, [0, 255, 0]);
        assert_eq!(out.get_pixel(77, 120), big.get_pixel(77, 120));
    }

    #[test]
    fn grid_and_side_by_side_sizes() {
        let a = RgbImage::from_pixel(10, 20, Rgb([255, 0, 0]));
        let imgs = vec![a.clone(); 5];
        let g = grid(&imgs, 3, 32, None);
        assert_eq!(g.dimensions(), (3 * 32 + 4 * GRID_GAP, 2 * 32 + 3 * GRID_GAP));
        let labels: Vec<String> = (0..5).map(|i| format!("sample {i}")).collect();
        let gl = grid(&imgs, 3, 32, Some(&labels));
        assert_eq!(gl.width(), g.width());
        assert!(gl.height() > g.height());
        let b = RgbImage::from_pixel(40, 40, Rgb([0, 0, 255]));
        let s = side_by_side(&[&a, &b], &["a", "b"]);
        assert!(s.width() >= 20 + 40);
    }

    /// Renders sample figures into `$DERM_PLOT_SAMPLES` (a folder) to look at.
    #[test]
    fn render_samples_when_asked() {
        let Ok(dir) = std::env::var("DERM_PLOT_SAMPLES") else { return };
        let dir = std::path::PathBuf::from(dir);
        let save = |name: &str, img: &RgbImage| derm_core::image_io::save_png(&dir.join(name), img).unwrap();
        let loss: Vec<(f64, f64)> = (1..=60)
            .map(|e| (e as f64, 0.9 * (-(e as f64) / 15.0).exp() + 0.08 + 0.02 * ((e * 7) % 5) as f64 / 5.0))
            .collect();
        let val: Vec<(f64, f64)> =
            (1..=60).step_by(5).map(|e| (e as f64, 0.55 + 0.3 * (1.0 - (-(e as f64) / 12.0).exp()))).collect();
        let s = [Series::new("train loss", loss.clone()), Series::new("validation Jaccard", val)];
        save("loss.png", &line_plot("Segmentation training", "epoch", "value", &s, &PlotOptions::default()));
        save(
            "loss_log.png",
            &line_plot(
                "Training loss (log)",
                "epoch",
                "loss",
                &s[..1],
                &PlotOptions { log_y: true, ..Default::default() },
            ),
        );
        let roc: Vec<Series> = [("MEL", 2.0), ("NV", 5.0), ("BCC", 9.0)]
            .iter()
            .map(|&(n, k)| {
                let pts: Vec<(f64, f64)> = (0..=50)
                    .map(|i| {
                        let f = i as f64 / 50.0;
                        (f, 1.0 - (1.0 - f).powf(k))
                    })
                    .collect();
                let auc = 1.0 - 1.0 / (k + 1.0);
                Series::new(format!("{n} (AUC {auc:.3})"), pts)
            })
            .collect();
        save(
            "roc.png",
            &line_plot("ROC, ISIC 2017 test", "false positive rate", "true positive rate", &roc, &PlotOptions::roc()),
        );
        let mut rng = derm_core::Rng::new(3);
        let vals: Vec<f64> = (0..2000)
            .map(|_| {
                let u: f64 = (0..6).map(|_| rng.f64()).sum::<f64>() / 6.0;
                0.002 + 0.01 * u * u
            })
            .collect();
        save(
            "hist.png",
            &histogram(
                "Nearest-neighbour MSE, synthetic vs. train",
                "MSE",
                &vals,
                40,
                Some((0.0085, "threshold 0.0085")),
            ),
        );
        save(
            "hist_long.png",
            &histogram(
                "A rather long title for a histogram of nearest-neighbour distances",
                "MSE",
                &vals,
                25,
                Some((0.005, "threshold")),
            ),
        );
        let names: Vec<String> =
            ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"].iter().map(|s| s.to_string()).collect();
        let counts: Vec<Vec<u64>> = (0..7)
            .map(|i| (0..7).map(|j| if i == j { 40 + 13 * i as u64 } else { ((i * 3 + j * 5) % 7) as u64 }).collect())
            .collect();
        save("confusion.png", &confusion_matrix_image("ISIC 2018 validation, balanced accuracy 0.81", &names, &counts));
        let long: Vec<String> =
            ["melanoma", "melanocytic nevus", "basal cell carcinoma"].iter().map(|s| s.to_string()).collect();
        save(
            "confusion_long.png",
            &confusion_matrix_image("Long names", &long, &[vec![10, 2, 0], vec![3, 50, 1], vec![0, 0, 0]]),
        );
        let (w, h) = (256u32, 256u32);
        let img = RgbImage::from_fn(w, h, |x, y| {
            let d = ((x as f32 - 128.0).powi(2) + (y as f32 - 120.0).powi(2)).sqrt();
            if d < 70.0 {
                Rgb([120, 70, 50])
            } else {
                Rgb([(215 - x / 16) as u8, (170 - y / 20) as u8, 150])
            }
        });
        let heat: Vec<f32> = (0..w * h)
            .map(|i| {
                let (x, y) = ((i % w) as f32, (i / w) as f32);
                (-(((x - 140.0).powi(2) + (y - 110.0).powi(2)) / 2500.0)).exp()
            })
            .collect();
        let mask = GrayImage::from_fn(w, h, |x, y| {
            image::Luma([if ((x as f32 - 128.0).powi(2) + (y as f32 - 120.0).powi(2)).sqrt() < 70.0 { 255 } else { 0 }])
        });
        let over = heatmap_overlay(&img, &heat, 0.5);
        let contour = mask_overlay(&img, &mask, [0, 230, 0], true);
        save("heatmap.png", &side_by_side(&[&img, &over, &contour], &["image", "saliency", "mask"]));
        let labels: Vec<String> = (0..6).map(|i| format!("ISIC_00{i:05} MEL")).collect();
        save("grid.png", &grid(&[img.clone(), over, contour, img.clone(), img.clone(), img], 3, 160, Some(&labels)));
    }
}
