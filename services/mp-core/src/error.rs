//! The one error type of the core crate.

use std::path::PathBuf;

/// Everything the engine can refuse or fail at. Messages are lowercase and name the file
/// (or the argument) at fault, so the edge can hand them to a person unchanged.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },
    #[error("{count} files cannot be read as images:\n{list}")]
    BadImages { count: usize, list: String },
    #[error("{path}: mask is {got_w}x{got_h} but its image is {want_w}x{want_h}")]
    MaskSize {
        path: PathBuf,
        want_w: u32,
        want_h: u32,
        got_w: u32,
        got_h: u32,
    },
    #[error("{path}: class folder holds no image")]
    EmptyClass { path: PathBuf },
    #[error("{path}: unknown class {class:?} (known: {known})")]
    UnknownClass {
        path: PathBuf,
        class: String,
        known: String,
    },
    #[error("{path}: {message}")]
    Dataset { path: PathBuf, message: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

impl CoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        CoreError::InvalidInput(message.into())
    }
}
