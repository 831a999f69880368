//! `mp export marks` and `mp import marks`: the project's marks as mark PNGs in the
//! image-folder layout (one folder per expert), as COCO-style RLE JSON with the expert, time
//! and model version, or as JSONL; an import takes the same formats, deduplicated by image
//! and expert.

use crate::platform::runtime;
use crate::project::ProjectPlace;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use mp_core::data::folder::{read_mask, sorted_entries, write_mask};
use mp_core::data::{Mask, GREEN, RED};
use mp_store::{MarkRecord, Role, Store};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MarkFormat {
    /// OUT/{expert}/marks/{class}/{name}.png: each expert's folder is a `marks` folder the
    /// image-folder loader reads (red channel = red mark, green = green)
    Folder,
    /// One JSON file, COCO style: images, categories red and green, one annotation per
    /// mark and colour with uncompressed RLE (column-major) and the expert, time, version
    Coco,
    /// One mark per line: image, expert, time, model version, size and the row-major RLE
    Jsonl,
}

#[derive(Args)]
pub struct MarksExportArgs {
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: MarkFormat,
    /// A folder (folder format) or a file
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub place: ProjectPlace,
}

#[derive(Args)]
pub struct MarksImportArgs {
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: MarkFormat,
    /// What `mp export marks` wrote (a folder for the folder format, else a file)
    #[arg(long)]
    pub from: PathBuf,
    /// Also add the imported marks to the guidance set (marks trusted as if committed)
    #[arg(long)]
    pub guidance: bool,
    #[command(flatten)]
    pub place: ProjectPlace,
}

/// One mark as exported, independent of the format.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MarkLine {
    pub image_id: String,
    pub expert: String,
    pub time_ms: u64,
    pub model_version: u64,
    pub width: u32,
    pub height: u32,
    /// Row-major runs: `values[i]` repeated `lengths[i]` times (1 red, -1 green, 0 none).
    pub values: Vec<i8>,
    pub lengths: Vec<u32>,
}

impl MarkLine {
    fn of(m: &MarkRecord, expert: &str) -> MarkLine {
        let r = mp_proto::rle::encode(m.width, m.height, &m.values);
        MarkLine {
            image_id: m.image_id.clone(),
            expert: expert.to_string(),
            time_ms: m.time_ms,
            model_version: m.model_version,
            width: m.width,
            height: m.height,
            values: r.values.iter().map(|&v| v as i8).collect(),
            lengths: r.lengths,
        }
    }

    fn pixels(&self) -> Result<Vec<i8>> {
        let r = mp_proto::v1::RleMask {
            width: self.width,
            height: self.height,
            values: self.values.iter().map(|&v| v as i32).collect(),
            lengths: self.lengths.clone(),
        };
        mp_proto::rle::decode(&r).map_err(|e| anyhow::anyhow!("mark of {}: {e}", self.image_id))
    }
}

/// A name safe as one path component.
fn component(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("_{s}")
    } else {
        s
    }
}

/// COCO's uncompressed RLE of the pixels equal to `value`: column-major, counts of
/// alternating runs starting with pixels that are not.
fn coco_counts(m: &MarkLine, pixels: &[i8], value: i8) -> Vec<u32> {
    let (w, h) = (m.width as usize, m.height as usize);
    let mut counts = Vec::new();
    let (mut current, mut run) = (false, 0u32);
    for x in 0..w {
        for y in 0..h {
            let on = pixels[y * w + x] == value;
            if on != current {
                counts.push(run);
                current = on;
                run = 0;
            }
            run += 1;
        }
    }
    counts.push(run);
    counts
}

fn coco_pixels(counts: &[u32], w: usize, h: usize, value: i8, out: &mut [i8]) -> Result<()> {
    if counts.iter().map(|&c| c as usize).sum::<usize>() != w * h {
        bail!("COCO counts do not add up to {w}x{h}");
    }
    let mut i = 0usize;
    for (k, &c) in counts.iter().enumerate() {
        for _ in 0..c {
            if k % 2 == 1 {
                let (x, y) = (i / h, i % h);
                out[y * w + x] = value;
            }
            i += 1;
        }
    }
    Ok(())
}

async fn connect(place: &ProjectPlace) -> Result<Store> {
    let store = Store::connect(&place.redis_url, &place.prefix)
        .await
        .with_context(|| format!("connecting to {}", place.redis_url))?;
    if store.project().await?.is_none() {
        bail!("no project under prefix {}", place.prefix);
    }
    Ok(store)
}

/// The project's marks in `a.format`; returns how many were written.
pub fn export_marks(a: MarksExportArgs) -> Result<usize> {
    let lines = runtime()?.block_on(async {
        let store = connect(&a.place).await?;
        let names = store.expert_names().await?;
        let marks = store.all_marks().await?;
        Ok::<_, anyhow::Error>(
            marks
                .iter()
                .map(|m| MarkLine::of(m, names.get(&m.expert_id).unwrap_or(&m.expert_id)))
                .collect::<Vec<_>>(),
        )
    })?;
    write_lines(&lines, a.format, &a.out)?;
    println!(
        "{} mark(s) written to {} ({:?})",
        lines.len(),
        a.out.display(),
        a.format
    );
    Ok(lines.len())
}

pub fn write_lines(lines: &[MarkLine], format: MarkFormat, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match format {
        MarkFormat::Jsonl => {
            let mut text = String::new();
            for l in lines {
                text.push_str(&serde_json::to_string(l)?);
                text.push('\n');
            }
            std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
        }
        MarkFormat::Folder => {
            for l in lines {
                let (class, name) = l
                    .image_id
                    .split_once('/')
                    .with_context(|| format!("image id {:?} is not class/name", l.image_id))?;
                let path = out
                    .join(component(&l.expert))
                    .join("marks")
                    .join(component(class))
                    .join(format!("{}.png", component(name)));
                let mask = Mask {
                    width: l.width as usize,
                    height: l.height as usize,
                    values: l.pixels()?,
                };
                write_mask(&path, &mask)?;
            }
        }
        MarkFormat::Coco => {
            let mut images: BTreeMap<&str, (usize, u32, u32)> = BTreeMap::new();
            for l in lines {
                let n = images.len() + 1;
                images.entry(&l.image_id).or_insert((n, l.width, l.height));
            }
            let mut annotations = Vec::new();
            for (k, l) in lines.iter().enumerate() {
                let pixels = l.pixels()?;
                for (category, value) in [(1, RED), (2, GREEN)] {
                    let area = pixels.iter().filter(|&&v| v == value).count();
                    if area == 0 {
                        continue;
                    }
                    annotations.push(serde_json::json!({
                        "id": annotations.len() + 1,
                        "image_id": images[l.image_id.as_str()].0,
                        "category_id": category,
                        "iscrowd": 0,
                        "area": area,
                        "segmentation": {"size": [l.height, l.width], "counts": coco_counts(l, &pixels, value)},
                        "mark": k + 1,
                        "expert": l.expert,
                        "time_ms": l.time_ms,
                        "model_version": l.model_version,
                    }));
                }
            }
            let doc = serde_json::json!({
                "info": {"description": "Machine Punishment marks: red = not here, green = look here"},
                "images": images.iter().map(|(id, (n, w, h))| serde_json::json!({
                    "id": n, "file_name": id, "width": w, "height": h
                })).collect::<Vec<_>>(),
                "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}],
                "annotations": annotations,
            });
            std::fs::write(out, serde_json::to_string(&doc)?)
                .with_context(|| format!("writing {}", out.display()))?;
        }
    }
    Ok(())
}

/// Reads marks written by [`write_lines`] (or by hand in the same formats).
pub fn read_lines(
    format: MarkFormat,
    from: &Path,
    sizes: &HashMap<String, (u32, u32)>,
) -> Result<Vec<MarkLine>> {
    let text =
        || std::fs::read_to_string(from).with_context(|| format!("reading {}", from.display()));
    match format {
        MarkFormat::Jsonl => text()?
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{} line {}", from.display(), i + 1))
            })
            .collect(),
        MarkFormat::Coco => {
            let doc: serde_json::Value = serde_json::from_str(&text()?)
                .with_context(|| format!("{} is not JSON", from.display()))?;
            let mut files: HashMap<u64, (String, u32, u32)> = HashMap::new();
            for i in doc["images"].as_array().context("no images")? {
                files.insert(
                    i["id"].as_u64().context("image without id")?,
                    (
                        i["file_name"]
                            .as_str()
                            .context("image without file_name")?
                            .to_string(),
                        i["width"].as_u64().unwrap_or(0) as u32,
                        i["height"].as_u64().unwrap_or(0) as u32,
                    ),
                );
            }
            // One mark per (image, mark number), its colours merged.
            let mut marks: BTreeMap<(u64, u64), (MarkLine, Vec<i8>)> = BTreeMap::new();
            for a in doc["annotations"].as_array().context("no annotations")? {
                let img = a["image_id"]
                    .as_u64()
                    .context("annotation without image_id")?;
                let (file, w, h) = files.get(&img).context("annotation of an unknown image")?;
                let value = match a["category_id"].as_u64() {
                    Some(1) => RED,
                    Some(2) => GREEN,
                    other => bail!("unknown category {other:?}"),
                };
                let counts: Vec<u32> = serde_json::from_value(a["segmentation"]["counts"].clone())
                    .context("segmentation counts")?;
                let key = (
                    img,
                    a["mark"].as_u64().unwrap_or(a["id"].as_u64().unwrap_or(0)),
                );
                let (_, px) = marks.entry(key).or_insert_with(|| {
                    (
                        MarkLine {
                            image_id: file.clone(),
                            expert: a["expert"].as_str().unwrap_or("imported").to_string(),
                            time_ms: a["time_ms"].as_u64().unwrap_or(0),
                            model_version: a["model_version"].as_u64().unwrap_or(0),
                            width: *w,
                            height: *h,
                            values: Vec::new(),
                            lengths: Vec::new(),
                        },
                        vec![0; (*w as usize) * (*h as usize)],
                    )
                });
                coco_pixels(&counts, *w as usize, *h as usize, value, px)?;
            }
            Ok(marks
                .into_values()
                .map(|(mut l, px)| {
                    let r = mp_proto::rle::encode(l.width, l.height, &px);
                    l.values = r.values.iter().map(|&v| v as i8).collect();
                    l.lengths = r.lengths;
                    l
                })
                .collect())
        }
        MarkFormat::Folder => {
            let mut out = Vec::new();
            let now = mp_store::now_ms();
            for expert in entries(from, true)? {
                let marks = expert.join("marks");
                if !marks.is_dir() {
                    continue;
                }
                let name = expert
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string();
                for class in entries(&marks, true)? {
                    let class_name = class
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .to_string();
                    for file in entries(&class, false)? {
                        let stem = file
                            .file_stem()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .to_string();
                        let image_id = format!("{class_name}/{stem}");
                        let Some(&(w, h)) = sizes.get(&image_id) else {
                            bail!("{}: no image {image_id} in the project", file.display());
                        };
                        let m = read_mask(&file, (w, h))?;
                        let r = mp_proto::rle::encode(w, h, &m.values);
                        out.push(MarkLine {
                            image_id,
                            expert: name.clone(),
                            time_ms: now,
                            model_version: 0,
                            width: w,
                            height: h,
                            values: r.values.iter().map(|&v| v as i8).collect(),
                            lengths: r.lengths,
                        });
                    }
                }
            }
            Ok(out)
        }
    }
}

/// The sub-folders (`dirs`) or the files of `dir`, sorted.
fn entries(dir: &Path, dirs: bool) -> Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir() == dirs)
        .collect())
}

/// What an import did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub stored: usize,
    pub duplicates: usize,
    pub experts_created: Vec<String>,
}

pub fn import_marks(a: MarksImportArgs) -> Result<Imported> {
    runtime()?.block_on(async {
        let store = connect(&a.place).await?;
        let mut sizes = HashMap::new();
        if a.format == MarkFormat::Folder {
            for id in store.image_ids().await? {
                let m = store.image_meta(&id).await?;
                sizes.insert(id, (m.width, m.height));
            }
        }
        let lines = read_lines(a.format, &a.from, &sizes)?;
        let mut ids: HashMap<String, String> = store
            .experts()
            .await?
            .into_iter()
            .map(|e| (e.name, e.id))
            .collect();
        let mut done = Imported::default();
        let source = a.from.display().to_string();
        for l in &lines {
            let expert = match ids.get(&l.expert) {
                Some(id) => id.clone(),
                None => {
                    let (id, _token) = store.create_expert(&l.expert, Role::Expert).await?;
                    done.experts_created.push(l.expert.clone());
                    ids.insert(l.expert.clone(), id.clone());
                    id
                }
            };
            let rec = MarkRecord {
                id: String::new(),
                image_id: l.image_id.clone(),
                expert_id: expert,
                time_ms: l.time_ms,
                model_version: l.model_version,
                width: l.width,
                height: l.height,
                values: l.pixels()?,
                idempotency_key: String::new(),
                proposal_id: String::new(),
            };
            match store
                .import_mark(&rec, &source)
                .await
                .with_context(|| format!("mark of {} by {}", l.image_id, l.expert))?
            {
                Some(id) => {
                    done.stored += 1;
                    if a.guidance {
                        store.add_guidance(&id).await?;
                    }
                }
                None => done.duplicates += 1,
            }
        }
        println!(
            "{} mark(s) imported, {} already there (same image and expert){}",
            done.stored,
            done.duplicates,
            if done.experts_created.is_empty() {
                String::new()
            } else {
                format!(
                    "; experts created (no token given out: `mp admin create-expert` for one): {}",
                    done.experts_created.join(", ")
                )
            }
        );
        Ok(done)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(expert: &str, image: &str, px: &[i8], w: u32, h: u32) -> MarkLine {
        let r = mp_proto::rle::encode(w, h, px);
        MarkLine {
            image_id: image.into(),
            expert: expert.into(),
            time_ms: 1234,
            model_version: 3,
            width: w,
            height: h,
            values: r.values.iter().map(|&v| v as i8).collect(),
            lengths: r.lengths,
        }
    }

    #[test]
    fn every_format_round_trips() {
        let lines = vec![
            line("ann", "a/1", &[1, 1, 0, -1, 0, 0], 3, 2),
            line("bob b", "a/1", &[0, 0, 0, -1, -1, 1], 3, 2),
            line("ann", "b/x", &[0, 0, 0, 0, 0, 0], 3, 2),
        ];
        let sizes: HashMap<String, (u32, u32)> =
            [("a/1".to_string(), (3, 2)), ("b/x".to_string(), (3, 2))].into();
        let dir = tempfile::tempdir().unwrap();
        for format in [MarkFormat::Jsonl, MarkFormat::Coco, MarkFormat::Folder] {
            let out = dir.path().join(format!("{format:?}"));
            write_lines(&lines, format, &out).unwrap();
            let back = read_lines(format, &out, &sizes).unwrap();
            let marked = |l: &&MarkLine| l.pixels().unwrap().iter().any(|&v| v != 0);
            match format {
                MarkFormat::Jsonl => assert_eq!(back, lines),
                // COCO keeps the marks with a red or green pixel.
                MarkFormat::Coco => {
                    assert_eq!(
                        back,
                        lines.iter().filter(marked).cloned().collect::<Vec<_>>()
                    )
                }
                // Folder names are made path-safe; time and version are not kept.
                MarkFormat::Folder => {
                    let simple = |v: &[MarkLine]| {
                        let mut s: Vec<_> = v
                            .iter()
                            .map(|l| {
                                (
                                    l.image_id.clone(),
                                    component(&l.expert),
                                    l.pixels().unwrap(),
                                )
                            })
                            .collect();
                        s.sort();
                        s
                    };
                    assert_eq!(simple(&back), simple(&lines));
                    assert!(out.join("bob_b/marks/a/1.png").is_file());
                }
            }
        }
    }

    #[test]
    fn coco_rle_is_column_major_and_starts_with_the_background() {
        let l = line("a", "a/1", &[1, 0, 1, 1], 2, 2);
        // Column-major: (0,0)=1, (0,1)=1, (1,0)=0, (1,1)=1.
        assert_eq!(coco_counts(&l, &l.pixels().unwrap(), RED), vec![0, 2, 1, 1]);
        let mut px = vec![0; 4];
        coco_pixels(&[0, 2, 1, 1], 2, 2, RED, &mut px).unwrap();
        assert_eq!(px, vec![1, 0, 1, 1]);
        assert!(coco_pixels(&[1, 1], 2, 2, RED, &mut px).is_err());
    }
}
