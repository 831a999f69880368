//! A small W3C WebDriver client for the web client's tests: starts `chromedriver` on a
//! free port and a headless Chromium through it, then drives the page as a person would —
//! pointer and key actions on the canvas — and reads what the page says.
//!
//! Chromium draws WebGL without a GPU through SwiftShader (`--enable-unsafe-swiftshader`).

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// WebDriver keys: Enter, Control.
pub const ENTER: &str = "\u{E007}";
pub const CONTROL: &str = "\u{E009}";

/// `name` on the PATH, if it is there.
pub fn on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The browser and its driver; both end when this is dropped.
pub struct Browser {
    driver: Child,
    http: reqwest::blocking::Client,
    base: String,
    session: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a `width`×`height` window.
    /// Panics with what to install when either is missing.
    pub fn start(width: u32, height: u32) -> Browser {
        let driver_bin = on_path("chromedriver").expect(
            "chromedriver is not installed: `deploy/mp test` installs chromium and chromium-driver",
        );
        let chromium = on_path("chromium")
            .or_else(|| on_path("chromium-browser"))
            .or_else(|| on_path("google-chrome"))
            .expect("chromium is not installed: `deploy/mp test` installs it");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        let base = format!("http://127.0.0.1:{port}");
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http
                .get(format!("{base}/status"))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == json!(true));
            if ready {
                break;
            }
            assert!(Instant::now() < until, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut b = Browser {
            driver,
            http,
            base,
            session: String::new(),
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                    "--force-device-scale-factor=1",
                    format!("--window-size={width},{height}"),
                ],
            },
        }}});
        let v = b.call("POST", "/session", caps);
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        b
    }

    /// One WebDriver command; its `value`. Panics on an error answer.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{}", self.base, path);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let v: Value = req
            .send()
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))
            .json()
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        let value = v["value"].clone();
        if let Some(err) = value.get("error") {
            panic!("WebDriver {path}: {err}: {}", value["message"]);
        }
        value
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{}", self.session, rest)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", &self.session_path("/url"), json!({ "url": url }));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            &self.session_path("/execute/sync"),
            json!({ "script": script, "args": args }),
        )
    }

    /// Types `text` as key presses to whatever has the focus (WebDriver key actions).
    pub fn keys(&self, text: &str) {
        let mut actions = Vec::new();
        for c in text.chars() {
            actions.push(json!({"type": "keyDown", "value": c.to_string()}));
            actions.push(json!({"type": "keyUp", "value": c.to_string()}));
        }
        self.perform(json!({"type": "key", "id": "keyboard", "actions": actions}));
    }

    /// Presses `keys` together (in order, released in reverse): `chord(&[CONTROL, "z"])`.
    pub fn chord(&self, keys: &[&str]) {
        let mut actions: Vec<Value> = keys
            .iter()
            .map(|k| json!({"type": "keyDown", "value": k}))
            .collect();
        actions.extend(
            keys.iter()
                .rev()
                .map(|k| json!({"type": "keyUp", "value": k})),
        );
        self.perform(json!({"type": "key", "id": "keyboard", "actions": actions}));
    }

    /// A primary-button drag through `path` (viewport CSS pixels): press at the first
    /// point, move through the others, release at the last.
    pub fn drag(&self, path: &[(i64, i64)]) {
        let mut actions = Vec::new();
        let mv = |(x, y): (i64, i64)| json!({"type": "pointerMove", "duration": 0, "origin": "viewport", "x": x, "y": y});
        actions.push(mv(path[0]));
        actions.push(json!({"type": "pointerDown", "button": 0}));
        for &p in &path[1..] {
            actions.push(mv(p));
        }
        actions.push(json!({"type": "pointerUp", "button": 0}));
        self.perform(json!({
            "type": "pointer", "id": "mouse",
            "parameters": {"pointerType": "mouse"},
            "actions": actions,
        }));
    }

    /// Runs one input source's actions, then releases whatever they left pressed.
    fn perform(&self, source: Value) {
        self.call(
            "POST",
            &self.session_path("/actions"),
            json!({ "actions": [source] }),
        );
        self.call("DELETE", &self.session_path("/actions"), Value::Null);
    }

    /// The web client's live region (`#mp-status`): its words and its `data-state` JSON;
    /// `None` until the client has written one.
    pub fn live_status(&self) -> Option<(String, Value)> {
        let v = self.execute(
            "const e = document.getElementById('mp-status');\
             return e ? [e.textContent, e.getAttribute('data-state')] : null;",
            json!([]),
        );
        let words = v.get(0)?.as_str()?.to_string();
        let state = serde_json::from_str(v.get(1)?.as_str()?).ok()?;
        Some((words, state))
    }

    /// Polls the live region until `cond` (words, state) holds; panics after `timeout` with
    /// what the page last said and [`Browser::post_mortem`].
    pub fn wait_live(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&str, &Value) -> bool,
    ) -> (String, Value) {
        let start = Instant::now();
        let mut last = None;
        loop {
            if let Some((words, state)) = self.live_status() {
                if cond(&words, &state) {
                    return (words, state);
                }
                last = Some((words, state));
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out waiting for {what}; the page said {last:?}\n{}",
                    self.post_mortem()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The browser console's messages since the last call (chromedriver's log endpoint).
    pub fn console(&self) -> Vec<String> {
        let v = self.call(
            "POST",
            &self.session_path("/se/log"),
            json!({"type": "browser"}),
        );
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| format!("{} {}", e["level"], e["message"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What a failed test needs to know: the page's body, its console, and a screenshot
    /// written to the temporary directory (its path in the text).
    pub fn post_mortem(&self) -> String {
        let body = self.execute("return document.body.outerHTML.slice(0, 2000)", json!([]));
        let shot = std::env::temp_dir().join(format!("mp-web-failure-{}.png", std::process::id()));
        let _ = std::fs::write(&shot, self.screenshot());
        format!(
            "page body: {body}\nconsole:\n  {}\nscreenshot: {}",
            self.console().join("\n  "),
            shot.display()
        )
    }

    /// The page as a PNG.
    pub fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self.call("GET", &self.session_path("/screenshot"), Value::Null);
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("screenshot is base64 text"))
            .expect("screenshot base64")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .http
                .delete(format!("{}/session/{}", self.base, self.session))
                .send();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
