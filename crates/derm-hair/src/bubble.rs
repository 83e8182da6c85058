//! Air bubbles in the immersion fluid: rings with a bright rim, round or oval, a few pixels to a
//! few tens of pixels across at 256 px, on skin and lesion alike.
//!
//! A bubble's rim reflects the light source: a thin line lighter than both its inside and its
//! outside, so the white top-hat (the luminance minus its opening by a square of about 5 px at
//! 256 px) lights it up. Pieces of the top-hat at `cfg.bubble_threshold` (L* units) that could be
//! part of a rim each propose the ellipse that fits their pixels best (the direct least-squares
//! fit of Fitzgibbon, Pilu and Fisher 1999, in the stable form of Halíř and Flusser 1998); a rim
//! broken into arcs too short to fit alone is proposed by pairs of nearby pieces. A proposal is
//! a bubble when
//! - its semi-axes lie within `cfg.bubble_min_radius` and `cfg.bubble_max_radius`, the short one
//!   at least `cfg.bubble_min_aspect` of the long one, and the piece lies on it (mean distance
//!   under about a pixel): a ring, not a blob or a straight line;
//! - it is a bright ridge along at least `cfg.bubble_coverage` of its circumference
//!   ([`rim_support`]: the luminance averaged along the ellipse's tangent, so a lone speck counts
//!   for little), so a curved light hair, which covers only its own arc, is not;
//! - the same ellipse shrunk and grown by a few pixels is a ridge along at most
//!   `cfg.bubble_clear` of its length, and its inside is mostly clear of the top-hat: a bubble
//!   lies on smooth skin or lesion, while the light gaps of a pigment network or a crust's
//!   texture make rings at every size.
//!
//! The rim (top-hat pixels within a band around the ellipse) and the highlights inside it are
//! marked; the mask's dilation and the inpainting margin then cover the rim's soft edge. Bubbles
//! on a dense texture are missed by design (see `crates/derm-hair/BENCH.md`, "Air bubbles").

use crate::config::HairConfig;
use crate::morph::{components, line_filter, LineDir, MorphOp};

/// An ellipse: centre, semi-axes (`a` the longer) and the angle (radians) of the long axis from
/// the x axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ellipse {
    /// Centre, column.
    pub cx: f64,
    /// Centre, row.
    pub cy: f64,
    /// Semi-major axis.
    pub a: f64,
    /// Semi-minor axis.
    pub b: f64,
    /// Angle of the major axis (radians).
    pub theta: f64,
}

impl Ellipse {
    /// The point at parameter `t` (radians) of the ellipse scaled by `k` about its centre.
    pub fn point(&self, t: f64, k: f64) -> (f64, f64) {
        let (c, s) = (self.theta.cos(), self.theta.sin());
        let (u, v) = (k * self.a * t.cos(), k * self.b * t.sin());
        (self.cx + u * c - v * s, self.cy + u * s + v * c)
    }

    /// `(x, y)` in the ellipse's own frame: from its centre, along its long and short axes.
    fn local(&self, x: f64, y: f64) -> (f64, f64) {
        let (c, s) = (self.theta.cos(), self.theta.sin());
        let (dx, dy) = (x - self.cx, y - self.cy);
        (dx * c + dy * s, -dx * s + dy * c)
    }

    /// The first-order (Sampson) distance of `(x, y)` from the ellipse: the value of its implicit
    /// function over the length of its gradient; exact on the curve, a good approximation near
    /// it, and infinite at the centre.
    pub fn distance(&self, x: f64, y: f64) -> f64 {
        let (u, v) = self.local(x, y);
        let (a2, b2) = (self.a * self.a, self.b * self.b);
        let f = u * u / a2 + v * v / b2 - 1.0;
        let g = 2.0 * ((u / a2).powi(2) + (v / b2).powi(2)).sqrt();
        if g > 0.0 {
            (f / g).abs()
        } else {
            f64::INFINITY
        }
    }

    /// The mean [`Ellipse::distance`] of `pts`, each counted at most 10 px.
    pub fn mean_distance(&self, pts: &[(f64, f64)]) -> f64 {
        pts.iter().map(|&(x, y)| self.distance(x, y).min(10.0)).sum::<f64>() / pts.len() as f64
    }

    /// Whether `(x, y)` lies inside the ellipse.
    pub fn contains(&self, x: f64, y: f64) -> bool {
        let (u, v) = self.local(x, y);
        u * u / (self.a * self.a) + v * v / (self.b * self.b) < 1.0
    }

    /// The pixels of a `w` x `h` image inside the ellipse scaled by `k` about its centre (at
    /// least 0.3), and how many of them `hit` is true for.
    pub fn inside(&self, k: f64, w: usize, h: usize, hit: impl Fn(usize) -> bool) -> (usize, usize) {
        let k = k.max(0.3);
        let scaled = Ellipse { a: k * self.a, b: k * self.b, ..*self };
        let reach = scaled.a;
        let (x0, x1) = ((self.cx - reach).floor().max(0.0) as usize, (self.cx + reach).ceil().max(0.0) as usize);
        let (y0, y1) = ((self.cy - reach).floor().max(0.0) as usize, (self.cy + reach).ceil().max(0.0) as usize);
        let (mut n, mut hits) = (0, 0);
        for y in y0..=y1.min(h.saturating_sub(1)) {
            for x in x0..=x1.min(w.saturating_sub(1)) {
                if scaled.contains(x as f64, y as f64) {
                    n += 1;
                    hits += hit(y * w + x) as usize;
                }
            }
        }
        (n, hits)
    }

    /// Ramanujan's approximation of the circumference.
    pub fn circumference(&self) -> f64 {
        let (a, b) = (self.a, self.b);
        std::f64::consts::PI * (3.0 * (a + b) - ((3.0 * a + b) * (a + 3.0 * b)).sqrt())
    }
}

/// The ellipse that fits `points` best in the algebraic least-squares sense, under the
/// constraint that the conic be an ellipse (Fitzgibbon, Pilu and Fisher 1999; Halíř and Flusser
/// 1998's split into a 3 x 3 eigenproblem). `None` for fewer than six points or a degenerate
/// fit (collinear points, say).
pub fn fit_ellipse(points: &[(f64, f64)]) -> Option<Ellipse> {
    let n = points.len();
    if n < 6 {
        return None;
    }
    // Centre and scale the points: the scatter matrices then stay well conditioned.
    let (mx, my) = points.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
    let (mx, my) = (mx / n as f64, my / n as f64);
    let sc = (points.iter().map(|&(x, y)| (x - mx).powi(2) + (y - my).powi(2)).sum::<f64>() / n as f64).sqrt();
    if sc <= 1e-9 {
        return None;
    }
    // Scatter matrices of the quadratic part [x², xy, y²] and the linear part [x, y, 1].
    let (mut s1, mut s2, mut s3) = ([[0f64; 3]; 3], [[0f64; 3]; 3], [[0f64; 3]; 3]);
    for &(x, y) in points {
        let (x, y) = ((x - mx) / sc, (y - my) / sc);
        let q = [x * x, x * y, y * y];
        let l = [x, y, 1.0];
        for i in 0..3 {
            for j in 0..3 {
                s1[i][j] += q[i] * q[j];
                s2[i][j] += q[i] * l[j];
                s3[i][j] += l[i] * l[j];
            }
        }
    }
    // T = -S3⁻¹ S2ᵀ gives the linear coefficients from the quadratic ones.
    let s3i = inverse3(&s3)?;
    let mut t = [[0f64; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            t[i][j] = -(0..3).map(|k| s3i[i][k] * s2[j][k]).sum::<f64>();
        }
    }
    // The reduced scatter matrix M = S1 + S2 T, premultiplied by the inverse of the constraint
    // matrix [[0, 0, 2], [0, -1, 0], [2, 0, 0]].
    let mut m = [[0f64; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = s1[i][j] + (0..3).map(|k| s2[i][k] * t[k][j]).sum::<f64>();
        }
    }
    let m = [
        [m[2][0] / 2.0, m[2][1] / 2.0, m[2][2] / 2.0],
        [-m[1][0], -m[1][1], -m[1][2]],
        [m[0][0] / 2.0, m[0][1] / 2.0, m[0][2] / 2.0],
    ];
    // The eigenvector whose conic is an ellipse (4ac - b² > 0): there is exactly one.
    let quad = real_eigenvalues3(&m)
        .into_iter()
        .filter_map(|lambda| null_vector3(&m, lambda))
        .filter(|v| 4.0 * v[0] * v[2] - v[1] * v[1] > 0.0)
        .max_by(|u, v| {
            let cu = (4.0 * u[0] * u[2] - u[1] * u[1]) / (u[0] * u[0] + u[1] * u[1] + u[2] * u[2]);
            let cv = (4.0 * v[0] * v[2] - v[1] * v[1]) / (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
            cu.total_cmp(&cv)
        })?;
    let lin: [f64; 3] = std::array::from_fn(|i| (0..3).map(|k| t[i][k] * quad[k]).sum());
    let e = conic_to_ellipse([quad[0], quad[1], quad[2], lin[0], lin[1], lin[2]])?;
    Some(Ellipse { cx: mx + sc * e.cx, cy: my + sc * e.cy, a: sc * e.a, b: sc * e.b, theta: e.theta })
}

/// The centre, semi-axes and angle of the conic `A x² + B xy + C y² + D x + E y + F = 0`, when
/// it is a real ellipse.
fn conic_to_ellipse([a, b, c, d, e, f]: [f64; 6]) -> Option<Ellipse> {
    let det = 4.0 * a * c - b * b;
    if det <= 0.0 {
        return None;
    }
    let cx = (b * e - 2.0 * c * d) / det;
    let cy = (b * d - 2.0 * a * e) / det;
    let f0 = a * cx * cx + b * cx * cy + c * cy * cy + d * cx + e * cy + f;
    let mean = (a + c) / 2.0;
    let half = (((a - c) / 2.0).powi(2) + (b / 2.0).powi(2)).sqrt();
    let (big, small) = (mean + half, mean - half);
    // u'Qu = -f0 with Q's eigenvalues `big` and `small` (same sign, since det > 0).
    let (r_small_axis, r_large_axis) = (-f0 / big, -f0 / small);
    if r_small_axis <= 0.0 || r_large_axis <= 0.0 || !r_large_axis.is_finite() {
        return None;
    }
    // The eigenvector of the larger eigenvalue is at 0.5 atan2(B, A - C) (the short axis, when
    // the eigenvalues are positive); the long axis is perpendicular to it.
    let phi = 0.5 * b.atan2(a - c);
    let (mut semi_a, mut semi_b, mut theta) =
        (r_large_axis.sqrt(), r_small_axis.sqrt(), phi + std::f64::consts::FRAC_PI_2);
    if semi_b > semi_a {
        std::mem::swap(&mut semi_a, &mut semi_b);
        theta = phi;
    }
    Some(Ellipse { cx, cy, a: semi_a, b: semi_b, theta })
}

fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

fn inverse3(m: &[[f64; 3]; 3]) -> Option<[[f64; 3]; 3]> {
    let d = det3(m);
    let norm = m.iter().flatten().map(|v| v.abs()).fold(0.0, f64::max);
    if d.abs() <= 1e-12 * norm.powi(3) || d == 0.0 {
        return None;
    }
    // Entry (i, j) is cofactor (j, i) over the determinant.
    Some(std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let (r0, r1) = ((j + 1) % 3, (j + 2) % 3);
            let (c0, c1) = ((i + 1) % 3, (i + 2) % 3);
            (m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0]) / d
        })
    }))
}

/// The real roots of the characteristic polynomial of `m`.
fn real_eigenvalues3(m: &[[f64; 3]; 3]) -> Vec<f64> {
    let tr = m[0][0] + m[1][1] + m[2][2];
    let minors = m[0][0] * m[1][1] - m[0][1] * m[1][0] + m[0][0] * m[2][2] - m[0][2] * m[2][0] + m[1][1] * m[2][2]
        - m[1][2] * m[2][1];
    // λ³ - tr λ² + minors λ - det = 0, depressed by λ = x + tr / 3.
    let (b, c, d) = (-tr, minors, -det3(m));
    let p = c - b * b / 3.0;
    let q = 2.0 * b * b * b / 27.0 - b * c / 3.0 + d;
    let shift = -b / 3.0;
    let disc = (q / 2.0).powi(2) + (p / 3.0).powi(3);
    if disc > 0.0 {
        let s = disc.sqrt();
        vec![(-q / 2.0 + s).cbrt() + (-q / 2.0 - s).cbrt() + shift]
    } else if p == 0.0 {
        vec![shift]
    } else {
        let r = (-p / 3.0).sqrt();
        let arg = (-q / (2.0 * r * r * r)).clamp(-1.0, 1.0);
        let phi = arg.acos() / 3.0;
        (0..3).map(|k| 2.0 * r * (phi - 2.0 * std::f64::consts::PI * k as f64 / 3.0).cos() + shift).collect()
    }
}

/// A vector in the null space of `m - λ I`: the longest cross product of two of its rows.
fn null_vector3(m: &[[f64; 3]; 3], lambda: f64) -> Option<[f64; 3]> {
    let mut r = *m;
    for (i, row) in r.iter_mut().enumerate() {
        row[i] -= lambda;
    }
    let cross =
        |u: [f64; 3], v: [f64; 3]| [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]];
    [cross(r[0], r[1]), cross(r[0], r[2]), cross(r[1], r[2])]
        .into_iter()
        .map(|v| (v, v.iter().map(|x| x * x).sum::<f64>()))
        .filter(|&(_, n)| n > 0.0 && n.is_finite())
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(v, n)| v.map(|x| x / n.sqrt()))
}

/// How much of the ellipse `e` is a bright ridge in `l` (`w` x `h`): of its points inside the
/// image (one per pixel of circumference), how many are. At each point the plane is averaged along
/// the ellipse's tangent over `2 s + 1` px (so a lone speck counts for little and a rim in full),
/// at offsets along the normal: the brightest offset within `1 + s` px of the curve must exceed
/// the averages `2 + s` px farther in and farther out by `t` (0-255).
pub fn rim_support(l: &[u8], w: usize, h: usize, e: &Ellipse, s: f64, t: f64) -> (usize, usize) {
    let sample = |x: f64, y: f64| -> Option<f64> {
        if x < 0.0 || y < 0.0 || x > (w - 1) as f64 || y > (h - 1) as f64 {
            return None;
        }
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = (x - x0 as f64, y - y0 as f64);
        let at = |xx: usize, yy: usize| l[yy * w + xx] as f64;
        let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
        let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
        Some(top * (1.0 - fy) + bottom * fy)
    };
    let half = s.round().max(1.0) as i32;
    let near = (1.0 + s).round() as i32;
    let gap = 2.0 + s;
    let steps = e.circumference().ceil().max(24.0) as usize;
    let (ct, st) = (e.theta.cos(), e.theta.sin());
    let (mut inside, mut hits) = (0, 0);
    'points: for i in 0..steps {
        let p = 2.0 * std::f64::consts::PI * i as f64 / steps as f64;
        let (px, py) = e.point(p, 1.0);
        // Tangent of the ellipse at `p`, rotated into the image; the normal points outwards.
        let (du, dv) = (-e.a * p.sin(), e.b * p.cos());
        let (tx, ty) = (du * ct - dv * st, du * st + dv * ct);
        let norm = tx.hypot(ty).max(1e-9);
        let (tx, ty) = (tx / norm, ty / norm);
        let (nx, ny) = (ty, -tx);
        let line = |o: f64| -> Option<f64> {
            let mut sum = 0.0;
            for j in -half..=half {
                sum += sample(px + o * nx + j as f64 * tx, py + o * ny + j as f64 * ty)?;
            }
            Some(sum / (2 * half + 1) as f64)
        };
        let mut best = (f64::MIN, 0.0);
        for o in -near..=near {
            let Some(v) = line(o as f64) else { continue 'points };
            if v > best.0 {
                best = (v, o as f64);
            }
        }
        let (Some(a), Some(b)) = (line(best.1 - gap), line(best.1 + gap)) else { continue };
        inside += 1;
        hits += (best.0 - a.max(b) >= t) as usize;
    }
    (inside, hits)
}

/// The white top-hat of `l` (`w` x `h`) with a square of side `2 radius + 1`: how much lighter
/// each pixel is than the opening (bright structures narrower than the square).
pub fn top_hat(l: &[u8], w: usize, h: usize, radius: usize) -> Vec<u8> {
    let e = line_filter(l, w, h, LineDir::Horizontal, radius, MorphOp::Min);
    let e = line_filter(&e, w, h, LineDir::Vertical, radius, MorphOp::Min);
    let o = line_filter(&e, w, h, LineDir::Horizontal, radius, MorphOp::Max);
    let o = line_filter(&o, w, h, LineDir::Vertical, radius, MorphOp::Max);
    l.iter().zip(&o).map(|(&a, &b)| a.saturating_sub(b)).collect()
}

/// A rim piece: its bounding box `[x0, y0, x1, y1]` and its pixels.
type Piece = ([u32; 4], Vec<(f64, f64)>);

/// The strong rim threshold of `cfg` on the 0-255 top-hat (`cfg.bubble_threshold` L* units).
fn rim_threshold(cfg: &HairConfig) -> f64 {
    (cfg.bubble_threshold as f64 * 2.55).round().max(1.0)
}

/// The bubbles in the luminance plane `l` (`w` x `h`, L* scaled to 0-255) whose sizes are
/// defined at `cfg.size_ref` and scaled by `s`, with the white top-hat they were found on.
pub fn find_bubbles(l: &[u8], w: usize, h: usize, s: f32, cfg: &HairConfig) -> (Vec<Ellipse>, Vec<u8>) {
    let s = s as f64;
    let th = top_hat(l, w, h, (2.0 * s).round().max(1.0) as usize);
    let t = rim_threshold(cfg);
    let strong: Vec<u8> = th.iter().map(|&v| if v as f64 >= t { 255 } else { 0 }).collect();
    let (r_min, r_max) = (cfg.bubble_min_radius as f64 * s, cfg.bubble_max_radius as f64 * s);
    // Rim pieces: long enough to be a fifth of the smallest bubble, no wider than the largest,
    // and thin (no more pixels than a full rim 3 px wide, scaled, of the largest).
    let pieces: Vec<Piece> = components(&strong, w, h, true)
        .into_iter()
        .filter(|p| {
            let [x0, y0, x1, y1] = p.bbox;
            let extent = (x1 - x0).max(y1 - y0) as f64 + 1.0;
            extent >= r_min * 0.8
                && extent <= 2.0 * r_max + 2.0
                && p.area >= 4
                && (p.area as f64) <= 2.0 * std::f64::consts::PI * r_max * 3.0 * s
        })
        .map(|p| (p.bbox, p.runs.iter().flat_map(|&(y, a, b)| (a..=b).map(move |x| (x as f64, y as f64))).collect()))
        .collect();
    // The rings a few pixels inside and outside the rim.
    let gap = 3.0 + 2.0 * s;
    let verify = |pts: &[(f64, f64)]| -> Option<Ellipse> {
        let e = fit_ellipse(pts)?;
        if e.a > r_max || e.b < r_min || e.b < cfg.bubble_min_aspect as f64 * e.a {
            return None;
        }
        if e.mean_distance(pts) > 0.5 + s {
            return None;
        }
        // The share of the ellipse scaled by `k` that is a ridge (None: too little of it lies
        // in the image).
        let ridge = |k: f64| -> Option<f64> {
            let scaled = Ellipse { a: e.a * k, b: e.b * k, ..e };
            let (inside, hit) = rim_support(l, w, h, &scaled, s, t / 2.0);
            (inside as f64 >= 0.75 * scaled.circumference().ceil().max(24.0)).then(|| hit as f64 / inside as f64)
        };
        if ridge(1.0)? < cfg.bubble_coverage as f64 {
            return None;
        }
        let outer = ridge(1.0 + gap / e.b).unwrap_or(1.0);
        let inner = if e.b - gap >= 3.0 * s { ridge((1.0 - gap / e.b).min(0.5)).unwrap_or(1.0) } else { 0.0 };
        if outer.max(inner) > cfg.bubble_clear as f64 {
            return None;
        }
        // The inside, away from the rim, is mostly clear: a bubble's fluid shows what lies
        // under it (a highlight, an inner ring), a cluster of bright specks is bright all over.
        let (n, bright) = e.inside(1.0 - (1.0 + 2.0 * s) / e.b, w, h, |i| th[i] as f64 >= t / 2.0);
        (bright as f64 <= 0.3 * n as f64).then_some(e)
    };
    let mut found: Vec<Ellipse> = Vec::new();
    // A piece on a bubble already found has nothing more to propose.
    let explained = |found: &[Ellipse], pts: &[(f64, f64)]| found.iter().any(|e| e.mean_distance(pts) <= 1.5);
    // Each piece proposes its own ellipse; then, for a rim broken into arcs too short to fit
    // alone, each pair of pieces near enough to lie on one bubble proposes theirs.
    let mut used = vec![false; pieces.len()];
    for (k, (_, pts)) in pieces.iter().enumerate() {
        if explained(&found, pts) {
            used[k] = true;
        } else if let Some(e) = verify(pts) {
            found.push(e);
            used[k] = true;
        }
    }
    let apart = |a: &[u32; 4], b: &[u32; 4]| {
        let dx = (a[0] as f64 - b[2] as f64).max(b[0] as f64 - a[2] as f64);
        let dy = (a[1] as f64 - b[3] as f64).max(b[1] as f64 - a[3] as f64);
        dx.max(dy).max(0.0)
    };
    let mut both = Vec::new();
    for i in 0..pieces.len() {
        for j in i + 1..pieces.len() {
            if used[i] || used[j] || apart(&pieces[i].0, &pieces[j].0) > r_max {
                continue;
            }
            both.clear();
            both.extend_from_slice(&pieces[i].1);
            both.extend_from_slice(&pieces[j].1);
            if explained(&found, &both) {
                continue;
            }
            if let Some(e) = verify(&both) {
                found.push(e);
                used[i] = true;
                used[j] = true;
            }
        }
    }
    (found, th)
}

/// The bubbles of `l` (see [`find_bubbles`]) as a 0/255 mask of `w` x `h`: their rims (pixels
/// within `1 + s` px of a bubble's ellipse and lighter than the opening by half
/// `cfg.bubble_threshold`) and the highlights inside them (by all of it).
pub fn bubble_mask(l: &[u8], w: usize, h: usize, s: f32, cfg: &HairConfig) -> Vec<u8> {
    let (bubbles, th) = find_bubbles(l, w, h, s, cfg);
    let t = rim_threshold(cfg);
    let mut out = vec![0u8; w * h];
    let band = 1.0 + s as f64;
    for e in &bubbles {
        let reach = e.a + band + 1.0;
        let xs = (e.cx - reach).floor().max(0.0) as usize..=((e.cx + reach).ceil().max(0.0) as usize).min(w - 1);
        let ys = (e.cy - reach).floor().max(0.0) as usize..=((e.cy + reach).ceil().max(0.0) as usize).min(h - 1);
        for y in ys {
            for x in xs.clone() {
                let (i, v) = (y * w + x, th[y * w + x] as f64);
                let (xf, yf) = (x as f64, y as f64);
                if (v >= t / 2.0 && e.distance(xf, yf) <= band) || (v >= t && e.contains(xf, yf)) {
                    out[i] = 255;
                }
            }
        }
    }
    if !bubbles.is_empty() {
        tracing::debug!(count = bubbles.len(), "air bubbles");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_ellipse(e: &Ellipse, n: usize, from: f64, to: f64) -> Vec<(f64, f64)> {
        (0..n).map(|i| e.point(from + (to - from) * i as f64 / (n - 1) as f64, 1.0)).collect()
    }

    #[test]
    fn fit_recovers_an_ellipse_from_its_points_and_from_an_arc() {
        let truth = Ellipse { cx: 40.0, cy: 25.0, a: 12.0, b: 7.0, theta: 0.6 };
        for (from, to) in [(0.0, 6.2), (0.3, 3.6)] {
            // Rounded to pixels, as a rim is.
            let pts: Vec<(f64, f64)> =
                on_ellipse(&truth, 80, from, to).into_iter().map(|(x, y)| (x.round(), y.round())).collect();
            let e = fit_ellipse(&pts).unwrap();
            assert!((e.cx - 40.0).abs() < 1.0 && (e.cy - 25.0).abs() < 1.0, "{e:?}");
            assert!((e.a - 12.0).abs() < 1.0 && (e.b - 7.0).abs() < 1.0, "{e:?}");
            let turn = (e.theta - 0.6).rem_euclid(std::f64::consts::PI);
            assert!(turn.min(std::f64::consts::PI - turn) < 0.1, "{e:?}");
            assert!(e.distance(pts[3].0, pts[3].1) < 1.0);
        }
        // A circle: any angle.
        let c = Ellipse { cx: 0.0, cy: 0.0, a: 5.0, b: 5.0, theta: 0.0 };
        let e = fit_ellipse(&on_ellipse(&c, 30, 0.0, 6.0)).unwrap();
        assert!((e.a - 5.0).abs() < 1e-6 && (e.b - 5.0).abs() < 1e-6, "{e:?}");
        // Points on a line are no ellipse.
        assert!(fit_ellipse(&(0..20).map(|i| (i as f64, 2.0 * i as f64)).collect::<Vec<_>>()).is_none());
        assert!(fit_ellipse(&[(0.0, 0.0); 3]).is_none());
    }

    #[test]
    fn circumference_and_distance() {
        let c = Ellipse { cx: 1.0, cy: 2.0, a: 3.0, b: 3.0, theta: 0.3 };
        assert!((c.circumference() - 6.0 * std::f64::consts::PI).abs() < 1e-9);
        assert!((c.distance(5.0, 2.0) - 1.0).abs() < 0.2);
        assert!(c.distance(1.0, 2.0).is_infinite());
    }

    /// A ring lighter than noisy skin is a bubble, whole or broken; a light arc (a curved hair),
    /// a lattice of small rings (the light gaps of a network) and bright specks are not.
    #[test]
    fn rings_are_bubbles_arcs_and_specks_are_not() {
        let (w, h) = (128usize, 128usize);
        let mut rng = derm_core::Rng::new(3);
        let base: Vec<u8> = (0..w * h).map(|_| 150 + (rng.f32() * 12.0) as u8).collect();
        let draw = |img: &mut Vec<u8>, e: &Ellipse, from: f64, to: f64| {
            for (x, y) in on_ellipse(e, 400, from, to) {
                let (x, y) = (x.round() as usize, y.round() as usize);
                img[y * w + x] = 230;
                img[y * w + x + 1] = 230;
            }
        };
        let cfg = HairConfig::default();
        let ring = Ellipse { cx: 50.0, cy: 60.0, a: 14.0, b: 9.0, theta: 0.4 };
        let mut img = base.clone();
        draw(&mut img, &ring, 0.0, 2.0 * std::f64::consts::PI);
        let (found, _) = find_bubbles(&img, w, h, 1.0, &cfg);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!((found[0].cx - 50.5).abs() < 1.5 && (found[0].a - 14.0).abs() < 2.0, "{found:?}");
        let m = bubble_mask(&img, w, h, 1.0, &cfg);
        assert!(m.iter().filter(|&&v| v != 0).count() >= 2 * 60);
        // The same ring broken in three places.
        let mut img = base.clone();
        for k in 0..3 {
            let from = k as f64 * 2.1;
            draw(&mut img, &ring, from, from + 1.6);
        }
        assert_eq!(find_bubbles(&img, w, h, 1.0, &cfg).0.len(), 1);
        // A third of a larger ellipse: a curved light hair.
        let mut img = base.clone();
        draw(&mut img, &Ellipse { cx: 64.0, cy: 64.0, a: 30.0, b: 20.0, theta: 0.0 }, 0.0, 2.1);
        assert!(find_bubbles(&img, w, h, 1.0, &cfg).0.is_empty());
        // Rings of radius 5 every 14 px: each alone would pass, but rings lie all around it.
        let mut img = base.clone();
        for cy in (8..120).step_by(14) {
            for cx in (8..120).step_by(14) {
                let c = Ellipse { cx: cx as f64, cy: cy as f64, a: 5.0, b: 5.0, theta: 0.0 };
                draw(&mut img, &c, 0.0, 2.0 * std::f64::consts::PI);
            }
        }
        assert!(find_bubbles(&img, w, h, 1.0, &cfg).0.is_empty());
        let mut one = base.clone();
        draw(&mut one, &Ellipse { cx: 63.0, cy: 63.0, a: 5.0, b: 5.0, theta: 0.0 }, 0.0, 2.0 * std::f64::consts::PI);
        assert_eq!(find_bubbles(&one, w, h, 1.0, &cfg).0.len(), 1);
        // Bright specks of 2 x 2 px everywhere.
        let mut img = base.clone();
        for _ in 0..500 {
            let (x, y) = ((rng.f32() * 126.0) as usize, (rng.f32() * 126.0) as usize);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                img[(y + dy) * w + x + dx] = 230;
            }
        }
        assert!(find_bubbles(&img, w, h, 1.0, &cfg).0.is_empty());
        // Nothing but noise.
        assert!(bubble_mask(&base, w, h, 1.0, &cfg).iter().all(|&v| v == 0));
    }
}
