//! Datasets in memory: images in [0, 1] as `f32`, labels, and the optional expert mark of each
//! image. Plain `Vec`s (Send + Sync) so that a dataset can be shared between threads; tensors
//! are made per batch by [`Dataset::batch`].

pub mod decoy;
pub mod folder;
pub mod mnist;
pub mod moving;

use crate::error::{CoreError, Result};
use tch::{Device, Kind, Tensor};

/// An expert's mark at image resolution: `+1` red ("do not look here"), `-1` green
/// ("look here"), `0` unmarked (thesis eq. 4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub values: Vec<i8>,
}

pub const RED: i8 = 1;
pub const GREEN: i8 = -1;

impl Mask {
    pub fn empty(width: usize, height: usize) -> Self {
        Mask {
            width,
            height,
            values: vec![0; width * height],
        }
    }

    /// Builds a mask from raw values, refusing a wrong length or a value outside {-1, 0, 1}.
    pub fn from_values(width: usize, height: usize, values: Vec<i8>) -> Result<Self> {
        if values.len() != width * height {
            return Err(CoreError::invalid(format!(
                "mask holds {} values but {width}x{height} needs {}",
                values.len(),
                width * height
            )));
        }
        if let Some(i) = values.iter().position(|v| !(-1..=1).contains(v)) {
            return Err(CoreError::invalid(format!(
                "mask value {} at index {i} is not one of -1, 0, 1",
                values[i]
            )));
        }
        Ok(Mask {
            width,
            height,
            values,
        })
    }

    pub fn red_count(&self) -> usize {
        self.values.iter().filter(|&&v| v == RED).count()
    }

    pub fn green_count(&self) -> usize {
        self.values.iter().filter(|&&v| v == GREEN).count()
    }

    pub fn is_empty(&self) -> bool {
        self.values.iter().all(|&v| v == 0)
    }

    /// The mask as an `f32` tensor of shape (1, 1, H, W).
    pub fn to_tensor(&self, device: Device) -> Tensor {
        let v: Vec<f32> = self.values.iter().map(|&x| x as f32).collect();
        Tensor::from_slice(&v)
            .reshape([1, 1, self.height as i64, self.width as i64])
            .to_device(device)
    }
}

/// Which rule a split's shortcut follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortcutRule {
    /// The shortcut encodes the label (training data, and validation data as a real
    /// project's would be).
    Label,
    /// The shortcut of a random class: useless (the deployment / test distribution).
    Random,
}

/// A benchmark with a shortcut: its splits and their clean twins (the same images without
/// the shortcut).
#[derive(Debug, Clone)]
pub struct ShortcutSplits {
    pub train: Dataset,
    pub val: Dataset,
    pub test: Dataset,
    pub clean_train: Dataset,
    pub clean_val: Dataset,
    pub clean_test: Dataset,
}

/// Images of one shape with their labels and optional marks.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub classes: Vec<String>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `len * channels * height * width` values in [0, 1], row-major (N, C, H, W).
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
    pub marks: Vec<Option<Mask>>,
    /// A stable name per image (file stem, or a generated id).
    pub names: Vec<String>,
}

impl Dataset {
    pub fn new(classes: Vec<String>, channels: usize, height: usize, width: usize) -> Self {
        Dataset {
            classes,
            channels,
            height,
            width,
            images: Vec::new(),
            labels: Vec::new(),
            marks: Vec::new(),
            names: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    pub fn push(&mut self, image: &[f32], label: i64, mark: Option<Mask>, name: String) {
        debug_assert_eq!(image.len(), self.image_len());
        self.images.extend_from_slice(image);
        self.labels.push(label);
        self.marks.push(mark);
        self.names.push(name);
    }

    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut out = Dataset::new(self.classes.clone(), self.channels, self.height, self.width);
        for &i in indices {
            out.push(
                self.image(i),
                self.labels[i],
                self.marks[i].clone(),
                self.names[i].clone(),
            );
        }
        out
    }

    /// The same images with every mark dropped (what an unmarked project looks like).
    pub fn without_marks(&self) -> Dataset {
        let mut out = self.clone();
        out.marks.iter_mut().for_each(|m| *m = None);
        out
    }

    pub fn marked_indices(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.marks[i].as_ref().is_some_and(|m| !m.is_empty()))
            .collect()
    }

    /// Images (N, C, H, W) and labels (N) of `indices` on `device`.
    pub fn batch(&self, indices: &[usize], device: Device) -> (Tensor, Tensor) {
        let n = self.image_len();
        let mut buf = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            buf.extend_from_slice(self.image(i));
        }
        let x = Tensor::from_slice(&buf)
            .reshape([
                indices.len() as i64,
                self.channels as i64,
                self.height as i64,
                self.width as i64,
            ])
            .to_device(device);
        let labels: Vec<i64> = indices.iter().map(|&i| self.labels[i]).collect();
        let y = Tensor::from_slice(&labels).to_device(device);
        (x, y)
    }

    /// Marks (N, 1, H, W) of `indices` as `f32` in {-1, 0, 1}; an unmarked image is all zero.
    pub fn mark_batch(&self, indices: &[usize], device: Device) -> Tensor {
        let hw = self.height * self.width;
        let mut buf = vec![0f32; indices.len() * hw];
        for (k, &i) in indices.iter().enumerate() {
            if let Some(m) = &self.marks[i] {
                for (d, &v) in buf[k * hw..(k + 1) * hw].iter_mut().zip(&m.values) {
                    *d = v as f32;
                }
            }
        }
        Tensor::from_slice(&buf)
            .reshape([
                indices.len() as i64,
                1,
                self.height as i64,
                self.width as i64,
            ])
            .to_kind(Kind::Float)
            .to_device(device)
    }

    /// Checks a mark against this dataset's image size.
    pub fn check_mask(&self, mask: &Mask) -> Result<()> {
        if mask.width != self.width || mask.height != self.height {
            return Err(CoreError::invalid(format!(
                "mask is {}x{} but images are {}x{}",
                mask.width, mask.height, self.width, self.height
            )));
        }
        Ok(())
    }
}
