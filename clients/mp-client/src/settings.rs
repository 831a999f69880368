//! What the client remembers between runs: the server, the token and the tool settings —
//! natively in a small JSON file readable only by its owner, in the browser in the
//! `localStorage` of the gateway's origin (the token never goes into the URL).

use serde::{Deserialize, Serialize};
#[cfg(not(target_arch = "wasm32"))]
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub addr: String,
    pub token: String,
    /// Brush radius in screen points (the thesis's slider: 0–80).
    pub radius: f32,
    /// Opacity of the saliency overlay, 0–1.
    pub opacity: f32,
    pub show_saliency: bool,
    /// Outline the suggested mark (when the server has one for the image).
    pub show_suggestion: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            addr: "http://127.0.0.1:50051".into(),
            token: String::new(),
            radius: 12.0,
            opacity: 0.5,
            show_saliency: true,
            show_suggestion: true,
        }
    }
}

/// Where the settings are remembered.
#[derive(Debug, Clone, PartialEq)]
pub enum Store {
    /// Nowhere (tests, or no home directory).
    Nowhere,
    /// A JSON file, mode 0600.
    #[cfg(not(target_arch = "wasm32"))]
    File(PathBuf),
    /// The browser's `localStorage` for the page's origin, under [`Store::BROWSER_KEY`].
    #[cfg(target_arch = "wasm32")]
    Browser,
}

impl Store {
    #[cfg(target_arch = "wasm32")]
    pub const BROWSER_KEY: &'static str = "machine-punishment.client";

    /// The remembered settings, or the defaults when there are none or they cannot be
    /// read (a broken file must not keep a person out of the client).
    pub fn load(&self) -> Option<Settings> {
        match self {
            Store::Nowhere => None,
            #[cfg(not(target_arch = "wasm32"))]
            Store::File(p) => std::fs::read(p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok()),
            #[cfg(target_arch = "wasm32")]
            Store::Browser => local_storage()
                .and_then(|s| s.get_item(Self::BROWSER_KEY).ok().flatten())
                .and_then(|v| serde_json::from_str(&v).ok()),
        }
    }

    /// Remembers `s`; the error says where it could not.
    pub fn save(&self, s: &Settings) -> Result<(), String> {
        match self {
            Store::Nowhere => Ok(()),
            #[cfg(not(target_arch = "wasm32"))]
            Store::File(p) => s.save(p).map_err(|e| format!("{}: {e}", p.display())),
            #[cfg(target_arch = "wasm32")]
            Store::Browser => {
                let body = serde_json::to_string(s).map_err(|e| e.to_string())?;
                local_storage()
                    .ok_or_else(|| "the browser's localStorage is not available".to_string())?
                    .set_item(Self::BROWSER_KEY, &body)
                    .map_err(|_| "the browser's localStorage refused the settings".to_string())
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
fn local_storage() -> Option<web_sys::Storage> {
    web_sys::window()?.local_storage().ok().flatten()
}

/// `$XDG_CONFIG_HOME/machine-punishment/client.json`, else under `$HOME/.config`.
#[cfg(not(target_arch = "wasm32"))]
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("machine-punishment").join("client.json"))
}

#[cfg(not(target_arch = "wasm32"))]
impl Settings {
    /// The settings in `path`, or the defaults when there is no such file or it cannot be
    /// read (a broken file must not keep a person out of the client).
    pub fn load(path: &Path) -> Settings {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        {
            use std::io::Write;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            f.write_all(&body)?;
        }
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("client.json");
        assert_eq!(Settings::load(&p), Settings::default());
        let s = Settings {
            addr: "http://example:1".into(),
            token: "t".into(),
            radius: 3.0,
            opacity: 0.2,
            show_saliency: false,
            show_suggestion: false,
        };
        s.save(&p).unwrap();
        assert_eq!(Settings::load(&p), s);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "token file readable by others");
        }
        std::fs::write(&p, b"{not json").unwrap();
        assert_eq!(Settings::load(&p), Settings::default());
    }
}
