//! The classifiers: the thesis's small CNN (thesis 3.1.3), a ResNet-18-style network for
//! RGB inputs, and a user's own TorchScript module ([`Arch::TorchScript`], see
//! [`crate::script`]), with save / load as safetensors carrying metadata (architecture,
//! classes, input shape, version) and [`Model::export`] back to PyTorch.

use crate::error::{CoreError, Result};
use crate::script::{self, ScriptModule};
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
    /// A user's TorchScript module, imported with its weights (`project init --model m.pt`);
    /// the module itself is named by [`ModelSpec::script`].
    TorchScript,
}

impl std::str::FromStr for Arch {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "small-cnn" => Ok(Arch::SmallCnn),
            "resnet18" => Ok(Arch::Resnet18),
            "torchscript" => Ok(Arch::TorchScript),
            _ => Err(CoreError::invalid(format!(
                "unknown architecture {s:?} (small-cnn, resnet18, torchscript)"
            ))),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::SmallCnn => "small-cnn",
            Arch::Resnet18 => "resnet18",
            Arch::TorchScript => "torchscript",
        })
    }
}

/// How an imported module's batch-norm layers behave in the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BatchNorm {
    /// The module always runs in evaluation mode: batch norm uses (and keeps) the running
    /// statistics the user trained, dropout is off. An image's saliency and its guided
    /// gradient never depend on the other images of its batch. The default.
    #[default]
    Frozen,
    /// Training mode in training steps (batch statistics, running statistics updated, dropout
    /// on), evaluation mode for predictions and saliency — PyTorch's usual fine-tuning.
    Batch,
}

impl std::str::FromStr for BatchNorm {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "frozen" => Ok(BatchNorm::Frozen),
            "batch" => Ok(BatchNorm::Batch),
            _ => Err(CoreError::invalid(format!(
                "unknown batch-norm mode {s:?} (frozen, batch)"
            ))),
        }
    }
}

/// What the engine needs to know about an imported TorchScript module.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScriptSpec {
    /// The module's stored name, `module-<hash>.pt` ([`script::module_name`]); checkpoints
    /// find it in their own directory or the one above.
    pub module: String,
    /// Per-channel normalisation applied to the [0, 1] pixels before the module
    /// (`(x - mean) / std`); empty: none. Saliency stays on the pixels the expert sees.
    #[serde(default)]
    pub mean: Vec<f32>,
    #[serde(default)]
    pub std: Vec<f32>,
    #[serde(default)]
    pub batch_norm: BatchNorm,
}

/// What a checkpoint says about its model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub classes: Vec<String>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Model version in the project's history (0 = freshly initialised).
    pub version: u64,
    /// The imported module, for [`Arch::TorchScript`] (None for the built-in architectures).
    #[serde(default)]
    pub script: Option<ScriptSpec>,
}

impl ModelSpec {
    /// Version 1 of a built-in architecture for `ds`'s classes and image size.
    pub fn for_dataset(arch: Arch, ds: &crate::data::Dataset) -> ModelSpec {
        ModelSpec {
            arch,
            classes: ds.classes.clone(),
            channels: ds.channels,
            height: ds.height,
            width: ds.width,
            version: 1,
            script: None,
        }
    }

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
        match (&self.script, self.arch) {
            (None, Arch::TorchScript) => {
                return Err(CoreError::invalid("a TorchScript model needs its module"))
            }
            (Some(_), Arch::SmallCnn | Arch::Resnet18) => {
                return Err(CoreError::invalid(format!(
                    "{} is built in; only TorchScript models name a module",
                    self.arch
                )))
            }
            (Some(s), Arch::TorchScript) => {
                let c = self.channels;
                if s.mean.len() != s.std.len() || !(s.mean.is_empty() || s.mean.len() == c) {
                    return Err(CoreError::invalid(format!(
                        "normalisation has {} means and {} stds for {c} channels",
                        s.mean.len(),
                        s.std.len()
                    )));
                }
                if s.std.iter().any(|&v| !(v.is_finite() && v > 0.0))
                    || s.mean.iter().any(|v| !v.is_finite())
                {
                    return Err(CoreError::invalid(
                        "normalisation needs finite means and positive stds",
                    ));
                }
            }
            (None, _) => {}
        }
        Ok(())
    }
}

/// A user's module with its state: every parameter (registered in the model's `VarStore`,
/// so the engine's optimisers train it) and every buffer, by their PyTorch names.
struct ScriptNet {
    module: ScriptModule,
    /// (dotted name, tensor sharing storage with the module): parameters, then buffers —
    /// what `state_dict()` holds.
    state: Vec<(String, Tensor)>,
    /// (mean, std) shaped [1, C, 1, 1].
    norm: Option<(Tensor, Tensor)>,
    batch_norm: BatchNorm,
}

impl std::fmt::Debug for ScriptNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptNet")
            .field("tensors", &self.state.len())
            .finish()
    }
}

impl ScriptNet {
    fn new(p: &nn::Path, spec: &ScriptSpec, dirs: &[&Path]) -> Result<ScriptNet> {
        let bytes = script::module_bytes(&spec.module, dirs)?;
        let module = ScriptModule::from_bytes(&bytes, p.device())?;
        module.set_train(false);
        let mut state = Vec::new();
        for (name, t) in module.named_parameters()? {
            let trainable = t.requires_grad();
            let _ = p.add(&name.replace('.', "_"), t.shallow_clone(), trainable);
            state.push((name, t));
        }
        state.extend(module.named_buffers()?);
        let norm = (!spec.mean.is_empty()).then(|| {
            let shape = [1, spec.mean.len() as i64, 1, 1];
            let t = |v: &[f32]| Tensor::from_slice(v).reshape(shape).to_device(p.device());
            (t(&spec.mean), t(&spec.std))
        });
        Ok(ScriptNet {
            module,
            state,
            norm,
            batch_norm: spec.batch_norm,
        })
    }

    /// Normalisation, then the module.
    fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if self.batch_norm == BatchNorm::Batch {
            self.module.set_train(train);
        }
        let x = match &self.norm {
            Some((m, s)) => (xs - m) / s,
            None => xs.shallow_clone(),
        };
        self.module.forward(&x)
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // The module passed a dry forward at import; what fails here is a broken invariant.
        self.f_forward_t(xs, train)
            .unwrap_or_else(|e| panic!("imported module: {e}"))
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
    Script(Box<ScriptNet>),
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
    /// A freshly initialised model on `device`; for [`Arch::TorchScript`] the imported module
    /// with the weights it was saved with (its module must be registered, see [`script`]).
    pub fn new(spec: ModelSpec, device: Device) -> Result<Model> {
        Model::build(spec, device, &[])
    }

    /// [`Model::new`], looking for an unregistered module in `dirs`.
    fn build(spec: ModelSpec, device: Device, dirs: &[&Path]) -> Result<Model> {
        spec.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let net = match (spec.arch, &spec.script) {
            (Arch::SmallCnn, _) => Net::Small(Box::new(SmallCnn::new(&root, &spec))),
            (Arch::Resnet18, _) => Net::Res(Box::new(ResNet18::new(&root, &spec))),
            (Arch::TorchScript, Some(s)) => Net::Script(Box::new(ScriptNet::new(&root, s, dirs)?)),
            (Arch::TorchScript, None) => {
                unreachable!("validated: a TorchScript spec names its module")
            }
        };
        Ok(Model { spec, vs, net })
    }

    /// Imports a TorchScript module: registers its bytes, loads it on `device` and checks it
    /// with a dry forward of a batch of 2 at the spec's input size. Refuses (naming what is
    /// wrong) a file that is not TorchScript, a module that fails on that input, and an
    /// output that is not `[2, classes]`.
    pub fn import(module: Vec<u8>, mut spec: ModelSpec, device: Device) -> Result<Model> {
        // Load first: garbage must not enter the registry.
        ScriptModule::from_bytes(&module, Device::Cpu)?;
        let name = script::register(module);
        spec.arch = Arch::TorchScript;
        match &mut spec.script {
            Some(s) => s.module = name,
            None => {
                spec.script = Some(ScriptSpec {
                    module: name,
                    mean: vec![],
                    std: vec![],
                    batch_norm: BatchNorm::Frozen,
                })
            }
        }
        let model = Model::new(spec, device)?;
        let (c, h, w) = (
            model.spec.channels as i64,
            model.spec.height as i64,
            model.spec.width as i64,
        );
        let x = Tensor::rand([2, c, h, w], (Kind::Float, device));
        let Net::Script(net) = &model.net else {
            unreachable!("an imported model is a script net")
        };
        let out = tch::no_grad(|| net.f_forward_t(&x, false)).map_err(|e| {
            CoreError::invalid(format!(
                "the module does not accept a [2, {c}, {h}, {w}] input (channels, height, width from the project config): {e}"
            ))
        })?;
        let want = [2, model.spec.num_classes()];
        if out.size() != want {
            return Err(CoreError::invalid(format!(
                "the module's output is {:?} for a batch of 2; expected [2, {}] (one logit per class, {} classes in the project config)",
                out.size(),
                want[1],
                want[1]
            )));
        }
        if out.kind() != Kind::Float && out.kind() != Kind::Double {
            return Err(CoreError::invalid(format!(
                "the module's output is {:?}; expected floating-point logits",
                out.kind()
            )));
        }
        Ok(model)
    }

    /// (submodule, type) of an imported module's layers (empty for built-in architectures).
    pub fn layer_kinds(&self) -> Result<Vec<(String, String)>> {
        match &self.net {
            Net::Script(n) => n.module.kinds(),
            _ => Ok(vec![]),
        }
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
            Net::Script(n) => n.forward_t(xs, train),
        }
    }

    /// Every tensor a checkpoint holds, by name: the built-in architectures' variables
    /// (sorted), an imported module's parameters and buffers under their PyTorch names.
    fn state(&self) -> Vec<(String, Tensor)> {
        match &self.net {
            Net::Script(n) => n
                .state
                .iter()
                .map(|(k, t)| (k.clone(), t.shallow_clone()))
                .collect(),
            _ => self
                .vs
                .variables()
                .into_iter()
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect(),
        }
    }

    /// A second model with the same spec and a copy of the weights.
    pub fn try_clone(&self) -> Result<Model> {
        let mut m = Model::new(self.spec.clone(), self.device())?;
        m.vs.copy(&self.vs)?;
        Ok(m)
    }

    /// Overwrites this model's weights (and an imported module's buffers) with `other`'s
    /// (same architecture).
    pub fn copy_weights_from(&mut self, other: &Model) -> Result<()> {
        if other.spec.arch != self.spec.arch || other.spec.script != self.spec.script {
            return Err(CoreError::invalid(
                "cannot copy weights across architectures",
            ));
        }
        match (&self.net, &other.net) {
            (Net::Script(a), Net::Script(b)) => tch::no_grad(|| -> Result<()> {
                for ((na, ta), (nb, tb)) in a.state.iter().zip(&b.state) {
                    if na != nb {
                        return Err(CoreError::invalid(format!(
                            "module state differs at {na} / {nb}"
                        )));
                    }
                    ta.shallow_clone().f_copy_(&tb.f_to_device(ta.device())?)?;
                }
                Ok(())
            })?,
            _ => self.vs.copy(&other.vs)?,
        }
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
        if let Some(s) = &self.spec.script {
            m.insert(
                "mp.script".into(),
                serde_json::to_string(s).unwrap_or_default(),
            );
        }
        m
    }

    /// The weights and metadata as safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        serialize_state(&self.state(), self.metadata())
    }

    /// Takes the model back to PyTorch: writes `state_dict.safetensors` into `dir` (the
    /// tensors under the names `load_state_dict(strict=True)` expects, in their own dtypes)
    /// and, for an imported module, `model.pt` (the module with the current weights, for
    /// `torch.jit.load`; it expects the normalised input the user's own pipeline gives it).
    /// Returns the files written.
    pub fn export(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("mp.version".to_string(), self.spec.version.to_string());
        meta.insert(
            "mp.classes".into(),
            serde_json::to_string(&self.spec.classes).unwrap_or_default(),
        );
        let st = dir.join("state_dict.safetensors");
        crate::durable::write_durable(&st, &serialize_state(&self.state(), meta)?)?;
        let mut out = vec![st];
        if let Net::Script(n) = &self.net {
            let pt = dir.join("model.pt");
            let tmp = dir.join("model.pt.tmp");
            n.module.save(&tmp)?;
            std::fs::rename(&tmp, &pt).map_err(|e| CoreError::io(&pt, e))?;
            out.push(pt);
        }
        Ok(out)
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
        let script = meta
            .get("mp.script")
            .map(|s| serde_json::from_str::<ScriptSpec>(s))
            .transpose()
            .map_err(|e| bad(format!("mp.script: {e}")))?;
        let spec = ModelSpec {
            arch,
            classes,
            channels,
            height,
            width,
            version,
            script,
        };
        // An imported module lives next to the checkpoints (or one directory up, for
        // proposals).
        let dirs: Vec<&Path> = origin.ancestors().skip(1).take(2).collect();
        let model = Model::build(spec, device, &dirs).map_err(|e| bad(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let mut vars: HashMap<String, Tensor> = model.state().into_iter().collect();
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
            let kind = kind_of(view.dtype());
            if kind.is_none() || shape != var.size() {
                return Err(bad(format!(
                    "tensor {name}: {:?} {:?}, expected {:?} {:?}",
                    view.dtype(),
                    shape,
                    var.kind(),
                    var.size()
                )));
            }
            let src = Tensor::f_from_data_size(view.data(), &shape, kind.expect("checked"))?;
            tch::no_grad(|| var.f_copy_(&src))?;
        }
        Ok(model)
    }

    /// Saves as `.safetensors` with metadata. An imported model's module is written next to
    /// it (once: the file is named by its content).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        if let Some(s) = &self.spec.script {
            let dir = path.parent().unwrap_or(Path::new("."));
            let file = dir.join(&s.module);
            if !file.is_file() {
                let module = script::module_bytes(&s.module, &[])?;
                crate::durable::write_durable(&file, &module)?;
            }
        }
        crate::durable::write_durable(path, &bytes)
    }

    pub fn load(path: &Path, device: Device) -> Result<Model> {
        let bytes = std::fs::read(path).map_err(|e| CoreError::io(path, e))?;
        Model::from_bytes(&bytes, device, path)
    }
}

fn dtype_of(kind: Kind) -> Option<(Dtype, usize)> {
    Some(match kind {
        Kind::Float => (Dtype::F32, 4),
        Kind::Double => (Dtype::F64, 8),
        Kind::Half => (Dtype::F16, 2),
        Kind::BFloat16 => (Dtype::BF16, 2),
        Kind::Int64 => (Dtype::I64, 8),
        Kind::Int => (Dtype::I32, 4),
        Kind::Int16 => (Dtype::I16, 2),
        Kind::Int8 => (Dtype::I8, 1),
        Kind::Uint8 => (Dtype::U8, 1),
        Kind::Bool => (Dtype::BOOL, 1),
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Named tensors (each in its own dtype) and metadata as safetensors bytes.
pub(crate) fn serialize_state(
    state: &[(String, Tensor)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(state.len());
    for (name, t) in state {
        let (dtype, size) = dtype_of(t.kind()).ok_or_else(|| {
            CoreError::invalid(format!("tensor {name}: dtype {:?} not supported", t.kind()))
        })?;
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * size];
        t.f_copy_data_u8(&mut bytes, numel)?;
        data.push((name.clone(), dtype, shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| CoreError::invalid(format!("safetensors view {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, Some(meta))
        .map_err(|e| CoreError::invalid(format!("safetensors: {e}")))
}

/// The named tensors (on `device`) and the metadata of safetensors bytes.
pub(crate) fn deserialize_state(
    bytes: &[u8],
    device: Device,
) -> Result<(HashMap<String, String>, HashMap<String, Tensor>)> {
    let bad = |e: String| CoreError::invalid(format!("not safetensors: {e}"));
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| bad(format!("tensor {name}: dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?.f_to_device(device)?;
        out.insert(name, t);
    }
    Ok((meta, out))
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
            script: None,
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
