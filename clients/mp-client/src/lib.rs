//! # Layout
//! - [`app`]: the client's state machine and screens (connect, mark, wait, choose).
//! - [`mask`]: marks at image resolution — brush rasterisation, undo / redo, RLE.
//! - [`net`]: the network thread: commands in, replies out, retries, repaint on reply.
//! - [`view`]: textures (image, saliency heat map, marks) and the impact-curve plot.
//! - [`settings`]: server, token and tool settings remembered between runs.
//!
//! The client speaks only the public gRPC API (through `mp-api`); it holds no model.

pub mod app;
pub mod mask;
pub mod net;
pub mod settings;
pub mod view;

pub use app::ClientApp;
pub use net::{Cmd, Net, NetEnd, Reply};
