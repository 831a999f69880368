//! # Layout
//! The generated `mp.v1` types, clients and servers, and the run-length codec of marks.
//! This crate does no IO; it is the only place that knows the wire format.

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("mp.v1");
}

pub mod marks;
pub mod rle;
