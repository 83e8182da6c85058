//! [`HairConfig`]: every size is given for an image whose short side is [`HairConfig::size_ref`]
//! pixels and scaled with the image, so a 6000x4000 photograph and its 256 px thumbnail give
//! the same mask relative to their size.

use serde::{Deserialize, Serialize};

/// How masked pixels are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InpaintMethod {
    /// Telea's fast marching method (Telea 2004): pixels are filled from the outside in, each as
    /// a weighted first-order extrapolation of the known pixels within a small radius.
    Telea,
    /// Telea's fill followed by relaxation towards the harmonic (Laplace) solution, which is
    /// smoother across wide gaps.
    Harmonic,
}

impl InpaintMethod {
    /// The method's name as configs and the command line spell it: `telea` or `harmonic`.
    pub fn name(self) -> &'static str {
        match self {
            InpaintMethod::Telea => "telea",
            InpaintMethod::Harmonic => "harmonic",
        }
    }

    /// Parses `telea` or `harmonic`.
    pub fn parse(s: &str) -> Option<InpaintMethod> {
        [InpaintMethod::Telea, InpaintMethod::Harmonic].into_iter().find(|m| m.name() == s)
    }
}

/// Which hair detector [`crate::hair_mask`] runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HairDetector {
    /// Oriented line elements in `directions` orientations (issue 18): the hair score is the
    /// largest black-hat over the orientations minus the smallest, with shape tests on the pieces
    /// and a working resolution chosen from the image size ([`crate::mask::oriented_hair_mask`]).
    #[default]
    Oriented,
    /// The detector before issue 18: the black-hat in four orientations, with the lesion's
    /// texture kept out unless a piece crosses the lesion border ([`crate::legacy_hair_mask`]).
    Legacy,
}

/// Settings of hair, ruler and ink-mark detection and of inpainting.
///
/// Lengths and radii are in pixels of an image whose short side is `size_ref`, areas in square
/// pixels of that image; both are scaled by `min(w, h) / size_ref`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HairConfig {
    /// Which hair detector runs (`"oriented"`, the default, or `"legacy"`).
    pub detector: HairDetector,
    /// Short side (px) at which the sizes below are given.
    pub size_ref: u32,
    /// Length (px) of the line structuring elements of the closing; dark structures narrower
    /// than this across are found.
    pub line_length: f32,
    /// Black-hat threshold in CIE L* units (0-100): how much darker than its closed
    /// surroundings a pixel must be to be occlusion.
    pub threshold: f32,
    /// Connected pieces of the thresholded mask smaller than this (px²) are dropped as noise.
    pub min_area: f32,
    /// Radius (px) of the disc the occlusion mask is dilated by; 0 disables the dilation. The
    /// thresholded black-hat already covers anti-aliased edges that differ visibly.
    pub dilate_radius: f32,
    /// Radius (px) of the disc the occlusion mask is dilated by for inpainting only (so that
    /// faint edges are filled too); 0 inpaints exactly the mask.
    pub inpaint_margin: f32,
    /// Holes in the final mask up to this area (px²) are filled.
    pub max_hole_area: f32,
    /// [`crate::mask::legacy_hair_mask`] only. With a lesion mask: a piece that reaches into the
    /// lesion is kept there only when it also
    /// has at least this many pixels (px) outside the lesion, i.e. when it crosses the border.
    pub crossing_min_outside: f32,
    /// With a lesion mask: a pixel inside the lesion is on a thin elongated structure when the
    /// mask runs at most this wide (px) across it...
    pub crossing_max_width: f32,
    /// ...and at least this long (px) along it, straight.
    pub crossing_min_length: f32,
    /// Detection runs on the image reduced by an integer factor to a short side of `work_side`
    /// to twice that (smaller images as they are); 0 detects at full size.
    pub work_side: u32,
    /// Images with a short side under this are enlarged by an integer factor to at least this
    /// for detection (line elements of a few pixels cannot tell a hair from a dot); 0 never.
    pub min_work_side: u32,
    /// Orientation coherence (0-1) a hair candidate's neighbourhood must have: the length of the
    /// sum of the across-vectors over the sum of their lengths. Off (0) by default: everywhere,
    /// 0.45 keeps a synthetic pigment network out of the mask but costs 1.5 points of recall on
    /// the real-image benchmark; the `mesh_*` tests below do it only where a mesh is (BENCH.md).
    pub coherence: f32,
    /// Whether dark hairs are also looked for in the value plane (the lightness of each pixel's
    /// largest channel, [`crate::color::value_u8`]) besides the luminance, the larger score
    /// winning: on a brown lesion a hair's contrast is much larger there (BENCH.md).
    pub value_plane: bool,
    /// Whether dark hairs are also looked for in the chroma plane ([`crate::color::chroma_u8`]):
    /// a grey hair as light as the brown lesion it crosses is a dark line only there.
    pub chroma_plane: bool,
    /// Crossings, forks and wide hairs are added back to the pieces that passed the shape test
    /// from the candidates within two pixels of them, repeatedly up to `max_width` away; a
    /// candidate is added when its score is at least this share of the largest score of a hair
    /// pixel near it (lesion texture beside a hair scores lower than the hair, a crossing hair
    /// alike).
    pub addback_share: f32,
    /// A hair pixel is dropped when its score is under this share of the largest hair score on
    /// the line across it within half `max_width`: the lesion's texture that lies along a hair
    /// rides into the hair's piece through the shape test, but scores well below the hair
    /// (0 keeps them all; BENCH.md).
    pub relative_share: f32,
    /// Pixels scoring at least this multiple of their threshold are kept by the
    /// `relative_share` test whatever lies beside them.
    pub relative_keep: f32,
    /// When detection runs on a reduced image, a full-size pixel near a hair is kept when it is
    /// darker than the closing by at least this share of the hair's largest score near it (as
    /// well as half the threshold): a pixel half covered by the hair is about half as dark.
    pub edge_share: f32,
    /// Orientations of the line elements (evenly over 180°).
    pub directions: usize,
    /// Hair score threshold (L* units) inside the lesion, when a lesion mask is given
    /// (`threshold` applies outside it). 8 by default: the lesion's own texture scores higher
    /// than skin (BENCH.md).
    pub lesion_threshold: f32,
    /// Whether light (grey-white) hairs are looked for with the white top-hat.
    pub light: bool,
    /// Hair score threshold (L* units) of light hairs.
    pub light_threshold: f32,
    /// Hysteresis: a hair grows from pixels above its threshold through pixels above this share
    /// of it.
    pub hysteresis: f32,
    /// The same share inside the lesion, when a lesion mask is given: a hair crossing a lesion
    /// loses contrast there, and its faint part grows from the part that passed the threshold.
    pub lesion_hysteresis: f32,
    /// The orientation coherence (as `coherence`) a candidate below its threshold (grown by
    /// hysteresis) must have.
    pub weak_coherence: f32,
    /// Pigment network: inside the lesion, a candidate is in a mesh when candidates cover at
    /// least `mesh_density` of the lesion's pixels in the square of `min_length` around it and
    /// its orientation coherence (as `coherence`) is under this; 0 turns the mesh test off.
    pub mesh_coherence: f32,
    /// See `mesh_coherence`.
    pub mesh_density: f32,
    /// A mesh candidate counts as hair only on a straight run of this many times `min_length`
    /// whose pixels all lie near candidates pointing the run's way.
    pub mesh_length: f32,
    /// A mesh candidate is added back next to a hair only when the cosine between its
    /// doubled-angle orientation and that of the hair pixels around it is at least this (0.6:
    /// within about 27°).
    pub mesh_agreement: f32,
    /// Shortest piece (px) that counts as hair.
    pub min_length: f32,
    /// Widest piece (px, twice its area over its boundary pixels) that counts as hair.
    pub max_width: f32,
    /// Whether violet ink marks are looked for.
    pub ink: bool,
    /// Ink: red and blue must both exceed green by this much (0-255).
    pub ink_chroma: f32,
    /// Ink: the widest piece (px, area over length) that counts as a pen's stroke or dot; wider
    /// violet pieces are lesions (a blue-violet nevus passes the colour test).
    pub ink_max_width: f32,
    /// Ink: whether the colour test runs on the image's colours corrected by Shades of Gray
    /// colour constancy (so a bluish light is not taken for violet ink).
    pub ink_constancy: bool,
    /// Whether air bubbles (rings and ovals with a bright rim, [`crate::bubble`]) are looked for.
    pub bubbles: bool,
    /// Bubbles: how much lighter than its opening (L* units) a rim pixel must be (half of it
    /// along the rest of the rim).
    pub bubble_threshold: f32,
    /// Bubbles: the shortest semi-axis (px) that counts.
    pub bubble_min_radius: f32,
    /// Bubbles: the longest semi-axis (px) that counts.
    pub bubble_max_radius: f32,
    /// Bubbles: the least ratio of the short semi-axis to the long one.
    pub bubble_min_aspect: f32,
    /// Bubbles: the share (0-1) of its ellipse the rim must go round.
    pub bubble_coverage: f32,
    /// Bubbles: the largest share of the concentric ellipses a few pixels inside and outside the
    /// rim that may be bright ridges too (a bubble lies on smooth skin or lesion; a ring-shaped
    /// piece of a network or crust has more such rings around it).
    pub bubble_clear: f32,
    /// Whether rulers (long straight dark lines with regular tick marks) are looked for.
    pub rulers: bool,
    /// Shortest ruler line (px) that counts.
    pub ruler_min_length: f32,
    /// How filled-in masked pixels are computed.
    pub inpaint: InpaintMethod,
    /// Radius (px) of the neighbourhood each filled pixel is computed from (Telea's epsilon).
    pub inpaint_radius: f32,
    /// Relaxation sweeps of [`InpaintMethod::Harmonic`] after the Telea fill.
    pub harmonic_iterations: usize,
}

impl Default for HairConfig {
    fn default() -> Self {
        HairConfig {
            size_ref: 256,
            line_length: 11.0,
            detector: HairDetector::Oriented,
            threshold: 6.0,
            min_area: 10.0,
            dilate_radius: 0.0,
            inpaint_margin: 2.0,
            max_hole_area: 12.0,
            crossing_min_outside: 12.0,
            crossing_max_width: 4.0,
            crossing_min_length: 16.0,
            work_side: 512,
            min_work_side: 256,
            coherence: 0.0,
            value_plane: true,
            chroma_plane: true,
            addback_share: 0.5,
            relative_share: 0.8,
            relative_keep: 2.0,
            edge_share: 0.3,
            directions: 12,
            lesion_threshold: 8.0,
            light: true,
            light_threshold: 6.0,
            hysteresis: 1.0,
            lesion_hysteresis: 0.7,
            weak_coherence: 0.7,
            mesh_coherence: 0.5,
            mesh_density: 0.4,
            mesh_length: 2.0,
            mesh_agreement: 0.6,
            min_length: 16.0,
            max_width: 8.0,
            ink: true,
            ink_chroma: 20.0,
            ink_max_width: 16.0,
            ink_constancy: true,
            bubbles: true,
            bubble_threshold: 10.0,
            bubble_min_radius: 3.0,
            bubble_max_radius: 32.0,
            bubble_min_aspect: 0.35,
            bubble_coverage: 0.75,
            bubble_clear: 0.1,
            rulers: true,
            ruler_min_length: 96.0,
            inpaint: InpaintMethod::Harmonic,
            inpaint_radius: 3.0,
            harmonic_iterations: 60,
        }
    }
}

impl HairConfig {
    /// The factor from `size_ref` pixels to the pixels of a `w` x `h` image.
    pub fn scale(&self, w: u32, h: u32) -> f32 {
        w.min(h) as f32 / self.size_ref.max(1) as f32
    }

    /// Checks that every setting is in range.
    pub fn validate(&self) -> derm_core::Result<()> {
        let fields = [
            ("line_length", self.line_length),
            ("threshold", self.threshold),
            ("min_area", self.min_area),
            ("dilate_radius", self.dilate_radius),
            ("inpaint_margin", self.inpaint_margin),
            ("max_hole_area", self.max_hole_area),
            ("crossing_min_outside", self.crossing_min_outside),
            ("crossing_max_width", self.crossing_max_width),
            ("crossing_min_length", self.crossing_min_length),
            ("ruler_min_length", self.ruler_min_length),
            ("ink_chroma", self.ink_chroma),
            ("ink_max_width", self.ink_max_width),
            ("lesion_threshold", self.lesion_threshold),
            ("light_threshold", self.light_threshold),
            ("hysteresis", self.hysteresis),
            ("lesion_hysteresis", self.lesion_hysteresis),
            ("weak_coherence", self.weak_coherence),
            ("bubble_threshold", self.bubble_threshold),
            ("bubble_min_radius", self.bubble_min_radius),
            ("bubble_max_radius", self.bubble_max_radius),
            ("bubble_min_aspect", self.bubble_min_aspect),
            ("bubble_coverage", self.bubble_coverage),
            ("bubble_clear", self.bubble_clear),
            ("mesh_coherence", self.mesh_coherence),
            ("mesh_density", self.mesh_density),
            ("mesh_length", self.mesh_length),
            ("min_length", self.min_length),
            ("max_width", self.max_width),
            ("inpaint_radius", self.inpaint_radius),
            ("coherence", self.coherence),
            ("addback_share", self.addback_share),
            ("relative_share", self.relative_share),
            ("relative_keep", self.relative_keep),
            ("edge_share", self.edge_share),
        ];
        for (name, v) in fields {
            if !v.is_finite() || v < 0.0 {
                derm_core::bail!("hair config: {name} must be finite and non-negative, got {v}");
            }
        }
        if !(-1.0..=1.0).contains(&self.mesh_agreement) {
            derm_core::bail!("hair config: mesh_agreement is a cosine, -1 to 1, got {}", self.mesh_agreement);
        }
        if self.directions < 2 || self.directions > 64 {
            derm_core::bail!("hair config: directions must be 2 to 64, got {}", self.directions);
        }
        if self.size_ref == 0 {
            derm_core::bail!("hair config: size_ref must be positive");
        }
        if self.line_length < 3.0 {
            derm_core::bail!("hair config: line_length must be at least 3, got {}", self.line_length);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inpaint_method_names_match_their_config_spelling() {
        for m in [InpaintMethod::Telea, InpaintMethod::Harmonic] {
            assert_eq!(InpaintMethod::parse(m.name()), Some(m));
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{}\"", m.name()));
        }
        assert_eq!(InpaintMethod::parse("navier-stokes"), None);
    }

    #[test]
    fn parses_partial_json_and_rejects_unknown_fields() {
        let c: HairConfig = serde_json::from_str(r#"{"threshold": 4.5, "inpaint": "harmonic"}"#).unwrap();
        assert_eq!(c.threshold, 4.5);
        assert_eq!(c.inpaint, InpaintMethod::Harmonic);
        assert_eq!(c.line_length, HairConfig::default().line_length);
        assert_eq!(c.detector, HairDetector::Oriented);
        let c: HairConfig = serde_json::from_str(r#"{"detector": "legacy"}"#).unwrap();
        assert_eq!(c.detector, HairDetector::Legacy);
        assert!(serde_json::from_str::<HairConfig>(r#"{"detector": "other"}"#).is_err());
        assert!(serde_json::from_str::<HairConfig>(r#"{"treshold": 4}"#).is_err());
        let back: HairConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn validate_rejects_bad_values() {
        assert!(HairConfig::default().validate().is_ok());
        let c = HairConfig { threshold: f32::NAN, ..HairConfig::default() };
        assert!(c.validate().unwrap_err().to_string().contains("threshold"));
        let c = HairConfig { line_length: 1.0, ..HairConfig::default() };
        assert!(c.validate().is_err());
        assert_eq!(HairConfig::default().scale(512, 1024), 2.0);
    }
}
