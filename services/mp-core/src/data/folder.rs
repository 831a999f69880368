//! The image-folder format: `ROOT/{train,val,test}/{class}/*.png|jpg|jpeg` and optional marks
//! `ROOT/marks/{class}/{same file stem}.png` (red channel > 127 = red mark, green channel > 127
//! = green mark; red wins where both are set). Grayscale and RGB of any size; images of
//! different sizes need a resize. Every refusal names the file at fault.

use crate::data::{Dataset, Mask, GREEN, RED};
use crate::error::{CoreError, Result};
use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, Rgb, RgbImage};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const SPLITS: [&str; 3] = ["train", "val", "test"];

#[derive(Debug, Clone, Default)]
pub struct FolderOptions {
    /// Resize every image (and its mark, nearest-neighbour) to width x height.
    pub resize: Option<(u32, u32)>,
    /// Force grayscale (`Some(true)`) or RGB (`Some(false)`); by default grayscale only when
    /// every training image is.
    pub grayscale: Option<bool>,
    /// Leave out files that cannot be read or decoded (listed in [`ImageFolder::skipped`])
    /// instead of refusing the folder.
    pub skip_bad: bool,
}

/// The splits found under a root; `val` and `test` may be absent.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub train: Dataset,
    pub val: Option<Dataset>,
    pub test: Option<Dataset>,
    /// Files left out with `skip_bad`: path and reason.
    pub skipped: Vec<(PathBuf, String)>,
}

fn is_image(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()),
        Some(ref e) if e == "png" || e == "jpg" || e == "jpeg"
    )
}

/// The entries of `dir`, sorted by path.
pub fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| CoreError::io(dir, e))?;
    let mut v = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| CoreError::io(dir, e))?;
        v.push(entry.path());
    }
    v.sort();
    Ok(v)
}

fn open_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    decode_image(&bytes, path)
}

/// Decodes an image file's bytes (`origin` names it in errors), within the decoder's memory
/// limits (512 MiB; a file that claims a larger image is refused, not allocated).
pub fn decode_image(bytes: &[u8], origin: &Path) -> Result<DynamicImage> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| CoreError::io(origin, e))?
        .decode()
        .map_err(|e| CoreError::Image {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads a mark PNG into a mask; `want` is the size of the image it belongs to.
pub fn read_mask(path: &Path, want: (u32, u32)) -> Result<Mask> {
    let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
    decode_mask(&bytes, want, path)
}

/// A mark PNG's bytes as a mask (`origin` names it in errors); [`read_mask`] without the file.
pub fn decode_mask(bytes: &[u8], want: (u32, u32), origin: &Path) -> Result<Mask> {
    let path = origin;
    let img = decode_image(bytes, origin)?.to_rgb8();
    let (w, h) = img.dimensions();
    if (w, h) != want {
        return Err(CoreError::MaskSize {
            path: path.to_path_buf(),
            want_w: want.0,
            want_h: want.1,
            got_w: w,
            got_h: h,
        });
    }
    let values = img
        .pixels()
        .map(|p| {
            if p[0] > 127 {
                RED
            } else if p[1] > 127 {
                GREEN
            } else {
                0
            }
        })
        .collect();
    Ok(Mask {
        width: w as usize,
        height: h as usize,
        values,
    })
}

/// Writes a mask as a mark PNG (red = (255, 0, 0), green = (0, 255, 0), else black).
pub fn write_mask(path: &Path, mask: &Mask) -> Result<()> {
    let img = RgbImage::from_fn(mask.width as u32, mask.height as u32, |x, y| {
        match mask.values[y as usize * mask.width + x as usize] {
            RED => Rgb([255, 0, 0]),
            GREEN => Rgb([0, 255, 0]),
            _ => Rgb([0, 0, 0]),
        }
    });
    save(path, &DynamicImage::ImageRgb8(img))
}

fn save(path: &Path, img: &DynamicImage) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    }
    img.save(path).map_err(|e| CoreError::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Nearest-neighbour resize of a mask to `w` x `h`.
pub fn resize_mask(mask: &Mask, w: u32, h: u32) -> Mask {
    let mut out = Mask::empty(w as usize, h as usize);
    for y in 0..h as usize {
        for x in 0..w as usize {
            let sx = (x * mask.width) / w as usize;
            let sy = (y * mask.height) / h as usize;
            out.values[y * w as usize + x] = mask.values[sy * mask.width + sx];
        }
    }
    out
}

/// Pixels of an image as (C, H, W) in [0, 1].
pub fn image_to_chw(img: &DynamicImage, grayscale: bool) -> Vec<f32> {
    if grayscale {
        img.to_luma8()
            .pixels()
            .map(|p| p[0] as f32 / 255.0)
            .collect()
    } else {
        let rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        let hw = (w * h) as usize;
        let mut out = vec![0f32; 3 * hw];
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[c * hw + i] = p[c] as f32 / 255.0;
            }
        }
        out
    }
}

/// One image of a dataset as an 8-bit image (gray or RGB).
pub fn chw_to_image(pixels: &[f32], channels: usize, width: usize, height: usize) -> DynamicImage {
    let q = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let hw = width * height;
    if channels == 1 {
        DynamicImage::ImageLuma8(image::GrayImage::from_fn(
            width as u32,
            height as u32,
            |x, y| image::Luma([q(pixels[y as usize * width + x as usize])]),
        ))
    } else {
        DynamicImage::ImageRgb8(RgbImage::from_fn(width as u32, height as u32, |x, y| {
            let i = y as usize * width + x as usize;
            Rgb([q(pixels[i]), q(pixels[hw + i]), q(pixels[2 * hw + i])])
        }))
    }
}

/// An image file found by the scan, not decoded yet.
#[derive(Debug, Clone)]
pub struct Listed {
    pub path: PathBuf,
    /// Index into the folder's classes (the sorted `train/` class folders).
    pub class: usize,
}

fn scan_split(dir: &Path, classes: &[String], train: bool) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    for class_dir in sorted_entries(dir)? {
        if !class_dir.is_dir() {
            continue;
        }
        let name = class_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let class = class_index(classes, &name, &class_dir)?;
        let files: Vec<PathBuf> = sorted_entries(&class_dir)?
            .into_iter()
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        if files.is_empty() && train {
            return Err(CoreError::EmptyClass { path: class_dir });
        }
        out.extend(files.into_iter().map(|path| Listed { path, class }));
    }
    Ok(out)
}

fn class_index(classes: &[String], name: &str, path: &Path) -> Result<usize> {
    classes
        .iter()
        .position(|c| c == name)
        .ok_or_else(|| CoreError::UnknownClass {
            path: path.to_path_buf(),
            class: name.to_string(),
            known: classes.join(", "),
        })
}

/// An image folder listed but not decoded: every split's files and every mark file, checked
/// for structure (known classes, no empty training class, no mark without its image). What a
/// streamed reader walks, a chunk at a time, so that a folder far larger than memory can be read.
#[derive(Debug, Clone)]
pub struct FolderListing {
    pub root: PathBuf,
    /// The `train/` class folders, sorted.
    pub classes: Vec<String>,
    /// Per split of [`SPLITS`] (train, val, test): its files in order, or `None` when absent.
    pub splits: [Option<Vec<Listed>>; 3],
    marks: HashMap<(usize, String), PathBuf>,
}

/// Lists `root` in the image-folder format without decoding anything.
pub fn list_image_folder(root: &Path) -> Result<FolderListing> {
    let train_dir = root.join("train");
    if !train_dir.is_dir() {
        return Err(CoreError::Dataset {
            path: root.to_path_buf(),
            message: "no train/ folder (expected ROOT/{train,val,test}/{class}/*.png)".into(),
        });
    }
    let classes: Vec<String> = sorted_entries(&train_dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if classes.len() < 2 {
        return Err(CoreError::Dataset {
            path: train_dir,
            message: format!(
                "{} class folder(s); a classifier needs at least 2",
                classes.len()
            ),
        });
    }
    let mut splits: [Option<Vec<Listed>>; 3] = [None, None, None];
    for (k, split) in SPLITS.iter().enumerate() {
        let dir = root.join(split);
        if dir.is_dir() {
            splits[k] = Some(scan_split(&dir, &classes, k == 0)?);
        }
    }
    // Marks: marks/{class}/{stem}.png, every class folder a known class, every mark an image's.
    let mut marks: HashMap<(usize, String), PathBuf> = HashMap::new();
    let marks_dir = root.join("marks");
    if marks_dir.is_dir() {
        for class_dir in sorted_entries(&marks_dir)? {
            if !class_dir.is_dir() {
                continue;
            }
            let name = class_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let class = class_index(&classes, &name, &class_dir)?;
            for p in sorted_entries(&class_dir)? {
                if p.is_file() && is_image(&p) {
                    marks.insert((class, stem(&p)), p);
                }
            }
        }
    }
    if !marks.is_empty() {
        let images: std::collections::HashSet<(usize, String)> = splits
            .iter()
            .flatten()
            .flatten()
            .map(|l| (l.class, stem(&l.path)))
            .collect();
        let mut orphans: Vec<&PathBuf> = marks
            .iter()
            .filter(|(k, _)| !images.contains(k))
            .map(|(_, p)| p)
            .collect();
        orphans.sort();
        if let Some(path) = orphans.first() {
            return Err(CoreError::Dataset {
                path: path.to_path_buf(),
                message: "mark has no image of the same class and file stem".into(),
            });
        }
    }
    Ok(FolderListing {
        root: root.to_path_buf(),
        classes,
        splits,
        marks,
    })
}

/// How [`FolderListing::decode`] turns files into a dataset.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeOptions {
    /// Grayscale (`Some(true)`) or RGB (`Some(false)`); `None`: grayscale only when every
    /// decoded image is.
    pub grayscale: Option<bool>,
    /// The dataset's width x height; `None`: the first decoded image's.
    pub size: Option<(u32, u32)>,
    /// Resize images (and marks, nearest-neighbour) of another size to `size`; without it such
    /// an image is refused, named.
    pub resize: bool,
    /// Read each image's mark where the folder has one.
    pub marks: bool,
}

/// Files decoded into a dataset, and the files that could not be read or decoded.
pub struct Decoded {
    pub dataset: Dataset,
    pub bad: Vec<(PathBuf, String)>,
}

impl FolderListing {
    /// Image files in all splits.
    pub fn total(&self) -> usize {
        self.splits.iter().flatten().map(Vec::len).sum()
    }

    /// Decodes `files` (of this listing) on all cores into one dataset, in order; calls
    /// `progress(1)` per file decoded. A file that cannot be read or decoded is returned in
    /// [`Decoded::bad`] and left out; an image of the wrong size without `resize`, or a mark
    /// of the wrong size, is an error naming the file.
    pub fn decode(
        &self,
        files: &[Listed],
        opts: DecodeOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Decoded> {
        let decoded = decode_files(files, progress);
        let mut ok = Vec::with_capacity(files.len());
        let mut bad = Vec::new();
        for (l, r) in files.iter().zip(decoded) {
            match r {
                Ok(image) => ok.push((l, image)),
                Err(e) => bad.push((l.path.clone(), bad_reason(e))),
            }
        }
        let grayscale = opts.grayscale.unwrap_or_else(|| {
            !ok.is_empty()
                && ok.iter().all(|(_, img)| {
                    matches!(
                        img.color(),
                        image::ColorType::L8 | image::ColorType::L16 | image::ColorType::La8
                    )
                })
        });
        let (width, height) = match (opts.size, ok.first()) {
            (Some(s), _) => s,
            (None, Some((_, img))) => img.dimensions(),
            (None, None) => (0, 0),
        };
        let channels = if grayscale { 1 } else { 3 };
        let mut ds = Dataset::new(
            self.classes.clone(),
            channels,
            height as usize,
            width as usize,
        );
        for (l, image) in ok {
            let (w, h) = image.dimensions();
            let img = if (w, h) != (width, height) {
                if !opts.resize {
                    return Err(CoreError::Dataset {
                        path: l.path.clone(),
                        message: format!(
                            "image is {w}x{h} but the dataset is {width}x{height}; pass a resize"
                        ),
                    });
                }
                image.resize_exact(width, height, FilterType::Triangle)
            } else {
                image
            };
            let name = stem(&l.path);
            let mark = match (opts.marks, self.marks.get(&(l.class, name.clone()))) {
                (true, Some(mp)) => {
                    let m = read_mask(mp, (w, h))?;
                    Some(if (w, h) != (width, height) {
                        resize_mask(&m, width, height)
                    } else {
                        m
                    })
                }
                _ => None,
            };
            ds.push(&image_to_chw(&img, grayscale), l.class as i64, mark, name);
        }
        Ok(Decoded { dataset: ds, bad })
    }
}

fn bad_reason(e: CoreError) -> String {
    match e {
        CoreError::Image { message, .. } => message,
        other => other.to_string(),
    }
}

/// Decodes `files` on all cores (up to 8 threads), in order; calls `progress(1)` per file.
fn decode_files(files: &[Listed], progress: &(dyn Fn(u64) + Sync)) -> Vec<Result<DynamicImage>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let per = files.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|l| {
                            let r = open_image(&l.path);
                            progress(1);
                            r
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("decoder thread"))
            .collect()
    })
}

/// Refuses `bad` files: one is an [`CoreError::Image`], several a [`CoreError::BadImages`]
/// listing all.
pub fn refuse_bad(bad: Vec<(PathBuf, String)>) -> Result<()> {
    match bad.len() {
        0 => Ok(()),
        1 => {
            let (path, message) = bad.into_iter().next().expect("one");
            Err(CoreError::Image { path, message })
        }
        count => Err(CoreError::BadImages {
            count,
            list: bad
                .iter()
                .map(|(p, why)| format!("  {}: {why}", p.display()))
                .collect::<Vec<_>>()
                .join("\n"),
        }),
    }
}

/// Loads `root` in the image-folder format, with marks where `root/marks` has them.
pub fn load_image_folder(root: &Path, opts: &FolderOptions) -> Result<ImageFolder> {
    load_image_folder_with_progress(root, opts, &|_, _| {})
}

/// [`load_image_folder`], calling `progress(decoded, total)` as image files are decoded.
/// Every file that cannot be read or decoded is named: one is an [`CoreError::Image`],
/// several a [`CoreError::BadImages`] listing all, unless `opts.skip_bad`.
pub fn load_image_folder_with_progress(
    root: &Path,
    opts: &FolderOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ImageFolder> {
    let listing = list_image_folder(root)?;
    let total = listing.total() as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let tick = |n: u64| {
        let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        progress(d + n, total);
    };
    // Training images first: they decide gray or RGB and the size for the other splits.
    let mut dopts = DecodeOptions {
        grayscale: opts.grayscale,
        size: opts.resize,
        resize: opts.resize.is_some(),
        marks: true,
    };
    let mut splits: Vec<Option<Dataset>> = vec![None, None, None];
    let mut skipped = Vec::new();
    for (k, files) in listing.splits.iter().enumerate() {
        let Some(files) = files else { continue };
        let d = listing.decode(files, dopts, &tick)?;
        skipped.extend(d.bad);
        if k == 0 {
            if d.dataset.is_empty() {
                refuse_bad(std::mem::take(&mut skipped))?;
                return Err(CoreError::Dataset {
                    path: root.to_path_buf(),
                    message: "train/ holds no readable image".into(),
                });
            }
            dopts.grayscale = Some(d.dataset.channels == 1);
            dopts.size = Some((d.dataset.width as u32, d.dataset.height as u32));
        }
        splits[k] = Some(d.dataset);
    }
    if !opts.skip_bad {
        refuse_bad(std::mem::take(&mut skipped))?;
    }
    let mut it = splits.into_iter();
    let train = it.next().flatten().ok_or_else(|| CoreError::Dataset {
        path: root.to_path_buf(),
        message: "train/ holds no image".into(),
    })?;
    Ok(ImageFolder {
        root: root.to_path_buf(),
        train,
        val: it.next().flatten(),
        test: it.next().flatten(),
        skipped,
    })
}

/// Writes `ds` as `root/{split}/{class}/{name}.png`, and its marks (if `with_marks`) as
/// `root/marks/{class}/{name}.png`.
pub fn write_split(root: &Path, split: &str, ds: &Dataset, with_marks: bool) -> Result<()> {
    for i in 0..ds.len() {
        let class = &ds.classes[ds.labels[i] as usize];
        let img = chw_to_image(ds.image(i), ds.channels, ds.width, ds.height);
        save(
            &root
                .join(split)
                .join(class)
                .join(format!("{}.png", ds.names[i])),
            &img,
        )?;
        if let (true, Some(m)) = (with_marks, &ds.marks[i]) {
            write_mask(
                &root
                    .join("marks")
                    .join(class)
                    .join(format!("{}.png", ds.names[i])),
                m,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    fn gray(path: &Path, w: u32, h: u32, v: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        GrayImage::from_pixel(w, h, Luma([v])).save(path).unwrap();
    }

    fn two_class_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        gray(&r.join("train/cat/a.png"), 6, 4, 10);
        gray(&r.join("train/cat/b.png"), 6, 4, 20);
        gray(&r.join("train/dog/c.png"), 6, 4, 200);
        gray(&r.join("test/dog/d.png"), 6, 4, 250);
        let mut m = Mask::empty(6, 4);
        m.values[0] = RED;
        m.values[23] = GREEN;
        write_mask(&r.join("marks/cat/b.png"), &m).unwrap();
        dir
    }

    #[test]
    fn loads_grayscale_with_marks() {
        let dir = two_class_root();
        let f = load_image_folder(dir.path(), &FolderOptions::default()).unwrap();
        assert_eq!(f.train.classes, vec!["cat", "dog"]);
        assert_eq!((f.train.channels, f.train.width, f.train.height), (1, 6, 4));
        assert_eq!(f.train.labels, vec![0, 0, 1]);
        assert!(f.train.marks[0].is_none());
        let m = f.train.marks[1].as_ref().unwrap();
        assert_eq!(
            (m.values[0], m.values[23], m.red_count(), m.green_count()),
            (1, -1, 1, 1)
        );
        assert!(f.val.is_none());
        assert_eq!(f.test.as_ref().unwrap().labels, vec![1]);
        assert!((f.test.unwrap().image(0)[0] - 250.0 / 255.0).abs() < 1e-6);
    }

    #[test]
    fn rgb_and_resize_resize_marks_too() {
        let dir = two_class_root();
        let r = dir.path();
        RgbImage::from_pixel(12, 8, Rgb([255, 0, 0]))
            .save(r.join("train/dog/e.png"))
            .unwrap();
        let opts = FolderOptions {
            resize: Some((3, 2)),
            grayscale: None,
            skip_bad: false,
        };
        let f = load_image_folder(r, &opts).unwrap();
        assert_eq!((f.train.channels, f.train.width, f.train.height), (3, 3, 2));
        let e = f.train.names.iter().position(|n| n == "e").unwrap();
        let px = f.train.image(e);
        assert_eq!((px[0], px[6], px[12]), (1.0, 0.0, 0.0));
        let m = f.train.marks[1].as_ref().unwrap();
        assert_eq!((m.width, m.height, m.values[0]), (3, 2, RED));
    }

    #[test]
    fn each_bad_dataset_is_a_clear_error_naming_the_file() {
        // Corrupt image.
        let dir = two_class_root();
        std::fs::write(dir.path().join("train/dog/bad.png"), b"not a png").unwrap();
        let e = load_image_folder(dir.path(), &FolderOptions::default()).unwrap_err();
        assert!(
            matches!(e, CoreError::Image { .. }) && e.to_string().contains("bad.png"),
            "{e}"
        );

        // Several: every one named at once; with skip_bad left out and listed.
        std::fs::write(dir.path().join("train/cat/empty.jpg"), b"").unwrap();
        let e = load_image_folder(dir.path(), &FolderOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, CoreError::BadImages { count: 2, .. })
                && msg.contains("bad.png")
                && msg.contains("empty.jpg"),
            "{msg}"
        );
        let opts = FolderOptions {
            skip_bad: true,
            ..Default::default()
        };
        let f = load_image_folder(dir.path(), &opts).unwrap();
        let mut names: Vec<String> = f
            .skipped
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["bad.png", "empty.jpg"]);
        assert!(f.train.names.iter().all(|n| n != "bad" && n != "empty"));

        // Mask of the wrong size.
        let dir = two_class_root();
        write_mask(&dir.path().join("marks/cat/a.png"), &Mask::empty(5, 4)).unwrap();
        let e = load_image_folder(dir.path(), &FolderOptions::default()).unwrap_err();
        assert!(matches!(e, CoreError::MaskSize { .. }), "{e}");
        assert!(
            e.to_string().contains("marks/cat/a.png") && e.to_string().contains("5x4"),
            "{e}"
        );

        // Empty class folder.
        let dir = two_class_root();
        std::fs::create_dir_all(dir.path().join("train/emu")).unwrap();
        let e = load_image_folder(dir.path(), &FolderOptions::default()).unwrap_err();
        assert!(
            matches!(e, CoreError::EmptyClass { .. }) && e.to_string().contains("emu"),
            "{e}"
        );

        // Unknown class in marks.
        let dir = two_class_root();
        write_mask(&dir.path().join("marks/cow/a.png"), &Mask::empty(6, 4)).unwrap();
        let e = load_image_folder(dir.path(), &FolderOptions::default()).unwrap_err();
        assert!(
            matches!(e, CoreError::UnknownClass { .. }) && e.to_string().contains("cow"),
            "{e}"
        );

        // Unknown class in a test split, a mark without image, sizes that differ.
        let dir = two_class_root();
        gray(&dir.path().join("test/owl/x.png"), 6, 4, 1);
        let e = load_image_folder(dir.path(), &FolderOptions::default()).unwrap_err();
        assert!(e.to_string().contains("owl"), "{e}");
        let dir = two_class_root();
        write_mask(&dir.path().join("marks/dog/zz.png"), &Mask::empty(6, 4)).unwrap();
        let e = load_image_folder(dir.path(), &FolderOptions::default()).unwrap_err();
        assert!(e.to_string().contains("zz.png"), "{e}");
        let dir = two_class_root();
        gray(&dir.path().join("train/dog/big.png"), 7, 4, 1);
        let e = load_image_folder(dir.path(), &FolderOptions::default()).unwrap_err();
        assert!(
            e.to_string().contains("big.png") && e.to_string().contains("resize"),
            "{e}"
        );
    }

    #[test]
    fn a_listing_decoded_chunk_by_chunk_matches_the_whole_folder_fitted_to_a_model() {
        let dir = two_class_root();
        let listing = list_image_folder(dir.path()).unwrap();
        assert_eq!(listing.total(), 4);
        let train = listing.splits[0].as_ref().unwrap();
        assert!(listing.splits[1].is_none());
        // A 3-channel model's input, 3x2: gray images become RGB, resized.
        let opts = DecodeOptions {
            grayscale: Some(false),
            size: Some((3, 2)),
            resize: true,
            marks: true,
        };
        let ticks = std::sync::atomic::AtomicU64::new(0);
        let tick = |n: u64| {
            ticks.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        let parts: Vec<Dataset> = train
            .chunks(2)
            .map(|c| listing.decode(c, opts, &tick).unwrap().dataset)
            .collect();
        assert_eq!(ticks.into_inner(), 3);
        let whole = load_image_folder(
            dir.path(),
            &FolderOptions {
                resize: Some((3, 2)),
                ..Default::default()
            },
        )
        .unwrap()
        .train;
        let mut k = 0;
        for p in &parts {
            assert_eq!((p.channels, p.width, p.height), (3, 3, 2));
            for i in 0..p.len() {
                assert_eq!(
                    (p.labels[i], &p.names[i]),
                    (whole.labels[k], &whole.names[k])
                );
                assert_eq!(p.marks[i], whole.marks[k]);
                let (rgb, gray) = (p.image(i), whole.image(k));
                for c in 0..3 {
                    assert_eq!(&rgb[c * 6..(c + 1) * 6], gray);
                }
                k += 1;
            }
        }
        assert_eq!(k, whole.len());
        // Without a resize, an image of another size is refused, named.
        let e = listing
            .decode(
                train,
                DecodeOptions {
                    resize: false,
                    ..opts
                },
                &|_| {},
            )
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("a.png") && e.to_string().contains("6x4"),
            "{e}"
        );
    }

    #[test]
    fn write_then_load_round_trips() {
        let mut ds = Dataset::new(vec!["a".into(), "b".into()], 1, 5, 3);
        let img: Vec<f32> = (0..15).map(|i| i as f32 / 15.0).collect();
        let mut m = Mask::empty(3, 5);
        m.values[4] = RED;
        ds.push(&img, 1, Some(m.clone()), "x1".into());
        ds.push(&img, 0, None, "x2".into());
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), "train", &ds, true).unwrap();
        let f = load_image_folder(dir.path(), &FolderOptions::default()).unwrap();
        let k = f.train.names.iter().position(|n| n == "x1").unwrap();
        assert_eq!(f.train.marks[k].as_ref(), Some(&m));
        for (a, b) in f.train.image(k).iter().zip(&img) {
            assert!((a - b).abs() <= 0.5 / 255.0 + 1e-6);
        }
    }
}
