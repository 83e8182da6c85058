//! One module per subcommand, each an `Args` struct with `run(&self, &GlobalOpts)`.

pub mod analyze;
pub mod classify;
pub mod common;
pub mod data;
pub mod hair;
pub mod hair_eval;
pub mod info;
pub mod phantom;
pub mod purify;
pub mod segment;
pub mod serve;
pub mod synth;
pub mod vbp;
