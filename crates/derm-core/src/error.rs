//! derm-core's error type: every variant says which file or tensor and what was wrong.

use std::path::PathBuf;

/// Errors of derm-core. Messages are lowercase and name the file or tensor concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An image could not be decoded, or is not what was expected.
    #[error("{}: {msg}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// A mask does not fit its image or cannot be read as binary.
    #[error("{}: {msg}", path.display())]
    Mask {
        /// The mask file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// A checkpoint is missing, corrupt or of another architecture.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// A JSON or TOML document could not be parsed.
    #[error("{}: {msg}", path.display())]
    Parse {
        /// The document.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// A device was asked for that this build or machine cannot give.
    #[error("device {spec:?}: {msg}")]
    Device {
        /// What the user asked for.
        spec: String,
        /// Why it cannot be had.
        msg: String,
    },
    /// Training produced a NaN or infinite loss (or gradient norm).
    #[error(
        "{quantity} became {value} at epoch {epoch} step {step}; training stopped, the last good checkpoint is kept"
    )]
    NonFiniteLoss {
        /// What was not finite: `loss` or `gradient norm`.
        quantity: &'static str,
        /// The value.
        value: f64,
        /// Epoch (0-based).
        epoch: usize,
        /// Global step.
        step: usize,
    },
    /// Another run holds the output folder.
    #[error("{} is in use by another derm run ({holder}); wait for it, or choose another output folder", path.display())]
    Locked {
        /// The folder.
        path: PathBuf,
        /// What the lock file says of its holder.
        holder: String,
    },
    /// Arguments or shapes that do not fit together.
    #[error("{0}")]
    Invalid(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// derm-core's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// An [`Error::Invalid`] from anything printable.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// Returns early with an [`Error::Invalid`] built by `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::Invalid(format!($($arg)*))) };
}
