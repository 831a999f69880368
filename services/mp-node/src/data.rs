//! Stored images and marks as `mp-core` datasets and masks.

use crate::{NodeError, Result};
use mp_core::data::{Dataset, Mask};
use mp_store::{ImageRecord, MarkRecord, ModelVersionRecord, ProjectInfo, Store};
use std::path::{Path, PathBuf};

/// Images (8-bit, interleaved) → a dataset whose names are the image ids.
pub fn dataset_from_records(records: &[ImageRecord], project: &ProjectInfo) -> Result<Dataset> {
    let (w, h, c) = (
        project.width as usize,
        project.height as usize,
        project.channels as usize,
    );
    let mut ds = Dataset::new(project.classes.clone(), c, h, w);
    let mut buf = vec![0f32; w * h * c];
    for r in records {
        if (r.width as usize, r.height as usize, r.channels as usize) != (w, h, c)
            || r.pixels.len() != w * h * c
        {
            return Err(NodeError::Invalid(format!(
                "image {} does not match the project's {w}x{h}x{c}",
                r.id
            )));
        }
        if r.label as usize >= project.classes.len() {
            return Err(NodeError::Invalid(format!(
                "image {} has label {} outside the classes",
                r.id, r.label
            )));
        }
        for p in 0..w * h {
            for k in 0..c {
                buf[k * w * h + p] = r.pixels[p * c + k] as f32 / 255.0;
            }
        }
        ds.push(&buf, r.label as i64, None, r.id.clone());
    }
    Ok(ds)
}

pub fn mask_of(m: &MarkRecord) -> Result<Mask> {
    Ok(Mask::from_values(
        m.width as usize,
        m.height as usize,
        m.values.clone(),
    )?)
}

/// A split from Redis: `train` (the queueable images), `val` or `test`.
pub async fn load_split(
    store: &Store,
    project: &ProjectInfo,
    split: &str,
    limit: Option<usize>,
) -> Result<Dataset> {
    let mut ids = match split {
        "train" => store.image_ids().await?,
        other => store.held_out_ids(other).await?,
    };
    if let Some(n) = limit {
        ids.truncate(n);
    }
    let records = images_skipping_bad(store, &ids).await?;
    dataset_from_records(&records, project)
}

/// The images of `ids` that can be read; each one that is unknown, missing from the image
/// store or corrupt there is logged, recorded for the admins (`Store::bad_images`) and left
/// out, so that one bad file never stops a node. An unreachable store is still an error.
pub async fn images_skipping_bad(store: &Store, ids: &[String]) -> Result<Vec<ImageRecord>> {
    let (ok, bad) = store.images_lenient(ids).await?;
    for (id, e) in &bad {
        tracing::warn!(image = %id, error = %e, "image left out");
        store.report_bad_image(id, &e.to_string()).await?;
    }
    Ok(ok)
}

pub fn checkpoint_path(dir: &Path, rec: &ModelVersionRecord) -> PathBuf {
    dir.join(&rec.file)
}

/// Where a proposal's weights go, relative to the checkpoint directory; refused for an id
/// that is not one of ours (a forged job cannot name a path outside the directory).
pub fn proposal_file(id: &str) -> Result<String> {
    mp_store::check_hex_id("proposal", id)?;
    Ok(format!("proposals/{id}.safetensors"))
}

/// Writes bytes durably ([`mp_core::durable::write_durable`]: unique temporary, fsync,
/// rename, fsync of the directory), off the async threads.
pub async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (path, bytes) = (path.to_path_buf(), bytes.to_vec());
    tokio::task::spawn_blocking(move || mp_core::durable::write_durable(&path, &bytes))
        .await
        .map_err(|e| NodeError::Io(format!("checkpoint writer: {e}")))??;
    Ok(())
}

/// Retention: removes proposal weights (`proposals/{id}.safetensors`) whose proposal is
/// settled — committed (its weights live on as a version), rejected or failed — or gone, and
/// suggester fits (`suggesters/`), once older than `keep`. Model versions are never
/// removed. Returns the files removed.
pub async fn collect_garbage(
    store: &mp_store::Store,
    checkpoints: &Path,
    keep: std::time::Duration,
) -> Result<usize> {
    let old = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= keep)
    };
    let files = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let mut removed = 0;
    for path in files(&checkpoints.join("proposals")) {
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".safetensors"))
        else {
            continue;
        };
        if mp_store::check_hex_id("proposal", id).is_err() || !old(&path) {
            continue;
        }
        let settled = match store.proposal(id).await {
            Ok(p) => matches!(p.status.as_str(), "committed" | "rejected" | "failed"),
            Err(mp_store::StoreError::NotFound(_)) => true,
            Err(e) => return Err(e.into()),
        };
        if settled && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    for path in files(&checkpoints.join("suggesters")) {
        if old(&path) && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}
