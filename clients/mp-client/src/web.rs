//! The client in a browser: the same [`ClientApp`] on a `<canvas>` through eframe's
//! `WebRunner`, talking gRPC-web to the gateway that served the page.
//!
//! - The server address defaults to the page's own origin (the gateway serves the bundle
//!   and the API on one port, so no CORS is needed); the token is typed once and kept in the
//!   origin's `localStorage`, never in the URL.
//! - Beside the canvas, `#mp-status` (an ARIA live region) says what the client shows —
//!   connection, banner, image — in words for screen readers, with the details as JSON in
//!   its `data-state` attribute ([`LiveStatus`]), which the browser tests read.

use crate::app::LiveStatus;
use crate::settings::Store;
use crate::{ClientApp, Net};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

/// The id of the page's canvas, and of the live region beside it.
const CANVAS_ID: &str = "mp-canvas";
const STATUS_ID: &str = "mp-status";

/// Called by the page's script once the module has loaded.
#[wasm_bindgen(start)]
pub fn start() {
    wasm_bindgen_futures::spawn_local(async {
        if let Err(e) = run().await {
            say_on_page(&format!("The client could not start: {e:?}"));
        }
    });
}

async fn run() -> Result<(), JsValue> {
    let window = web_sys::window().ok_or("no window")?;
    let document = window.document().ok_or("no document")?;
    let canvas = document
        .get_element_by_id(CANVAS_ID)
        .ok_or("the page has no canvas #mp-canvas")?
        .dyn_into::<web_sys::HtmlCanvasElement>()?;
    let store = Store::Browser;
    let remembered = store.load();
    let first_visit = remembered.is_none();
    let mut settings = remembered.unwrap_or_default();
    // First visit (nothing remembered) or no address: the gateway that served the page.
    if first_visit || settings.addr.is_empty() {
        settings.addr = window.location().origin().unwrap_or_default();
    }
    eframe::WebRunner::new()
        .start(
            canvas,
            eframe::WebOptions::default(),
            Box::new(move |cc| {
                let net = Net::spawn(Some(cc.egui_ctx.clone()));
                let connect_now = !settings.token.is_empty();
                let mut app = ClientApp::new(net, settings, store);
                if connect_now {
                    app.connect();
                }
                Ok(Box::new(WebShell { app, shown: None }))
            }),
        )
        .await
}

struct WebShell {
    app: ClientApp,
    /// What the live region says now (written only when it changes).
    shown: Option<LiveStatus>,
}

impl eframe::App for WebShell {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.app.ui(ui);
        let now = self.app.live_status();
        if self.shown.as_ref() != Some(&now) {
            publish(&now);
            self.shown = Some(now);
        }
    }
}

/// The page's live region.
fn status_element() -> Option<web_sys::Element> {
    web_sys::window()?.document()?.get_element_by_id(STATUS_ID)
}

/// Writes the status into the live region: words as its text, details as `data-state`.
fn publish(s: &LiveStatus) {
    let Some(el) = status_element() else {
        return;
    };
    let mut words = s.connection.clone();
    if let Some(b) = &s.banner {
        words.push_str(". ");
        words.push_str(b);
    }
    el.set_text_content(Some(&words));
    if let Ok(json) = serde_json::to_string(s) {
        let _ = el.set_attribute("data-state", &json);
    }
}

/// Puts a message on the page itself, for failures before egui can show anything.
fn say_on_page(text: &str) {
    if let Some(el) = status_element() {
        el.set_text_content(Some(text));
        let _ = el.set_attribute("class", "failed");
    }
}
