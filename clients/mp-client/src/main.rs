//! `mp-client`: the annotation client (native). The same client in a browser is the
//! library's `web` module, built for `wasm32` by `deploy/build-web.sh`.
#![cfg_attr(target_arch = "wasm32", allow(unused))]

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
use clap::Parser;
#[cfg(not(target_arch = "wasm32"))]
use mp_client::settings::{self, Store};
#[cfg(not(target_arch = "wasm32"))]
use mp_client::{ClientApp, Net};
#[cfg(not(target_arch = "wasm32"))]
use std::path::PathBuf;

#[cfg(not(target_arch = "wasm32"))]
/// Mark where an image classifier should (green) and should not (red) look, then choose
/// whether the corrected model is committed.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Gateway address, e.g. http://127.0.0.1:50051 (remembered)
    #[arg(long, env = "MP_ADDR")]
    addr: Option<String>,
    /// Bearer token from `mp admin create-expert` or `mp up` (remembered)
    #[arg(long, env = "MP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the settings are remembered
    #[arg(long)]
    config: Option<PathBuf>,
    /// Connect at start with the remembered address and token
    #[arg(long)]
    connect: bool,
    /// Window size, WIDTHxHEIGHT
    #[arg(long, default_value = "1200x800")]
    size: String,
}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let store = args
        .config
        .or_else(settings::default_path)
        .map_or(Store::Nowhere, Store::File);
    let mut s = store.load().unwrap_or_default();
    let connect_now = args.connect || args.token.is_some();
    if let Some(a) = args.addr {
        s.addr = a;
    }
    if let Some(t) = args.token {
        s.token = t;
    }
    let (w, h) = args
        .size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<f32>().ok()?, h.parse::<f32>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--size must look like 1200x800"))?;
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Machine Punishment")
            .with_inner_size([w, h]),
        ..Default::default()
    };
    eframe::run_native(
        "Machine Punishment",
        options,
        Box::new(move |cc| {
            let net = Net::spawn(Some(cc.egui_ctx.clone()));
            let mut app = ClientApp::new(net, s, store);
            if connect_now && !app.settings.token.is_empty() {
                app.connect();
            }
            Ok(Box::new(Shell(app)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the window could not open: {e}"))
}

#[cfg(not(target_arch = "wasm32"))]
struct Shell(ClientApp);

#[cfg(not(target_arch = "wasm32"))]
impl eframe::App for Shell {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.0.ui(ui);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        self.0.save_settings();
        self.0.release_lease(std::time::Duration::from_millis(500));
    }
}
