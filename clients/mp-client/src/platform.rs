//! What differs between the native client and the web client, in one place: where the
//! network task runs, how it sleeps, and the clock. Everything else — screens, marks,
//! commands and replies — is the same code on both.
//!
//! | | native | web (`wasm32`) |
//! |---|---|---|
//! | network task | a tokio runtime on its own thread | the page's event loop (`spawn_local`) |
//! | one call | `tokio::spawn` | `spawn_local` |
//! | sleep | `tokio::time::sleep` | a `setTimeout` promise |
//! | clock | `std::time` | `performance.now()` / `Date.now()` (`web-time`) |
//! | settings | a JSON file, mode 0600 | the origin's `localStorage` ([`crate::settings`]) |

use std::future::Future;
use std::time::Duration;

/// `Instant` and `SystemTime` that also work in the browser (std's panic there).
pub use web_time::{Instant, SystemTime, UNIX_EPOCH};

/// Runs the network task for as long as the client lives.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_network(task: impl Future<Output = ()> + Send + 'static) {
    std::thread::Builder::new()
        .name("mp-client-net".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(task);
        })
        .expect("network thread");
}

/// Runs the network task for as long as the page lives.
#[cfg(target_arch = "wasm32")]
pub fn run_network(task: impl Future<Output = ()> + 'static) {
    wasm_bindgen_futures::spawn_local(task);
}

/// Runs one call beside the others (on the network task's runtime).
#[cfg(not(target_arch = "wasm32"))]
pub fn spawn(call: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(call);
}

/// Runs one call beside the others (on the page's event loop).
#[cfg(target_arch = "wasm32")]
pub fn spawn(call: impl Future<Output = ()> + 'static) {
    wasm_bindgen_futures::spawn_local(call);
}

#[cfg(not(target_arch = "wasm32"))]
pub async fn sleep(d: Duration) {
    tokio::time::sleep(d).await
}

/// Resolves after `d` through the browser's `setTimeout`.
#[cfg(target_arch = "wasm32")]
pub async fn sleep(d: Duration) {
    let ms = d.as_millis().min(i32::MAX as u128) as i32;
    let promise = js_sys::Promise::new(&mut |resolve, _reject| {
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

/// Can the UI thread block for a moment (on exit, to hear the server's answer)? Not in a
/// browser: its one thread would never see the answer.
pub const CAN_BLOCK: bool = cfg!(not(target_arch = "wasm32"));
