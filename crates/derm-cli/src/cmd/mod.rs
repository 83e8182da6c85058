//! One module per subcommand, each an `Args` struct with `run(&self, &GlobalOpts)`.

pub mod data;
pub mod hair;
pub mod info;
pub mod phantom;
