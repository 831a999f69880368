//! The image store: pixels live outside Redis, behind the `object_store` crate — the local
//! filesystem by default, `s3://`, `gs://` or `az://` by configuration — and are read through
//! a bounded LRU cache. Redis keeps each image's metadata only (`project` module).
//!
//! An image is one lossless PNG (8-bit gray or RGB, already at the project's size) at
//! `<root>/<h2>/<h32>.png`, where `h32` is the first 32 hex digits of the SHA-256 of its id:
//! ids come from file names and may hold any character, object keys must not, and a forged id
//! can never name an object outside the root.

use crate::{Result, StoreError};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Default bound of the pixel cache of one process (MiB): `MP_IMAGE_CACHE_MB` changes it.
pub const DEFAULT_CACHE_MB: usize = 256;

/// Concurrent object reads or writes of one batch call.
const PARALLEL: usize = 32;

/// Where a project's images are and how much of them one process keeps in memory.
pub struct ImageStore {
    url: String,
    inner: Arc<dyn ObjectStore>,
    root: ObjectPath,
    cache: Mutex<ByteLru>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// The size an image is stored at; a stored object of another size is corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub width: u32,
    pub height: u32,
    pub channels: u32,
}

impl Shape {
    pub fn bytes(&self) -> usize {
        self.width as usize * self.height as usize * self.channels as usize
    }
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("url", &self.url)
            .finish()
    }
}

/// Pixels by image id, evicting the least recently used once `budget` bytes are held.
struct ByteLru {
    map: lru::LruCache<String, Arc<[u8]>>,
    bytes: usize,
    budget: usize,
}

impl ByteLru {
    fn get(&mut self, id: &str) -> Option<Arc<[u8]>> {
        self.map.get(id).cloned()
    }

    fn put(&mut self, id: &str, px: Arc<[u8]>) {
        if px.len() > self.budget {
            return;
        }
        if let Some(old) = self.map.put(id.to_string(), px.clone()) {
            self.bytes -= old.len();
        }
        self.bytes += px.len();
        while self.bytes > self.budget {
            match self.map.pop_lru() {
                Some((_, v)) => self.bytes -= v.len(),
                None => break,
            }
        }
    }
}

/// What an image view needs from a model version: class probabilities and the normalised
/// saliency map. Stored in the image store (`views/v{version}/…`), never in Redis: at
/// 224x224 one view is 200 kB.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelView {
    pub probabilities: Vec<f32>,
    pub saliency: Vec<f32>,
}

impl ModelView {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 4 * (self.probabilities.len() + self.saliency.len()));
        out.extend((self.probabilities.len() as u32).to_le_bytes());
        for v in self.probabilities.iter().chain(&self.saliency) {
            out.extend(v.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(b: &[u8]) -> Option<ModelView> {
        if b.len() < 4 || !(b.len() - 4).is_multiple_of(4) {
            return None;
        }
        let n = u32::from_le_bytes(b[..4].try_into().ok()?) as usize;
        let vals: Vec<f32> = b[4..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if n > vals.len() {
            return None;
        }
        Some(ModelView {
            probabilities: vals[..n].to_vec(),
            saliency: vals[n..].to_vec(),
        })
    }
}

/// The object key of an image id.
pub fn object_key(id: &str) -> String {
    let h = hex::encode(Sha256::digest(id.as_bytes()));
    format!("{}/{}.png", &h[..2], &h[..32])
}

fn store_error(id: &str, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => {
            StoreError::NotFound(format!("image {id:?} is missing from the image store"))
        }
        other => StoreError::Unavailable(format!("image store, image {id:?}: {other}")),
    }
}

impl ImageStore {
    /// Opens the store at `url`: `file:///dir`, a plain directory path, `s3://bucket/prefix`,
    /// `gs://bucket/prefix` or `az://container/prefix`. Cloud credentials and endpoints come
    /// from the environment as each provider's own tools read them (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`; `GOOGLE_SERVICE_ACCOUNT`;
    /// `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, …). A local directory is
    /// created if missing. `cache_bytes` bounds the pixels kept in memory.
    pub fn open(url: &str, cache_bytes: usize) -> Result<ImageStore> {
        let bad = |why: String| StoreError::InvalidArgument(format!("image store {url:?}: {why}"));
        let parsed = match url::Url::parse(url) {
            Ok(u) if u.scheme().len() > 1 => u,
            // No scheme (or a Windows drive letter): a directory.
            _ => {
                let dir = std::path::Path::new(url);
                std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
                let abs = std::fs::canonicalize(dir).map_err(|e| bad(e.to_string()))?;
                url::Url::from_directory_path(&abs)
                    .map_err(|_| bad("not an absolute directory".into()))?
            }
        };
        let (inner, root): (Arc<dyn ObjectStore>, ObjectPath) = match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|_| bad("not a local path".into()))?;
                std::fs::create_dir_all(&dir).map_err(|e| bad(e.to_string()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::new(fs), ObjectPath::default())
            }
            "s3" | "s3a" => {
                let s = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::new(s), ObjectPath::from(parsed.path()))
            }
            "gs" => {
                let s = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::new(s), ObjectPath::from(parsed.path()))
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let s = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::new(s), ObjectPath::from(parsed.path()))
            }
            other => {
                return Err(bad(format!(
                    "scheme {other}:// is not one of file, s3, gs, az"
                )))
            }
        };
        Ok(ImageStore {
            url: parsed.to_string(),
            inner,
            root,
            cache: Mutex::new(ByteLru {
                map: lru::LruCache::unbounded(),
                bytes: 0,
                budget: cache_bytes,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// The store's URL as other processes should open it (a directory as `file://`).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, id: &str) -> ObjectPath {
        self.under(&object_key(id))
    }

    fn under(&self, key: &str) -> ObjectPath {
        let mut p = self.root.clone();
        for part in key.split('/') {
            p = p.join(part);
        }
        p
    }

    fn view_path(&self, version: u64, id: &str) -> ObjectPath {
        let key = object_key(id);
        self.under(&format!("views/v{version}/{}", key.replace(".png", ".bin")))
    }

    /// Stores an image's view under a model version (the scoring pass writes one for every
    /// image it scores, the gateway one for each view it had to compute).
    pub async fn put_view(&self, version: u64, id: &str, view: &ModelView) -> Result<()> {
        self.inner
            .put(
                &self.view_path(version, id),
                PutPayload::from(view.to_bytes()),
            )
            .await
            .map_err(|e| store_error(id, e))?;
        Ok(())
    }

    /// Many views, `PARALLEL` writes at a time.
    pub async fn put_views(&self, version: u64, views: &[(&str, &ModelView)]) -> Result<()> {
        all_parallel(
            views
                .iter()
                .map(|(id, v)| self.put_view(version, id, v))
                .collect(),
        )
        .await
    }

    /// An image's stored view under a version; `None` when none was stored or it does not
    /// decode (it is then computed again).
    pub async fn view(&self, version: u64, id: &str) -> Result<Option<ModelView>> {
        match self.inner.get(&self.view_path(version, id)).await {
            Ok(r) => {
                let bytes = r.bytes().await.map_err(|e| store_error(id, e))?;
                Ok(ModelView::from_bytes(&bytes))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(id, e)),
        }
    }

    /// Writes one image (8-bit, row-major, channels interleaved) as PNG.
    pub async fn put(&self, id: &str, shape: Shape, pixels: &[u8]) -> Result<()> {
        let png = encode_png(shape, pixels)
            .map_err(|e| StoreError::InvalidArgument(format!("image {id:?}: {e}")))?;
        self.inner
            .put(&self.path(id), PutPayload::from(png))
            .await
            .map_err(|e| store_error(id, e))?;
        Ok(())
    }

    /// Writes many images, `PARALLEL` at a time.
    pub async fn put_many(&self, images: &[(&str, Shape, &[u8])]) -> Result<()> {
        all_parallel(
            images
                .iter()
                .map(|(id, shape, px)| self.put(id, *shape, px))
                .collect(),
        )
        .await
    }

    /// One image's pixels, from the cache or the store. A missing object is `NotFound`, one
    /// that does not decode to `shape` is `Corrupt`; both name the image.
    pub async fn get(&self, id: &str, shape: Shape) -> Result<Arc<[u8]>> {
        if let Some(px) = self.cache.lock().expect("cache lock").get(id) {
            if px.len() == shape.bytes() {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(px);
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let bytes = self
            .inner
            .get(&self.path(id))
            .await
            .map_err(|e| store_error(id, e))?
            .bytes()
            .await
            .map_err(|e| store_error(id, e))?;
        let px: Arc<[u8]> = decode_png(&bytes, shape)
            .map_err(|e| StoreError::Corrupt(format!("image {id:?} in the image store: {e}")))?
            .into();
        self.cache.lock().expect("cache lock").put(id, px.clone());
        Ok(px)
    }

    /// Many images, `PARALLEL` reads at a time, each with its own outcome, in order.
    pub async fn get_many(&self, ids: &[(&str, Shape)]) -> Vec<Result<Arc<[u8]>>> {
        let gets: Vec<_> = ids.iter().map(|(id, shape)| self.get(id, *shape)).collect();
        futures::stream::iter(gets)
            .buffered(PARALLEL)
            .collect()
            .await
    }

    /// (cache hits, cache misses, bytes held) since the store was opened.
    pub fn cache_stats(&self) -> (u64, u64, usize) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            self.cache.lock().expect("cache lock").bytes,
        )
    }
}

/// Runs writes `PARALLEL` at a time; the first error wins. The futures are made by the
/// caller first: a stream `.map` closure over borrowed items would make the caller's future
/// not `Send` (a known limit of higher-ranked closures).
async fn all_parallel<F: std::future::Future<Output = Result<()>>>(writes: Vec<F>) -> Result<()> {
    futures::stream::iter(writes)
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The cache bound of this process: `MP_IMAGE_CACHE_MB`, else [`DEFAULT_CACHE_MB`].
pub fn cache_bytes_from_env() -> usize {
    std::env::var("MP_IMAGE_CACHE_MB")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(DEFAULT_CACHE_MB)
        << 20
}

fn color_type(channels: u32) -> std::result::Result<image::ExtendedColorType, String> {
    match channels {
        1 => Ok(image::ExtendedColorType::L8),
        3 => Ok(image::ExtendedColorType::Rgb8),
        c => Err(format!("{c} channels (1 or 3 are stored)")),
    }
}

/// PNG with fast compression: written once per image at ingest, read on every cache miss.
pub fn encode_png(shape: Shape, pixels: &[u8]) -> std::result::Result<Vec<u8>, String> {
    use image::ImageEncoder;
    if pixels.len() != shape.bytes() {
        return Err(format!(
            "{} bytes of pixels for {}x{}x{}",
            pixels.len(),
            shape.width,
            shape.height,
            shape.channels
        ));
    }
    let mut out = Vec::with_capacity(pixels.len() / 2 + 64);
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    )
    .write_image(
        pixels,
        shape.width,
        shape.height,
        color_type(shape.channels)?,
    )
    .map_err(|e| e.to_string())?;
    Ok(out)
}

pub fn decode_png(bytes: &[u8], shape: Shape) -> std::result::Result<Vec<u8>, String> {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    if (img.width(), img.height()) != (shape.width, shape.height) {
        return Err(format!(
            "stored at {}x{}, recorded as {}x{}",
            img.width(),
            img.height(),
            shape.width,
            shape.height
        ));
    }
    let px = match (shape.channels, img) {
        (1, image::DynamicImage::ImageLuma8(g)) => g.into_raw(),
        (3, image::DynamicImage::ImageRgb8(c)) => c.into_raw(),
        (c, other) => {
            return Err(format!(
                "stored as {:?}, recorded with {c} channels",
                other.color()
            ))
        }
    };
    Ok(px)
}
