//! What each pipeline stage records in its `record.json` (`metrics`), as types: a stage writes
//! one of these, and the report reads it back with [`crate::pipeline::Run::metrics`], so a field
//! that moves or goes missing is an error naming the stage, not a silent "n/a". Each is made of
//! the structs the `derm` stages themselves print with `--json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The data stage: the budget, the two folders and the training folder's check.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataMetrics {
    /// The budget level's sizes and minutes.
    pub budget: crate::pipeline::Budget,
    /// The training folder.
    pub train: String,
    /// The test folder.
    pub test: String,
    /// `derm data check` of the training folder.
    pub check: derm_data::check::CheckReport,
}

/// Occlusion masks scored against drawn ones (phantoms only: real images have no drawn masks).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HairScores {
    /// Images scored.
    pub images: usize,
    /// Pixel recall and precision, pooled over the images.
    pub recall: f64,
    /// See `recall`.
    pub precision: f64,
    /// Lesion pixels marked that are not drawn occlusion, as a share of lesion pixels.
    pub lesion_pixels_wrongly_marked: f64,
}

/// The hair stages (`hair` on the test images, `hair_train` on the training images).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HairMetrics {
    /// Scores, where ground truth exists.
    pub scores: Option<HairScores>,
}

/// The segmentation stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentMetrics {
    /// `derm segment eval` on the test folder.
    pub eval: derm_segment::EvalSummary,
    /// Seconds of training.
    pub train_seconds: f64,
    /// Optimiser steps.
    pub steps: usize,
}

/// The purification stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurifyMetrics {
    /// `derm purify eval` on the test folder: against the clean phantoms, or on real images inside
    /// holes borrowed from other test images' occlusion masks (`None` in records of older runs).
    pub eval: Option<Vec<derm_purify::MethodScores>>,
}

/// The synthesis stage: `novelty.json` of the sampled set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthMetrics {
    /// Per class: images kept, nearest-neighbour distances, real-versus-fake accuracy.
    pub novelty: derm_synth::sample::SampleSummary,
}

/// One classifier variant scored with test-time purification off and on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantScores {
    /// On the original test images.
    pub plain: derm_classify::EvalSummary,
    /// On the purified test images.
    pub test_time_purification: derm_classify::EvalSummary,
}

/// The classification stage: `baseline`, `purified`, `synthetic` and `both`.
pub type ClassifyMetrics = BTreeMap<String, VariantScores>;

/// The VisualBackProp stage, for the baseline and the full model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VbpMetrics {
    /// The baseline classifier.
    pub baseline: derm_vbp::SaliencySummary,
    /// The classifier trained on original, purified and synthetic images.
    pub both: derm_vbp::SaliencySummary,
}
