//! # derm-visual: the figures and pages a person looks at
//!
//! Every derm stage that produces something better looked at than read (overlays, heat maps,
//! sample grids, ROC and loss curves) draws it with this crate, and runs gather the pictures in
//! one HTML page. Kept apart from the training core so that a change to a plot recompiles only
//! what draws.
//!
//! - [`plot`]: figures drawn straight into `RgbImage`s with an embedded font (line plots,
//!   histograms, confusion matrices, heat-map and mask overlays, sample grids).
//! - [`report`]: a self-contained HTML page (headings, tables, key-value lists, figures, optional
//!   inline images).
//!
//! **Consumes:** numbers, RGB images and binary masks. **Produces:** `RgbImage`s (saved as PNG by
//! the caller) and `report.html`.

#![forbid(unsafe_code)]

pub mod plot;
pub mod report;
