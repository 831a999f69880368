//! The classifiers: the thesis's small CNN (thesis 3.1.3) and a ResNet-18-style network for
//! RGB inputs, with save / load as safetensors carrying metadata (architecture, classes,
//! input shape, version).

use crate::error::{CoreError, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

/// Format of the metadata written into checkpoints; bump on incompatible change.
pub const CHECKPOINT_FORMAT: &str = "1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// conv32-pool-conv64-pool-fc128-fc(classes), ReLU (thesis 3.1.3).
    SmallCnn,
    /// ResNet-18 layout (2-2-2-2 basic blocks, 64..512 channels, batch norm); a 3x3 stem for
    /// inputs up to 64 pixels, the ImageNet 7x7/2 stem with max-pool above.
    Resnet18,
}

impl std::str::FromStr for Arch {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "small-cnn" => Ok(Arch::SmallCnn),
            "resnet18" => Ok(Arch::Resnet18),
            _ => Err(CoreError::invalid(format!(
                "unknown architecture {s:?} (small-cnn, resnet18)"
            ))),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::SmallCnn => "small-cnn",
            Arch::Resnet18 => "resnet18",
        })
    }
}

/// What a checkpoint says about its model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub classes: Vec<String>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Model version in the project's history (0 = freshly initialised).
    pub version: u64,
}

impl ModelSpec {
    pub fn num_classes(&self) -> i64 {
        self.classes.len() as i64
    }

    fn validate(&self) -> Result<()> {
        if self.classes.len() < 2 {
            return Err(CoreError::invalid("a model needs at least 2 classes"));
        }
        if !(self.channels == 1 || self.channels == 3) {
            return Err(CoreError::invalid(format!(
                "{} input channels; 1 or 3 supported",
                self.channels
            )));
        }
        if self.height < 4 || self.width < 4 || self.height > 4096 || self.width > 4096 {
            return Err(CoreError::invalid(format!(
                "input {}x{} outside 4..4096",
                self.width, self.height
            )));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct SmallCnn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl SmallCnn {
    fn new(p: &nn::Path, spec: &ModelSpec) -> Self {
        let pad = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let flat = 64 * (spec.height as i64 / 4) * (spec.width as i64 / 4);
        SmallCnn {
            conv1: nn::conv2d(p / "conv1", spec.channels as i64, 32, 3, pad),
            conv2: nn::conv2d(p / "conv2", 32, 64, 3, pad),
            fc1: nn::linear(p / "fc1", flat, 128, Default::default()),
            fc2: nn::linear(p / "fc2", 128, spec.num_classes(), Default::default()),
        }
    }
}

impl ModuleT for SmallCnn {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        xs.apply(&self.conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .flatten(1, -1)
            .apply(&self.fc1)
            .relu()
            .apply(&self.fc2)
    }
}

#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    down: Option<(nn::Conv2D, nn::BatchNorm)>,
}

fn conv(p: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let c = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(p, i, o, k, c)
}

impl BasicBlock {
    fn new(p: &nn::Path, i: i64, o: i64, stride: i64) -> Self {
        let down = (stride != 1 || i != o).then(|| {
            (
                conv(p / "down_conv", i, o, 1, stride, 0),
                nn::batch_norm2d(p / "down_bn", o, Default::default()),
            )
        });
        BasicBlock {
            conv1: conv(p / "conv1", i, o, 3, stride, 1),
            bn1: nn::batch_norm2d(p / "bn1", o, Default::default()),
            conv2: conv(p / "conv2", o, o, 3, 1, 1),
            bn2: nn::batch_norm2d(p / "bn2", o, Default::default()),
            down,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = xs
            .apply(&self.conv1)
            .apply_t(&self.bn1, train)
            .relu()
            .apply(&self.conv2)
            .apply_t(&self.bn2, train);
        let skip = match &self.down {
            Some((c, bn)) => xs.apply(c).apply_t(bn, train),
            None => xs.shallow_clone(),
        };
        (ys + skip).relu()
    }
}

#[derive(Debug)]
struct ResNet18 {
    stem: nn::Conv2D,
    stem_bn: nn::BatchNorm,
    stem_pool: bool,
    blocks: Vec<BasicBlock>,
    fc: nn::Linear,
}

impl ResNet18 {
    fn new(p: &nn::Path, spec: &ModelSpec) -> Self {
        let small = spec.height.min(spec.width) <= 64;
        let stem = if small {
            conv(p / "stem", spec.channels as i64, 64, 3, 1, 1)
        } else {
            conv(p / "stem", spec.channels as i64, 64, 7, 2, 3)
        };
        let mut blocks = Vec::new();
        let mut i = 64;
        for (layer, &o) in [64i64, 128, 256, 512].iter().enumerate() {
            for b in 0..2 {
                let stride = if layer > 0 && b == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(
                    &(p / format!("layer{}_{b}", layer + 1)),
                    i,
                    o,
                    stride,
                ));
                i = o;
            }
        }
        ResNet18 {
            stem,
            stem_bn: nn::batch_norm2d(p / "stem_bn", 64, Default::default()),
            stem_pool: !small,
            blocks,
            fc: nn::linear(p / "fc", 512, spec.num_classes(), Default::default()),
        }
    }
}

impl ModuleT for ResNet18 {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut h = xs.apply(&self.stem).apply_t(&self.stem_bn, train).relu();
        if self.stem_pool {
            h = h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for b in &self.blocks {
            h = b.forward_t(&h, train);
        }
        h.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.fc)
    }
}

#[derive(Debug)]
enum Net {
    Small(Box<SmallCnn>),
    Res(Box<ResNet18>),
}

/// A classifier and its variables. Owned by one thread at a time (`Tensor` is not `Sync`).
pub struct Model {
    pub spec: ModelSpec,
    vs: nn::VarStore,
    net: Net,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("spec", &self.spec).finish()
    }
}

impl Model {
    /// A freshly initialised model on `device`.
    pub fn new(spec: ModelSpec, device: Device) -> Result<Model> {
        spec.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let net = match spec.arch {
            Arch::SmallCnn => Net::Small(Box::new(SmallCnn::new(&root, &spec))),
            Arch::Resnet18 => Net::Res(Box::new(ResNet18::new(&root, &spec))),
        };
        Ok(Model { spec, vs, net })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Logits (N, classes).
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match &self.net {
            Net::Small(n) => n.forward_t(xs, train),
            Net::Res(n) => n.forward_t(xs, train),
        }
    }

    /// A second model with the same spec and a copy of the weights.
    pub fn try_clone(&self) -> Result<Model> {
        let mut m = Model::new(self.spec.clone(), self.device())?;
        m.vs.copy(&self.vs)?;
        Ok(m)
    }

    /// Overwrites this model's weights with `other`'s (same architecture).
    pub fn copy_weights_from(&mut self, other: &Model) -> Result<()> {
        if other.spec.arch != self.spec.arch {
            return Err(CoreError::invalid(
                "cannot copy weights across architectures",
            ));
        }
        self.vs.copy(&other.vs)?;
        Ok(())
    }

    fn metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("mp.format".into(), CHECKPOINT_FORMAT.into());
        m.insert("mp.arch".into(), self.spec.arch.to_string());
        m.insert(
            "mp.classes".into(),
            serde_json::to_string(&self.spec.classes).unwrap_or_default(),
        );
        m.insert(
            "mp.input".into(),
            format!(
                "{}x{}x{}",
                self.spec.channels, self.spec.height, self.spec.width
            ),
        );
        m.insert("mp.version".into(), self.spec.version.to_string());
        m
    }

    /// The weights and metadata as safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let vars: BTreeMap<String, Tensor> = self.vs.variables().into_iter().collect();
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(vars.len());
        for (name, t) in &vars {
            let t = t
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Float)?
                .f_contiguous()?;
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            let numel = t.numel();
            let mut bytes = vec![0u8; numel * 4];
            t.f_copy_data_u8(&mut bytes, numel)?;
            data.push((name.clone(), shape, bytes));
        }
        let views: Vec<(String, TensorView<'_>)> = data
            .iter()
            .map(|(n, s, b)| {
                TensorView::new(Dtype::F32, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| CoreError::invalid(format!("safetensors view {n}: {e}")))
            })
            .collect::<Result<_>>()?;
        safetensors::serialize(views, Some(self.metadata()))
            .map_err(|e| CoreError::invalid(format!("safetensors: {e}")))
    }

    /// Reads a model from safetensors bytes written by [`Model::to_bytes`]; `origin` names
    /// the source in errors.
    pub fn from_bytes(bytes: &[u8], device: Device, origin: &Path) -> Result<Model> {
        let bad = |message: String| CoreError::Checkpoint {
            path: origin.to_path_buf(),
            message,
        };
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not safetensors: {e}")))?;
        let meta = header
            .metadata()
            .clone()
            .ok_or_else(|| bad("no metadata (not a Machine Punishment checkpoint)".into()))?;
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata lacks {k}")))
        };
        let format = get("mp.format")?;
        if format != CHECKPOINT_FORMAT {
            return Err(bad(format!(
                "checkpoint format {format}, this build reads {CHECKPOINT_FORMAT}"
            )));
        }
        let arch: Arch = get("mp.arch")?
            .parse()
            .map_err(|e: CoreError| bad(e.to_string()))?;
        let classes: Vec<String> = serde_json::from_str(&get("mp.classes")?)
            .map_err(|e| bad(format!("mp.classes: {e}")))?;
        let input = get("mp.input")?;
        let dims: Vec<usize> = input
            .split('x')
            .map(|d| d.parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(format!("mp.input {input:?} is not CxHxW")))?;
        let [channels, height, width] = dims[..] else {
            return Err(bad(format!("mp.input {input:?} is not CxHxW")));
        };
        let version = get("mp.version")?
            .parse::<u64>()
            .map_err(|e| bad(format!("mp.version: {e}")))?;
        let spec = ModelSpec {
            arch,
            classes,
            channels,
            height,
            width,
            version,
        };
        let model = Model::new(spec, device).map_err(|e| bad(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let mut vars = model.vs.variables();
        if st.len() != vars.len() {
            return Err(bad(format!(
                "{} tensors, the architecture has {}",
                st.len(),
                vars.len()
            )));
        }
        for (name, view) in st.tensors() {
            let var = vars
                .get_mut(&name)
                .ok_or_else(|| bad(format!("unexpected tensor {name}")))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if view.dtype() != Dtype::F32 || shape != var.size() {
                return Err(bad(format!(
                    "tensor {name}: {:?} {:?}, expected F32 {:?}",
                    view.dtype(),
                    shape,
                    var.size()
                )));
            }
            let src = Tensor::f_from_data_size(view.data(), &shape, Kind::Float)?;
            tch::no_grad(|| var.f_copy_(&src))?;
        }
        Ok(model)
    }

    /// Saves as `.safetensors` with metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        }
        let tmp = path.with_extension("safetensors.tmp");
        std::fs::write(&tmp, bytes).map_err(|e| CoreError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| CoreError::io(path, e))
    }

    pub fn load(path: &Path, device: Device) -> Result<Model> {
        let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
        Model::from_bytes(&bytes, device, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(arch: Arch, c: usize, side: usize) -> ModelSpec {
        ModelSpec {
            arch,
            classes: vec!["a".into(), "b".into(), "c".into()],
            channels: c,
            height: side,
            width: side,
            version: 7,
        }
    }

    #[test]
    fn checkpoint_round_trip_keeps_weights_outputs_and_metadata() {
        tch::manual_seed(1);
        for (arch, c, side) in [(Arch::SmallCnn, 1, 28), (Arch::Resnet18, 3, 16)] {
            let m = Model::new(spec(arch, c, side), Device::Cpu).unwrap();
            let x = Tensor::rand(
                [2, c as i64, side as i64, side as i64],
                (Kind::Float, Device::Cpu),
            );
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("m.safetensors");
            m.save(&path).unwrap();
            let back = Model::load(&path, Device::Cpu).unwrap();
            assert_eq!(back.spec, m.spec);
            let d = (m.forward_t(&x, false) - back.forward_t(&x, false))
                .abs()
                .max()
                .double_value(&[]);
            assert_eq!(d, 0.0, "{arch}");
        }
    }

    #[test]
    fn corrupt_or_foreign_checkpoints_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        std::fs::write(&p, b"garbage").unwrap();
        let e = Model::load(&p, Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("x.safetensors") && e.contains("not safetensors"),
            "{e}"
        );
        // A safetensors file without our metadata.
        let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(&[("w", &t)], &p).unwrap();
        let e = Model::load(&p, Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("metadata"), "{e}");
        let e = Model::load(&dir.path().join("missing.safetensors"), Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("missing.safetensors"), "{e}");
    }
}
