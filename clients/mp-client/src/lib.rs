//! # Layout
//! - [`app`]: the client's state machine and screens (connect, mark, wait, choose).
//! - [`mask`]: marks at image resolution — brush rasterisation, undo / redo, RLE.
//! - [`net`]: the network thread: commands in, replies out, retries, repaint on reply.
//! - [`view`]: textures (image, saliency heat map, marks) and the impact-curve plot.
//! - [`settings`]: server, token and tool settings remembered between runs.
//! - [`platform`]: the little that differs between native and web (task, sleep, clock).
//! - `web` (wasm32 only): the entry point in a browser, on a canvas, over gRPC-web.
//!
//! The client speaks only the public gRPC API (through `mp-api`); it holds no model. The
//! same code builds natively and for `wasm32-unknown-unknown` (`deploy/build-web.sh`).

pub mod app;
pub mod mask;
pub mod net;
pub mod platform;
pub mod settings;
pub mod view;
#[cfg(target_arch = "wasm32")]
pub mod web;

pub use app::ClientApp;
pub use net::{Cmd, Net, NetEnd, Reply};
