//! Learned mark propagation: from the marks committed so far, suggest red ("not here") and
//! green ("look here") masks for unmarked images, with a confidence per pixel.
//!
//! Three modes, all working on the *images* only, so that they serve any model (the
//! built-in CNNs or a user's TorchScript module) without reaching into its layers:
//! - [`SuggestMode::Union`]: every pixel that was red in some marked image is red everywhere
//!   (confidence 1). Right for confounds at fixed pixels (Decoy-MNIST's corners, a bar at the
//!   top); wrong as soon as the confound moves (it then lands on the object in other images).
//! - [`SuggestMode::Prototype`]: per-pixel colour / texture descriptors ([`pixel_features`]:
//!   the pixel, local mean and spread at two scales, chroma, edge strength), k-means
//!   prototypes of the red, green and unmarked pixels of the marked images, and a pixel's
//!   confidence for red (green) from its distances to the nearest prototype of each kind.
//! - [`SuggestMode::Segmenter`]: a small fully convolutional network (dilated 3x3 convolutions,
//!   a 15-pixel receptive field) on the same descriptors, trained few-shot on the marked
//!   images with flips and translations, softmax over {unmarked, red, green}.
//!
//! [`fit`] with [`Propagation::Auto`] picks the mode by measured fit: k-fold cross-validation
//! over the marked images (each mode fitted without the held-out images, its suggestion for
//! them compared with their own marks), the threshold of each mode calibrated on those
//! held-out suggestions, the mode with the best mean red IoU kept, and the choice reported
//! ([`FitReport`]).

use crate::data::{Dataset, Mask, GREEN, RED};
use crate::error::{CoreError, Result};
use crate::rng::Rng;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// How marks reach unmarked images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Propagation {
    /// Only the marked images are guided.
    Off,
    Union,
    Prototype,
    Segmenter,
    /// The mode with the best cross-validated fit on the marked images.
    Auto,
}

impl Propagation {
    pub const NAMES: [&'static str; 5] = ["off", "union", "prototype", "segmenter", "auto"];

    pub fn name(&self) -> &'static str {
        match self {
            Propagation::Off => "off",
            Propagation::Union => "union",
            Propagation::Prototype => "prototype",
            Propagation::Segmenter => "segmenter",
            Propagation::Auto => "auto",
        }
    }
}

impl std::str::FromStr for Propagation {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Propagation::Off),
            "union" | "on" => Ok(Propagation::Union),
            "prototype" => Ok(Propagation::Prototype),
            "segmenter" => Ok(Propagation::Segmenter),
            "auto" => Ok(Propagation::Auto),
            _ => Err(CoreError::invalid(format!(
                "unknown propagation {s:?} (off, union, prototype, segmenter, auto)"
            ))),
        }
    }
}

impl std::fmt::Display for Propagation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A concrete suggestion mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuggestMode {
    Union,
    Prototype,
    Segmenter,
}

impl SuggestMode {
    pub const ALL: [SuggestMode; 3] = [
        SuggestMode::Union,
        SuggestMode::Prototype,
        SuggestMode::Segmenter,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            SuggestMode::Union => "union",
            SuggestMode::Prototype => "prototype",
            SuggestMode::Segmenter => "segmenter",
        }
    }
}

/// Parameters of the suggesters (defaults measured in BENCHMARKS.md).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SuggestConfig {
    /// Prototypes per kind of pixel (red, green, unmarked).
    pub prototypes: usize,
    /// Training steps of the segmenter.
    pub steps: usize,
    /// Channels of the segmenter's hidden layers.
    pub hidden: i64,
    /// Images per segmenter step (sampled with replacement, augmented).
    pub batch: usize,
    pub lr: f64,
    /// Folds of the cross-validation that calibrates thresholds and picks the mode.
    pub folds: usize,
    /// Fewer marked images than this: union (nothing to cross-validate on).
    pub min_marks: usize,
    pub seed: u64,
    /// Rotate the hue of RGB training images by a random angle in the segmenter's
    /// augmentation, so that a shortcut seen in a few colours is found in others.
    #[serde(default)]
    pub hue_jitter: bool,
}

impl Default for SuggestConfig {
    fn default() -> Self {
        SuggestConfig {
            prototypes: 12,
            steps: 250,
            hidden: 16,
            batch: 16,
            lr: 1e-2,
            folds: 5,
            min_marks: 3,
            seed: 0,
            hue_jitter: false,
        }
    }
}

/// Per-pixel colour and texture descriptors of images (N, C, H, W) in [0, 1]:
/// the pixel, the local mean and standard deviation over 3x3 and 7x7 windows (per channel),
/// chroma (max − min over channels) and the Sobel edge strength of the channel mean —
/// (N, 5·C + 2, H, W). No model is involved.
pub fn pixel_features(x: &Tensor) -> Tensor {
    let _g = tch::no_grad_guard();
    let x = x.to_kind(Kind::Float);
    let mut parts = vec![x.shallow_clone()];
    for k in [3i64, 7] {
        let pool = |t: &Tensor| t.avg_pool2d([k, k], [1, 1], [k / 2, k / 2], false, false, None);
        let mean = pool(&x);
        let sd = (pool(&(&x * &x)) - &mean * &mean).clamp_min(0.0).sqrt();
        parts.push(mean);
        parts.push(sd);
    }
    parts.push(x.amax(1, true) - x.amin(1, true));
    let gray = x.mean_dim(1, true, Kind::Float);
    let sobel = Tensor::from_slice(&[-1f32, 0., 1., -2., 0., 2., -1., 0., 1.])
        .reshape([1, 1, 3, 3])
        .to_device(x.device());
    let gx = gray.conv2d(&sobel, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
    let gy = gray.conv2d(
        &sobel.transpose(2, 3),
        None::<Tensor>,
        [1, 1],
        [1, 1],
        [1, 1],
        1,
    );
    parts.push((gx.square() + gy.square()).sqrt() / 4.0);
    Tensor::cat(&parts, 1)
}

/// Red and green confidence maps (N, 1, H, W) in [0, 1] for a batch of images.
pub struct Confidence {
    pub red: Tensor,
    pub green: Tensor,
}

enum Fitted {
    Union {
        red: Tensor,
        green: Tensor,
    },
    Prototype {
        mean: Tensor,
        sd: Tensor,
        /// (P, D) prototypes of red, green and unmarked pixels.
        protos: [Tensor; 3],
        tau: f64,
    },
    Segmenter {
        mean: Tensor,
        sd: Tensor,
        _vs: nn::VarStore,
        net: nn::Sequential,
    },
}

/// What [`Suggester::to_bytes`] keeps besides the tensors.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedShape {
    mode: SuggestMode,
    red_threshold: f64,
    green_threshold: f64,
    width: usize,
    height: usize,
    channels: usize,
    /// Prototype temperature.
    tau: f64,
    /// Segmenter feature and hidden sizes.
    input: i64,
    hidden: i64,
}

/// A fitted suggester with calibrated thresholds. Owns tensors: one thread at a time.
pub struct Suggester {
    pub mode: SuggestMode,
    /// Pixels whose red (green) confidence is at least this are suggested red (green).
    pub red_threshold: f64,
    pub green_threshold: f64,
    width: usize,
    height: usize,
    channels: usize,
    fitted: Fitted,
}

/// Cross-validated fit of one mode.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModeFit {
    pub mode: SuggestMode,
    /// Mean IoU of the held-out images' suggested red with their own red marks.
    pub red_iou: f64,
    pub green_iou: f64,
    pub red_threshold: f64,
    pub green_threshold: f64,
    pub seconds: f64,
    /// The segmenter trained with random hues (RGB images), chosen over plain training by
    /// the same cross-validation.
    #[serde(default)]
    pub hue_jitter: bool,
}

impl ModeFit {
    /// "segmenter", or "segmenter (any hue)" for the hue-jittered variant.
    pub fn name(&self) -> String {
        if self.hue_jitter {
            format!("{} (any hue)", self.mode.name())
        } else {
            self.mode.name().to_string()
        }
    }
}

/// What [`fit`] measured and chose.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FitReport {
    pub requested: Propagation,
    pub chosen: SuggestMode,
    pub marks: usize,
    pub folds: usize,
    /// One entry per mode measured (empty when there was nothing to cross-validate).
    pub fits: Vec<ModeFit>,
    pub reason: String,
}

impl FitReport {
    /// e.g. "segmenter (cross-validated red IoU: union 0.12, prototype 0.71, segmenter 0.83)".
    pub fn summary(&self) -> String {
        if self.fits.is_empty() {
            return format!("{} ({})", self.chosen.name(), self.reason);
        }
        let ious: Vec<String> = self
            .fits
            .iter()
            .map(|f| format!("{} {:.2}", f.name(), f.red_iou))
            .collect();
        format!(
            "{} (cross-validated red IoU over {} marks, {} folds: {})",
            self.chosen.name(),
            self.marks,
            self.folds,
            ious.join(", ")
        )
    }
}

fn standardise(f: &Tensor, mean: &Tensor, sd: &Tensor) -> Tensor {
    (f - mean) / sd
}

/// Per-channel mean and sd of features (N, D, H, W) as (1, D, 1, 1).
fn moments(f: &Tensor) -> (Tensor, Tensor) {
    let d = f.size()[1];
    let flat = f.transpose(0, 1).reshape([d, -1]);
    let mean = flat.mean_dim(1, false, Kind::Float).reshape([1, d, 1, 1]);
    let sd = flat
        .std_dim(1, true, false)
        .clamp_min(1e-3)
        .reshape([1, d, 1, 1]);
    (mean, sd)
}

/// Pixel feature rows (M, D) of `f` (N, D, H, W) where `sel` (N, 1, H, W) is true.
fn rows(f: &Tensor, sel: &Tensor) -> Tensor {
    let d = f.size()[1];
    let flat = f.permute([0, 2, 3, 1]).reshape([-1, d]);
    let idx = sel.reshape([-1]).nonzero().squeeze_dim(1);
    flat.index_select(0, &idx)
}

fn sq_dist(a: &Tensor, b: &Tensor) -> Tensor {
    // |a|² + |b|² − 2ab, (M, P)
    (a.square().sum_dim_intlist(1, true, Kind::Float)
        + b.square()
            .sum_dim_intlist(1, false, Kind::Float)
            .unsqueeze(0)
        - a.matmul(&b.tr()) * 2.0)
        .clamp_min(0.0)
}

/// k-means++ seeded by `rng`, 15 Lloyd iterations; at most `k` centres, fewer for few points.
fn kmeans(points: &Tensor, k: usize, rng: &mut Rng) -> Tensor {
    let m = points.size()[0] as usize;
    if m <= k {
        return points.shallow_clone();
    }
    let mut chosen = vec![rng.below(m) as i64];
    let mut d2 = sq_dist(points, &points.get(chosen[0]).unsqueeze(0)).squeeze_dim(1);
    while chosen.len() < k {
        let w = Vec::<f32>::try_from(&d2).unwrap_or_default();
        let total: f64 = w.iter().map(|&v| v as f64).sum();
        let next = if total <= 0.0 {
            rng.below(m)
        } else {
            let mut r = rng.next_f64() * total;
            let mut pick = m - 1;
            for (i, &v) in w.iter().enumerate() {
                r -= v as f64;
                if r <= 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        };
        chosen.push(next as i64);
        let nd = sq_dist(points, &points.get(next as i64).unsqueeze(0)).squeeze_dim(1);
        d2 = d2.minimum(&nd);
    }
    let mut centres =
        points.index_select(0, &Tensor::from_slice(&chosen).to_device(points.device()));
    for _ in 0..15 {
        let assign = sq_dist(points, &centres).argmin(1, false);
        let onehot = assign.one_hot(k as i64).to_kind(Kind::Float); // (M, k)
        let counts = onehot.sum_dim_intlist(0, false, Kind::Float); // (k)
        let sums = onehot.tr().matmul(points); // (k, D)
        let keep = counts.gt(0.0).unsqueeze(1);
        let new = &sums / counts.clamp_min(1.0).unsqueeze(1);
        centres = new.where_self(&keep, &centres);
    }
    centres
}

/// RGB images (N, 3, H, W) in [0, 1] with their hue rotated by `angle` radians: a rotation
/// about the gray axis, which keeps every pixel's brightness (channel mean).
fn rotate_hue(x: &Tensor, angle: f64) -> Tensor {
    let (c, s) = (angle.cos(), angle.sin());
    let (a, b) = ((1.0 - c) / 3.0, s / 3f64.sqrt());
    #[rustfmt::skip]
    let m: [f32; 9] = [
        (c + a) as f32, (a - b) as f32, (a + b) as f32,
        (a + b) as f32, (c + a) as f32, (a - b) as f32,
        (a - b) as f32, (a + b) as f32, (c + a) as f32,
    ];
    let m = Tensor::from_slice(&m)
        .reshape([3, 3, 1, 1])
        .to_device(x.device());
    x.conv2d(&m, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
        .clamp(0.0, 1.0)
}

/// Random flips, transpose and a translation (zero fill) of images and their marks, the same
/// for both; with `hue`, RGB images also get a random hue.
fn augment(x: &Tensor, m: &Tensor, hue: bool, rng: &mut Rng) -> (Tensor, Tensor) {
    let (h, w) = (x.size()[2], x.size()[3]);
    let mut x = x.shallow_clone();
    if hue && x.size()[1] == 3 {
        x = rotate_hue(&x, rng.next_f64() * std::f64::consts::TAU);
    }
    let mut m = m.shallow_clone();
    if rng.coin() {
        x = x.flip([3]);
        m = m.flip([3]);
    }
    if rng.coin() {
        x = x.flip([2]);
        m = m.flip([2]);
    }
    if h == w && rng.coin() {
        x = x.transpose(2, 3);
        m = m.transpose(2, 3);
    }
    let (ph, pw) = (h / 4, w / 4);
    if ph > 0 && pw > 0 {
        let dy = rng.below(2 * ph as usize + 1) as i64;
        let dx = rng.below(2 * pw as usize + 1) as i64;
        let pad = |t: &Tensor| {
            t.constant_pad_nd([pw, pw, ph, ph])
                .narrow(2, dy, h)
                .narrow(3, dx, w)
        };
        x = pad(&x);
        m = pad(&m);
    }
    (x.contiguous(), m.contiguous())
}

fn seeded_init(vs: &nn::VarStore, rng: &mut Rng) {
    let _g = tch::no_grad_guard();
    // By name: the VarStore's map iterates in a different order in every process, and the
    // same seed must give the same segmenter.
    let vars: std::collections::BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    for (name, mut t) in vars {
        let size = t.size();
        let numel: i64 = size.iter().product();
        let vals: Vec<f32> = if name.ends_with("bias") {
            vec![0.0; numel as usize]
        } else {
            let fan_in: i64 = size[1..].iter().product::<i64>().max(1);
            let bound = (6.0 / fan_in as f64).sqrt();
            (0..numel)
                .map(|_| ((2.0 * rng.next_f64() - 1.0) * bound) as f32)
                .collect()
        };
        t.copy_(
            &Tensor::from_slice(&vals)
                .reshape(&size)
                .to_device(t.device()),
        );
    }
}

fn segmenter_net(p: &nn::Path, input: i64, hidden: i64) -> nn::Sequential {
    let conv = |name: &str, i: i64, o: i64, dil: i64| {
        nn::conv2d(
            p / name,
            i,
            o,
            3,
            nn::ConvConfig {
                padding: dil,
                dilation: dil,
                ..Default::default()
            },
        )
    };
    nn::seq()
        .add(conv("c1", input, hidden, 1))
        .add_fn(|t| t.relu())
        .add(conv("c2", hidden, hidden, 2))
        .add_fn(|t| t.relu())
        .add(conv("c3", hidden, hidden, 4))
        .add_fn(|t| t.relu())
        .add(nn::conv2d(p / "out", hidden, 3, 1, Default::default()))
}

/// Class of every pixel of marks (N, 1, H, W): 0 unmarked, 1 red, 2 green.
fn classes_of(marks: &Tensor) -> Tensor {
    marks.gt(0.0).to_kind(Kind::Int64) + marks.lt(0.0).to_kind(Kind::Int64) * 2
}

impl Suggester {
    /// Fits `mode` on the marked images `idx` of `ds` (thresholds left at 0.5; [`fit`]
    /// calibrates them).
    pub fn fit_mode(
        mode: SuggestMode,
        ds: &Dataset,
        idx: &[usize],
        cfg: &SuggestConfig,
        device: Device,
    ) -> Result<Suggester> {
        if idx.is_empty() {
            return Err(CoreError::invalid(
                "suggestions need at least one marked image",
            ));
        }
        if let Some(&i) = idx
            .iter()
            .find(|&&i| i >= ds.len() || ds.marks[i].is_none())
        {
            return Err(CoreError::invalid(format!(
                "image {i} has no mark to learn from"
            )));
        }
        let (x, _) = ds.batch(idx, device);
        let marks = ds.mark_batch(idx, device);
        let mut rng = Rng::new(cfg.seed ^ 0x5eed);
        let fitted = match mode {
            SuggestMode::Union => {
                let _g = tch::no_grad_guard();
                let red = marks.gt(0.0).to_kind(Kind::Float).amax(0, true);
                let green = marks
                    .lt(0.0)
                    .to_kind(Kind::Float)
                    .mean_dim(0, true, Kind::Float);
                Fitted::Union { red, green }
            }
            SuggestMode::Prototype => {
                let _g = tch::no_grad_guard();
                let f = pixel_features(&x);
                let (mean, sd) = moments(&f);
                let f = standardise(&f, &mean, &sd);
                let cls = classes_of(&marks);
                let protos: Vec<Tensor> = (0..3)
                    .map(|c| {
                        let mut pts = rows(&f, &cls.eq(c));
                        let n = pts.size()[0];
                        if n > 4000 {
                            let pick: Vec<i64> =
                                (0..4000).map(|_| rng.below(n as usize) as i64).collect();
                            pts = pts.index_select(0, &Tensor::from_slice(&pick).to_device(device));
                        }
                        if pts.size()[0] == 0 {
                            // No pixel of this kind: a prototype nothing is near.
                            Tensor::full([1, f.size()[1]], 1e3, (Kind::Float, device))
                        } else {
                            kmeans(&pts, cfg.prototypes.max(1), &mut rng)
                        }
                    })
                    .collect();
                // Temperature: the median distance of marked pixels to their own prototypes.
                let all = rows(&f, &cls.ge(0));
                let near = sq_dist(&all, &protos[0])
                    .amin(1, false)
                    .minimum(&sq_dist(&all, &protos[1]).amin(1, false))
                    .minimum(&sq_dist(&all, &protos[2]).amin(1, false));
                let tau = near.sqrt().median().double_value(&[]).max(1e-3);
                // `classes_of` order: unmarked, red, green.
                let [u, r, g]: [Tensor; 3] = protos
                    .try_into()
                    .map_err(|_| CoreError::invalid("prototypes"))?;
                Fitted::Prototype {
                    mean,
                    sd,
                    protos: [r, g, u],
                    tau,
                }
            }
            SuggestMode::Segmenter => {
                let f0 = pixel_features(&x);
                let (mean, sd) = moments(&f0);
                let vs = nn::VarStore::new(device);
                let net = segmenter_net(&vs.root(), f0.size()[1], cfg.hidden.max(4));
                seeded_init(&vs, &mut rng);
                let cls = classes_of(&marks);
                let counts: Vec<f64> = (0..3)
                    .map(|c| cls.eq(c).sum(Kind::Float).double_value(&[]))
                    .collect();
                let total: f64 = counts.iter().sum();
                let weights: Vec<f32> = counts
                    .iter()
                    .map(|&n| {
                        if n == 0.0 {
                            1.0
                        } else {
                            (total / (3.0 * n)).sqrt().clamp(1.0, 10.0) as f32
                        }
                    })
                    .collect();
                let weights = Tensor::from_slice(&weights).to_device(device);
                let mut opt = nn::Adam::default().build(&vs, cfg.lr)?;
                let n = idx.len();
                for _ in 0..cfg.steps {
                    let pick: Vec<i64> =
                        (0..cfg.batch.max(1)).map(|_| rng.below(n) as i64).collect();
                    let pick = Tensor::from_slice(&pick).to_device(device);
                    let (bx, bm) = augment(
                        &x.index_select(0, &pick),
                        &marks.index_select(0, &pick),
                        cfg.hue_jitter,
                        &mut rng,
                    );
                    let feats = standardise(&pixel_features(&bx), &mean, &sd);
                    let logits = net.forward(&feats);
                    let target = classes_of(&bm).squeeze_dim(1);
                    let loss = logits.log_softmax(1, Kind::Float).nll_loss_nd(
                        &target,
                        Some(&weights),
                        tch::Reduction::Mean,
                        -100,
                    );
                    opt.backward_step(&loss);
                }
                Fitted::Segmenter {
                    mean,
                    sd,
                    _vs: vs,
                    net,
                }
            }
        };
        Ok(Suggester {
            mode,
            red_threshold: 0.5,
            green_threshold: 0.5,
            width: ds.width,
            height: ds.height,
            channels: ds.channels,
            fitted,
        })
    }

    /// The fitted suggester and the report of its fit as safetensors bytes, so that one
    /// fit serves every node (the trainer fits, the workers load).
    pub fn to_bytes(&self, report: &FitReport) -> Result<Vec<u8>> {
        let mut state: Vec<(String, Tensor)> = Vec::new();
        let mut shape = SavedShape {
            mode: self.mode,
            red_threshold: self.red_threshold,
            green_threshold: self.green_threshold,
            width: self.width,
            height: self.height,
            channels: self.channels,
            tau: 0.0,
            input: 0,
            hidden: 0,
        };
        let copy = |t: &Tensor| t.shallow_clone();
        match &self.fitted {
            Fitted::Union { red, green } => {
                state.push(("red".into(), copy(red)));
                state.push(("green".into(), copy(green)));
            }
            Fitted::Prototype {
                mean,
                sd,
                protos,
                tau,
            } => {
                shape.tau = *tau;
                state.push(("mean".into(), copy(mean)));
                state.push(("sd".into(), copy(sd)));
                for (name, p) in ["red", "green", "unmarked"].iter().zip(protos) {
                    state.push((format!("proto.{name}"), copy(p)));
                }
            }
            Fitted::Segmenter { mean, sd, _vs, .. } => {
                let vars = _vs.variables();
                shape.input = vars["c1.weight"].size()[1];
                shape.hidden = vars["c1.weight"].size()[0];
                state.push(("mean".into(), copy(mean)));
                state.push(("sd".into(), copy(sd)));
                for (name, v) in vars {
                    state.push((format!("net.{name}"), v.detach()));
                }
            }
        }
        let json = |e: serde_json::Error| CoreError::invalid(e.to_string());
        let mut meta = std::collections::HashMap::new();
        meta.insert(
            "mp.suggester".to_string(),
            serde_json::to_string(&shape).map_err(json)?,
        );
        meta.insert(
            "mp.fit".to_string(),
            serde_json::to_string(report).map_err(json)?,
        );
        crate::model::serialize_state(&state, meta)
    }

    /// Reads what [`Suggester::to_bytes`] wrote, onto `device`.
    pub fn from_bytes(bytes: &[u8], device: Device) -> Result<(Suggester, FitReport)> {
        let (meta, mut t) = crate::model::deserialize_state(bytes, device)?;
        let bad = |m: String| CoreError::invalid(format!("not a saved suggester: {m}"));
        let get = |k: &str| meta.get(k).ok_or_else(|| bad(format!("no {k}")));
        let shape: SavedShape =
            serde_json::from_str(get("mp.suggester")?).map_err(|e| bad(e.to_string()))?;
        let report: FitReport =
            serde_json::from_str(get("mp.fit")?).map_err(|e| bad(e.to_string()))?;
        let mut take = |k: &str| t.remove(k).ok_or_else(|| bad(format!("no tensor {k}")));
        let fitted = match shape.mode {
            SuggestMode::Union => Fitted::Union {
                red: take("red")?,
                green: take("green")?,
            },
            SuggestMode::Prototype => Fitted::Prototype {
                mean: take("mean")?,
                sd: take("sd")?,
                protos: [
                    take("proto.red")?,
                    take("proto.green")?,
                    take("proto.unmarked")?,
                ],
                tau: shape.tau,
            },
            SuggestMode::Segmenter => {
                if shape.input <= 0 || shape.hidden <= 0 {
                    return Err(bad("segmenter without its sizes".into()));
                }
                let vs = nn::VarStore::new(device);
                let net = segmenter_net(&vs.root(), shape.input, shape.hidden);
                let _g = tch::no_grad_guard();
                for (name, mut v) in vs.variables() {
                    let saved = take(&format!("net.{name}"))?;
                    if saved.size() != v.size() {
                        return Err(bad(format!(
                            "net.{name} is {:?}, expected {:?}",
                            saved.size(),
                            v.size()
                        )));
                    }
                    v.copy_(&saved);
                }
                Fitted::Segmenter {
                    mean: take("mean")?,
                    sd: take("sd")?,
                    _vs: vs,
                    net,
                }
            }
        };
        Ok((
            Suggester {
                mode: shape.mode,
                red_threshold: shape.red_threshold,
                green_threshold: shape.green_threshold,
                width: shape.width,
                height: shape.height,
                channels: shape.channels,
                fitted,
            },
            report,
        ))
    }

    /// Red and green confidences (N, 1, H, W) for images (N, C, H, W).
    pub fn confidence(&self, x: &Tensor) -> Result<Confidence> {
        let size = x.size();
        if size.len() != 4
            || size[1] != self.channels as i64
            || size[2] != self.height as i64
            || size[3] != self.width as i64
        {
            return Err(CoreError::invalid(format!(
                "images are {size:?}, the suggester was fitted on (N, {}, {}, {})",
                self.channels, self.height, self.width
            )));
        }
        let _g = tch::no_grad_guard();
        let n = size[0];
        Ok(match &self.fitted {
            Fitted::Union { red, green } => Confidence {
                red: red
                    .to_device(x.device())
                    .expand([n, 1, size[2], size[3]], false),
                green: green
                    .to_device(x.device())
                    .expand([n, 1, size[2], size[3]], false),
            },
            Fitted::Prototype {
                mean,
                sd,
                protos,
                tau,
            } => {
                let f = standardise(&pixel_features(x), mean, sd);
                let d = f.size()[1];
                let flat = f.permute([0, 2, 3, 1]).reshape([-1, d]);
                let dist: Vec<Tensor> = protos
                    .iter()
                    .map(|p| sq_dist(&flat, p).amin(1, true).sqrt())
                    .collect();
                let p = (Tensor::cat(&dist, 1) / -*tau).softmax(1, Kind::Float);
                let shape = [n, 1, size[2], size[3]];
                Confidence {
                    red: p.select(1, 0).reshape(shape),
                    green: p.select(1, 1).reshape(shape),
                }
            }
            Fitted::Segmenter { mean, sd, net, .. } => {
                let f = standardise(&pixel_features(x), mean, sd);
                let p = net.forward(&f).softmax(1, Kind::Float);
                Confidence {
                    red: p.narrow(1, 1, 1),
                    green: p.narrow(1, 2, 1),
                }
            }
        })
    }

    /// Guidance weights (N, 1, H, W) in [−1, 1] for images: the red confidence where it
    /// reaches the red threshold, minus the green confidence where that reaches the green
    /// threshold and the pixel is not red — the marks that guided training applies to an
    /// unmarked image, weighted by confidence.
    pub fn weights(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.confidence(x)?;
        let _g = tch::no_grad_guard();
        let red_on = c.red.ge(self.red_threshold);
        let red = c.red.where_self(&red_on, &c.red.zeros_like());
        let green_on = c
            .green
            .ge(self.green_threshold)
            .logical_and(&red_on.logical_not());
        let green = c.green.where_self(&green_on, &c.green.zeros_like());
        Ok(red - green)
    }

    /// The suggested mask and its confidence (0–255 per pixel) for one image (C·H·W values).
    pub fn suggest_one(&self, image: &[f32], device: Device) -> Result<(Mask, Vec<u8>)> {
        let x = Tensor::from_slice(image)
            .reshape([
                1,
                self.channels as i64,
                self.height as i64,
                self.width as i64,
            ])
            .to_device(device);
        let w = self.weights(&x)?.flatten(0, -1).to_device(Device::Cpu);
        let w = Vec::<f32>::try_from(&w)?;
        let mask = Mask {
            width: self.width,
            height: self.height,
            values: w
                .iter()
                .map(|&v| {
                    if v > 0.0 {
                        RED
                    } else if v < 0.0 {
                        GREEN
                    } else {
                        0
                    }
                })
                .collect(),
        };
        let conf = w
            .iter()
            .map(|&v| (v.abs().clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        Ok((mask, conf))
    }
}

/// IoU of a predicted pixel set with a true one; 1 when both are empty.
pub fn iou(pred: &[bool], truth: &[bool]) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    for (&p, &t) in pred.iter().zip(truth) {
        inter += (p && t) as usize;
        union += (p || t) as usize;
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

const THRESHOLDS: [f64; 12] = [
    0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99,
];

/// Best threshold by mean IoU of `conf >= t` against `truth`, over held-out images.
fn calibrate(conf: &[Vec<f32>], truth: &[Vec<bool>]) -> (f64, f64) {
    let mut best = (f64::NEG_INFINITY, 0.5);
    for &t in &THRESHOLDS {
        let mean = conf
            .iter()
            .zip(truth)
            .map(|(c, tr)| {
                let p: Vec<bool> = c.iter().map(|&v| v as f64 >= t).collect();
                iou(&p, tr)
            })
            .sum::<f64>()
            / conf.len().max(1) as f64;
        if mean > best.0 + 1e-9 {
            best = (mean, t);
        }
    }
    best
}

/// Cross-validated fit of `mode` over `folds` folds of the marked images: each fold's images
/// get the suggestion of a suggester fitted without them; thresholds are calibrated on those
/// held-out suggestions. Of the mode's training variants ([`cross_validate_variants`]) the one
/// with the best red IoU is returned (ties to plain training).
pub fn cross_validate(
    mode: SuggestMode,
    ds: &Dataset,
    marked: &[usize],
    folds: usize,
    cfg: &SuggestConfig,
    device: Device,
) -> Result<ModeFit> {
    let fits = cross_validate_variants(mode, ds, marked, folds, cfg, device)?;
    let seconds: f64 = fits.iter().map(|f| f.seconds).sum();
    let mut best = best_fit(&fits).expect("one variant at least").clone();
    best.seconds = seconds;
    Ok(best)
}

/// One cross-validated fit per training variant of `mode`: the segmenter on RGB images is
/// trained plain and with random hues (a shortcut marked in a few colours may come in others:
/// a sticker whose hue names the class, a marker of another ink); every other mode has one.
pub fn cross_validate_variants(
    mode: SuggestMode,
    ds: &Dataset,
    marked: &[usize],
    folds: usize,
    cfg: &SuggestConfig,
    device: Device,
) -> Result<Vec<ModeFit>> {
    let hues: &[bool] = if mode == SuggestMode::Segmenter && ds.channels == 3 {
        &[false, true]
    } else {
        &[false]
    };
    hues.iter()
        .map(|&hue_jitter| {
            let cfg = SuggestConfig {
                hue_jitter,
                ..cfg.clone()
            };
            cross_validate_one(mode, ds, marked, folds, &cfg, device)
        })
        .collect()
}

fn cross_validate_one(
    mode: SuggestMode,
    ds: &Dataset,
    marked: &[usize],
    folds: usize,
    cfg: &SuggestConfig,
    device: Device,
) -> Result<ModeFit> {
    let t = std::time::Instant::now();
    let (mut red_c, mut green_c, mut red_t, mut green_t) = (vec![], vec![], vec![], vec![]);
    for f in 0..folds {
        let held: Vec<usize> = marked.iter().copied().skip(f).step_by(folds).collect();
        let fit_on: Vec<usize> = marked
            .iter()
            .enumerate()
            .filter(|(k, _)| k % folds != f)
            .map(|(_, &i)| i)
            .collect();
        let s = Suggester::fit_mode(mode, ds, &fit_on, cfg, device)?;
        let (x, _) = ds.batch(&held, device);
        let c = s.confidence(&x)?;
        let red = Vec::<f32>::try_from(&c.red.contiguous().flatten(0, -1).to_device(Device::Cpu))?;
        let green =
            Vec::<f32>::try_from(&c.green.contiguous().flatten(0, -1).to_device(Device::Cpu))?;
        let hw = ds.width * ds.height;
        for (k, &i) in held.iter().enumerate() {
            let m = ds.marks[i].as_ref().expect("marked");
            red_c.push(red[k * hw..(k + 1) * hw].to_vec());
            green_c.push(green[k * hw..(k + 1) * hw].to_vec());
            red_t.push(m.values.iter().map(|&v| v == RED).collect());
            green_t.push(m.values.iter().map(|&v| v == GREEN).collect());
        }
    }
    let (red_iou, red_threshold) = calibrate(&red_c, &red_t);
    let (green_iou, green_threshold) = calibrate(&green_c, &green_t);
    Ok(ModeFit {
        mode,
        red_iou,
        green_iou,
        red_threshold,
        green_threshold,
        seconds: t.elapsed().as_secs_f64(),
        hue_jitter: cfg.hue_jitter,
    })
}

/// The mode with the best cross-validated red IoU; ties go to the earlier (simpler) mode.
pub fn best_fit(fits: &[ModeFit]) -> Option<&ModeFit> {
    fits.iter().fold(None::<&ModeFit>, |b, f| match b {
        Some(b) if b.red_iou >= f.red_iou - 1e-9 => Some(b),
        _ => Some(f),
    })
}

/// Fits of one mode tried at most on the whole marked set, each from another seed, when a fit
/// cannot reproduce its own marks (a few-shot segmenter sometimes stalls in its first steps).
pub const MAX_FIT_ATTEMPTS: u64 = 3;

/// The seed of fit number `attempt` (from 0; the first is `seed` itself).
fn attempt_seed(seed: u64, attempt: u64) -> u64 {
    seed.wrapping_add(attempt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The suggester [`calibrated`] keeps, with what its check measured.
pub struct Calibrated {
    pub suggester: Suggester,
    /// Mean red IoU of its suggestion with the red marks it was fitted on.
    pub own_red_iou: f64,
    /// Fits it took (1 unless a fit failed the check).
    pub attempts: u64,
}

/// `s`'s suggested red (at its own thresholds) against the red marks of the images `idx`
/// that carry a mark: (mean IoU per image, pixel precision, pixel recall).
pub fn red_agreement(
    s: &Suggester,
    ds: &Dataset,
    idx: &[usize],
    device: Device,
) -> Result<(f64, f64, f64)> {
    let hw = ds.width * ds.height;
    let (mut ious, mut tp, mut fp, mut fn_) = (0f64, 0f64, 0f64, 0f64);
    let mut n = 0usize;
    for chunk in idx.chunks(256) {
        let (x, _) = ds.batch(chunk, device);
        let w = Vec::<f32>::try_from(&s.weights(&x)?.flatten(0, -1).to_device(Device::Cpu))?;
        for (k, &i) in chunk.iter().enumerate() {
            let Some(m) = &ds.marks[i] else { continue };
            let pred: Vec<bool> = w[k * hw..(k + 1) * hw].iter().map(|&v| v > 0.0).collect();
            let truth: Vec<bool> = m.values.iter().map(|&v| v == RED).collect();
            ious += iou(&pred, &truth);
            for (&p, &t) in pred.iter().zip(&truth) {
                tp += (p && t) as u8 as f64;
                fp += (p && !t) as u8 as f64;
                fn_ += (!p && t) as u8 as f64;
            }
            n += 1;
        }
    }
    Ok((
        ious / n.max(1) as f64,
        tp / (tp + fp).max(1.0),
        tp / (tp + fn_).max(1.0),
    ))
}

/// The suggester of `fit.mode` fitted on every marked image, with `fit`'s thresholds.
///
/// Checked before it is used: a sound fit reproduces the marks it was fitted on at least as
/// well as the cross-validation's folds predicted marks they never saw (`fit.red_iou`). A fit
/// below that has failed to learn — its confidences never reach the calibrated threshold, so
/// it would suggest nothing or noise — and is redone from another seed, up to
/// [`MAX_FIT_ATTEMPTS`] fits; the best by that measure is kept.
pub fn calibrated(
    fit: &ModeFit,
    ds: &Dataset,
    marked: &[usize],
    cfg: &SuggestConfig,
    device: Device,
) -> Result<Calibrated> {
    let bar = if fit.red_iou.is_finite() {
        fit.red_iou
    } else {
        0.0
    };
    // The union has no seed: a second fit would be the same.
    let attempts = if fit.mode == SuggestMode::Union {
        1
    } else {
        MAX_FIT_ATTEMPTS
    };
    let mut best: Option<(f64, Suggester)> = None;
    let mut tried = 0;
    for a in 0..attempts {
        tried = a + 1;
        let cfg_a = SuggestConfig {
            seed: attempt_seed(cfg.seed, a),
            hue_jitter: fit.hue_jitter,
            ..cfg.clone()
        };
        let mut s = Suggester::fit_mode(fit.mode, ds, marked, &cfg_a, device)?;
        s.red_threshold = fit.red_threshold;
        s.green_threshold = fit.green_threshold;
        let own = red_agreement(&s, ds, marked, device)?.0;
        let reached = own + 1e-9 >= bar;
        if best.as_ref().is_none_or(|(b, _)| own > *b) {
            best = Some((own, s));
        }
        if reached {
            break;
        }
    }
    let (own_red_iou, suggester) = best.expect("at least one attempt");
    Ok(Calibrated {
        suggester,
        own_red_iou,
        attempts: tried,
    })
}

/// Fits the suggester `propagation` asks for on the marked images `marked` of `ds`, with
/// thresholds calibrated by cross-validation; `None` for [`Propagation::Off`].
pub fn fit(
    propagation: Propagation,
    ds: &Dataset,
    marked: &[usize],
    cfg: &SuggestConfig,
    device: Device,
) -> Result<Option<(Suggester, FitReport)>> {
    let modes: Vec<SuggestMode> = match propagation {
        Propagation::Off => return Ok(None),
        Propagation::Union => vec![SuggestMode::Union],
        Propagation::Prototype => vec![SuggestMode::Prototype],
        Propagation::Segmenter => vec![SuggestMode::Segmenter],
        Propagation::Auto => SuggestMode::ALL.to_vec(),
    };
    if marked.is_empty() {
        return Ok(None);
    }
    let folds = cfg.folds.min(marked.len());
    if marked.len() < cfg.min_marks.max(2) || folds < 2 {
        // Too few marks to measure anything: the first mode asked for (union under auto),
        // uncalibrated.
        let mode = modes[0];
        let s = Suggester::fit_mode(mode, ds, marked, cfg, device)?;
        let report = FitReport {
            requested: propagation,
            chosen: mode,
            marks: marked.len(),
            folds: 0,
            fits: vec![],
            reason: format!("{} marks: too few to cross-validate", marked.len()),
        };
        return Ok(Some((s, report)));
    }
    let mut fits = Vec::new();
    for &m in &modes {
        fits.push(cross_validate(m, ds, marked, folds, cfg, device)?);
    }
    let best = best_fit(&fits).expect("at least one mode").clone();
    let c = calibrated(&best, ds, marked, cfg, device)?;
    let mut reason = format!("best cross-validated red IoU {:.2}", best.red_iou);
    if c.attempts > 1 {
        reason.push_str(&format!(
            "; fitted {} times to reproduce its own marks (red IoU {:.2} on them)",
            c.attempts, c.own_red_iou
        ));
    }
    let report = FitReport {
        requested: propagation,
        chosen: best.mode,
        marks: marked.len(),
        folds,
        reason,
        fits,
    };
    Ok(Some((c.suggester, report)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16x16 images: a thin noisy stroke (green) and a flat 3x3 square (red), the square at a
    /// random place (`moving`) or always in the top-left corner.
    fn squares(n: usize, moving: bool, seed: u64) -> Dataset {
        let side = 16;
        let mut ds = Dataset::new(vec!["a".into(), "b".into()], 1, side, side);
        let mut rng = Rng::new(seed);
        for i in 0..n {
            let mut img: Vec<f32> = (0..side * side)
                .map(|_| 0.1 * rng.next_f64() as f32)
                .collect();
            let mut m = Mask::empty(side, side);
            let row = 8 + rng.below(6);
            for c in 4..12 {
                img[row * side + c] = 0.5 + 0.5 * rng.next_f64() as f32;
                m.values[row * side + c] = GREEN;
            }
            let (r0, c0) = if moving {
                (rng.below(5), rng.below(side - 3))
            } else {
                (0, 0)
            };
            let shade = 0.4 + 0.6 * rng.next_f64() as f32;
            for r in r0..r0 + 3 {
                for c in c0..c0 + 3 {
                    img[r * side + c] = shade;
                    m.values[r * side + c] = RED;
                }
            }
            ds.push(&img, (i % 2) as i64, Some(m), format!("s{i}"));
        }
        ds
    }

    fn true_iou(s: &Suggester, ds: &Dataset, idx: &[usize]) -> f64 {
        red_agreement(s, ds, idx, Device::Cpu).unwrap().0
    }

    #[test]
    fn every_mode_comes_back_from_its_bytes_and_suggests_the_same() {
        let ds = squares(20, true, 5);
        let marked: Vec<usize> = (0..6).collect();
        let cfg = SuggestConfig {
            steps: 20,
            ..Default::default()
        };
        let (x, _) = ds.batch(&(6..20).collect::<Vec<_>>(), Device::Cpu);
        for mode in SuggestMode::ALL {
            let mut s = Suggester::fit_mode(mode, &ds, &marked, &cfg, Device::Cpu).unwrap();
            s.red_threshold = 0.37;
            let report = FitReport {
                requested: Propagation::Auto,
                chosen: mode,
                marks: marked.len(),
                folds: 0,
                fits: vec![],
                reason: "test".into(),
            };
            let bytes = s.to_bytes(&report).unwrap();
            let (back, r) = Suggester::from_bytes(&bytes, Device::Cpu).unwrap();
            assert_eq!((back.mode, back.red_threshold), (mode, 0.37));
            assert_eq!((r.chosen, r.marks), (mode, 6));
            let diff = (s.weights(&x).unwrap() - back.weights(&x).unwrap())
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-6, "{}: weights differ by {diff}", mode.name());
        }
        let e = Suggester::from_bytes(b"junk", Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("not safetensors"), "{e}");
    }

    #[test]
    fn iou_by_hand() {
        assert_eq!(iou(&[true, true, false], &[true, false, false]), 0.5);
        assert_eq!(iou(&[false, false], &[false, false]), 1.0);
        assert_eq!(iou(&[true, false], &[false, true]), 0.0);
    }

    /// 16x16 RGB images: a gray noisy background and a 3x3 square whose hue names the class
    /// (`hues` classes), at a random place; the square is marked red.
    fn hued_squares(n: usize, hues: usize, seed: u64) -> Dataset {
        let side = 16;
        let classes = (0..hues).map(|c| format!("c{c}")).collect();
        let mut ds = Dataset::new(classes, 3, side, side);
        let red = Tensor::from_slice(&[1f32, 0.1, 0.1]).reshape([1, 3, 1, 1]);
        let colours: Vec<Vec<f32>> = (0..hues)
            .map(|h| {
                let angle = std::f64::consts::TAU * h as f64 / hues as f64;
                Vec::<f32>::try_from(&rotate_hue(&red, angle).flatten(0, -1)).unwrap()
            })
            .collect();
        let mut rng = Rng::new(seed);
        for i in 0..n {
            let label = i % hues;
            let rgb = &colours[label];
            let mut img: Vec<f32> = vec![0.0; 3 * side * side];
            for p in 0..side * side {
                let g = 0.3 + 0.2 * rng.next_f64() as f32;
                for c in 0..3 {
                    img[c * side * side + p] = g;
                }
            }
            let mut m = Mask::empty(side, side);
            let (r0, c0) = (rng.below(side - 3), rng.below(side - 3));
            for r in r0..r0 + 3 {
                for c in c0..c0 + 3 {
                    for (ch, v) in rgb.iter().enumerate() {
                        img[ch * side * side + r * side + c] = *v;
                    }
                    m.values[r * side + c] = RED;
                }
            }
            ds.push(&img, label as i64, Some(m), format!("h{i}"));
        }
        ds
    }

    #[test]
    fn a_hue_rotation_keeps_brightness_and_a_third_of_a_turn_permutes_the_channels() {
        let x = Tensor::from_slice(&[0.9f32, 0.2, 0.1]).reshape([1, 3, 1, 1]);
        let same = rotate_hue(&x, 0.0);
        assert!(f64::try_from((&same - &x).abs().max()).unwrap() < 1e-6);
        let turned =
            Vec::<f32>::try_from(&rotate_hue(&x, std::f64::consts::TAU / 3.0).flatten(0, -1))
                .unwrap();
        // A third of a turn about the gray axis sends red to green, green to blue, blue to red.
        for (got, want) in turned.iter().zip([0.1f32, 0.9, 0.2]) {
            assert!((got - want).abs() < 1e-5, "{turned:?}");
        }
        let x = Tensor::from_slice(&[0.6f32, 0.4, 0.2]).reshape([1, 3, 1, 1]);
        let m = rotate_hue(&x, 1.0).mean(Kind::Float).double_value(&[]);
        assert!((m - 0.4).abs() < 1e-5);
    }

    #[test]
    fn a_segmenter_trained_on_any_hue_finds_a_square_in_colours_it_was_never_shown() {
        // Six classes, six hues; the marks show only the squares of classes 0 and 1.
        let ds = hued_squares(72, 6, 2);
        let marked: Vec<usize> = (0..72).filter(|i| i % 6 < 2).take(10).collect();
        let unseen: Vec<usize> = (0..72).filter(|i| i % 6 >= 3).collect();
        let cfg = SuggestConfig::default();
        let fits =
            cross_validate_variants(SuggestMode::Segmenter, &ds, &marked, 5, &cfg, Device::Cpu)
                .unwrap();
        assert_eq!(
            fits.iter().map(|f| f.hue_jitter).collect::<Vec<_>>(),
            [false, true]
        );
        let unseen_iou = |f: &ModeFit| {
            let s = calibrated(f, &ds, &marked, &cfg, Device::Cpu)
                .unwrap()
                .suggester;
            true_iou(&s, &ds, &unseen)
        };
        let (plain, any) = (unseen_iou(&fits[0]), unseen_iou(&fits[1]));
        eprintln!("unseen hues: plain {plain:.3}, any hue {any:.3}");
        assert!(any > plain + 0.2, "plain {plain:.3}, any hue {any:.3}");
        // Grayscale images have no hue: one variant.
        let gray = squares(20, true, 1);
        let one = cross_validate_variants(
            SuggestMode::Segmenter,
            &gray,
            &(0..6).collect::<Vec<_>>(),
            3,
            &SuggestConfig {
                steps: 20,
                ..cfg.clone()
            },
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(one.len(), 1);
        assert!(!one[0].hue_jitter);
    }

    #[test]
    fn a_fit_that_cannot_reproduce_its_own_marks_is_redone_and_the_best_kept() {
        let ds = squares(30, true, 3);
        let marked: Vec<usize> = (0..8).collect();
        let cfg = SuggestConfig {
            steps: 60,
            ..SuggestConfig::default()
        };
        let fit_with = |mode, bar| ModeFit {
            mode,
            red_iou: bar,
            green_iou: 0.0,
            red_threshold: 0.5,
            green_threshold: 0.5,
            seconds: 0.0,
            hue_jitter: false,
        };
        // A bar no fit reaches: every attempt is made and the best of them kept.
        let c = calibrated(
            &fit_with(SuggestMode::Segmenter, 1.5),
            &ds,
            &marked,
            &cfg,
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(c.attempts, MAX_FIT_ATTEMPTS);
        let each: Vec<f64> = (0..MAX_FIT_ATTEMPTS)
            .map(|a| {
                let cfg_a = SuggestConfig {
                    seed: attempt_seed(cfg.seed, a),
                    ..cfg.clone()
                };
                let s =
                    Suggester::fit_mode(SuggestMode::Segmenter, &ds, &marked, &cfg_a, Device::Cpu)
                        .unwrap();
                true_iou(&s, &ds, &marked)
            })
            .collect();
        let best = each.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        assert!(
            (c.own_red_iou - best).abs() < 1e-9,
            "kept {} of {each:?}",
            c.own_red_iou
        );
        assert!((true_iou(&c.suggester, &ds, &marked) - best).abs() < 1e-9);
        // A fit that reproduces its marks as well as the folds predicted is kept at once.
        let c = calibrated(
            &fit_with(SuggestMode::Segmenter, each[0] - 0.01),
            &ds,
            &marked,
            &cfg,
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(c.attempts, 1);
        // The union has no seed to change: one fit whatever the bar.
        let c = calibrated(
            &fit_with(SuggestMode::Union, 1.5),
            &ds,
            &marked,
            &cfg,
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(c.attempts, 1);
    }

    #[test]
    fn learned_modes_find_a_moving_square_that_the_union_misses() {
        let ds = squares(60, true, 1);
        let marked: Vec<usize> = (0..8).collect();
        let others: Vec<usize> = (8..60).collect();
        let cfg = SuggestConfig::default();
        let mut ious = Vec::new();
        for mode in SuggestMode::ALL {
            let f = cross_validate(mode, &ds, &marked, 4, &cfg, Device::Cpu).unwrap();
            let s = calibrated(&f, &ds, &marked, &cfg, Device::Cpu)
                .unwrap()
                .suggester;
            let t = true_iou(&s, &ds, &others);
            eprintln!(
                "{}: cv {:.3} true {:.3} threshold {}",
                mode.name(),
                f.red_iou,
                t,
                f.red_threshold
            );
            ious.push((mode, f.red_iou, t));
        }
        let (_, union_cv, union_true) = ious[0];
        for &(mode, cv, t) in &ious[1..] {
            assert!(t > 0.6, "{}: true IoU {t}", mode.name());
            assert!(
                t > union_true + 0.3,
                "{}: {t} vs union {union_true}",
                mode.name()
            );
            assert!(
                cv > union_cv,
                "{}: cv {cv} vs union {union_cv}",
                mode.name()
            );
        }
        let (s, report) = fit(Propagation::Auto, &ds, &marked, &cfg, Device::Cpu)
            .unwrap()
            .unwrap();
        assert_ne!(report.chosen, SuggestMode::Union, "{}", report.summary());
        assert_eq!(report.fits.len(), 3);
        assert_eq!(s.mode, report.chosen);
        // Confidences are probabilities; weights stay in [-1, 1].
        let (x, _) = ds.batch(&others, Device::Cpu);
        let c = s.confidence(&x).unwrap();
        for t in [&c.red, &c.green] {
            assert!(t.min().double_value(&[]) >= 0.0 && t.max().double_value(&[]) <= 1.0);
        }
        let w = s.weights(&x).unwrap();
        assert!(w.abs().max().double_value(&[]) <= 1.0);
        // The suggestion of one image as a mask and 0-255 confidence.
        let (mask, conf) = s.suggest_one(ds.image(9), Device::Cpu).unwrap();
        assert_eq!((mask.width, mask.height, conf.len()), (16, 16, 256));
        assert!(mask.red_count() > 0);
        for (v, c) in mask.values.iter().zip(&conf) {
            assert_eq!(*v == 0, *c == 0);
        }
    }

    #[test]
    fn auto_keeps_the_union_for_a_square_that_never_moves() {
        let ds = squares(40, false, 2);
        let marked: Vec<usize> = (0..8).collect();
        let (s, report) = fit(
            Propagation::Auto,
            &ds,
            &marked,
            &SuggestConfig::default(),
            Device::Cpu,
        )
        .unwrap()
        .unwrap();
        // A fixed square: the union is exact, and ties go to the simpler mode.
        let union = report
            .fits
            .iter()
            .find(|f| f.mode == SuggestMode::Union)
            .unwrap();
        assert!(union.red_iou > 0.99, "{}", report.summary());
        assert!(true_iou(&s, &ds, &(8..40).collect::<Vec<_>>()) > 0.9);
    }

    #[test]
    fn too_few_marks_fall_back_and_bad_input_is_refused() {
        let ds = squares(10, true, 3);
        let cfg = SuggestConfig::default();
        assert!(fit(Propagation::Off, &ds, &[0, 1], &cfg, Device::Cpu)
            .unwrap()
            .is_none());
        assert!(fit(Propagation::Auto, &ds, &[], &cfg, Device::Cpu)
            .unwrap()
            .is_none());
        let (_, r) = fit(Propagation::Auto, &ds, &[0, 1], &cfg, Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!((r.chosen, r.folds), (SuggestMode::Union, 0));
        assert!(r.reason.contains("too few"), "{}", r.reason);
        let mut unmarked = ds.clone();
        unmarked.marks[1] = None;
        assert!(Suggester::fit_mode(
            SuggestMode::Prototype,
            &unmarked,
            &[0, 1],
            &cfg,
            Device::Cpu
        )
        .is_err());
        let s = Suggester::fit_mode(SuggestMode::Prototype, &ds, &[0, 1, 2], &cfg, Device::Cpu)
            .unwrap();
        let wrong = Tensor::zeros([1, 1, 8, 8], (Kind::Float, Device::Cpu));
        let e = s.confidence(&wrong).err().unwrap();
        assert!(e.to_string().contains("fitted on"), "{e}");
        assert!("bogus".parse::<Propagation>().is_err());
        for n in Propagation::NAMES {
            assert_eq!(n.parse::<Propagation>().unwrap().name(), n);
        }
    }
}
