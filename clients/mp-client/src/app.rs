//! The client's state machine and its screens: connect, mark, wait for the refinement,
//! choose. Everything here runs on the UI thread and never waits on the network: commands
//! go to [`Net`], replies are drained at the start of every frame.

use crate::mask::{Brush, MarkLayer};
use crate::net::{Cmd, Net, Reply};
use crate::settings::Settings;
use crate::view;
use egui::{Color32, Key, Modifiers, PointerButton, Pos2, Rect, Vec2};
use mp_proto::v1 as pb;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the counters in the top bar refresh.
const STATS_EVERY: Duration = Duration::from_secs(3);
/// Largest and smallest brush radius in screen points (the thesis's slider).
pub const RADIUS_MAX: f32 = 80.0;

#[derive(Debug, Clone, PartialEq)]
pub enum Conn {
    Offline,
    Connecting,
    Up {
        addr: String,
        whoami: String,
    },
    /// Calls fail for a transient reason and are being retried; nothing is lost.
    Down {
        addr: String,
        whoami: String,
        why: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warning,
    Error,
}

/// A message for the person, shown until dismissed or replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct Banner {
    pub level: Level,
    pub text: String,
    pub since: Instant,
}

/// Information fades after this long; warnings and errors stay until dismissed.
const INFO_SHOWN_FOR: Duration = Duration::from_secs(8);

/// The image being worked on.
#[derive(Debug, Clone)]
pub struct Marking {
    pub lease: pb::Lease,
    pub view: pb::ImageView,
    pub layer: MarkLayer,
    next_heartbeat: Instant,
    heartbeat_every: Duration,
}

/// Where the expert is in the mark → refine → choose cycle.
#[derive(Debug, Clone)]
pub enum Work {
    /// Not connected, or connected and about to ask for an image.
    Idle,
    Leasing,
    Empty {
        retry_at: Instant,
    },
    Marking(Box<Marking>),
    Submitting {
        m: Box<Marking>,
        key: String,
    },
    Skipping {
        m: Box<Marking>,
    },
    Refining {
        m: Box<Marking>,
        proposal_id: String,
        since: Instant,
        last: Option<Box<pb::Proposal>>,
    },
    Choosing {
        m: Box<Marking>,
        proposal: Box<pb::Proposal>,
    },
    Deciding {
        m: Box<Marking>,
        proposal: Box<pb::Proposal>,
        commit: bool,
    },
}

/// Where the image lies on screen: its rectangle and screen points per image pixel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CanvasXf {
    pub image_rect: Rect,
    pub scale: f32,
}

impl CanvasXf {
    pub fn to_image(&self, p: Pos2) -> [f32; 2] {
        let v = (p - self.image_rect.min) / self.scale;
        [v.x, v.y]
    }

    pub fn to_screen(&self, p: [f32; 2]) -> Pos2 {
        self.image_rect.min + Vec2::new(p[0], p[1]) * self.scale
    }
}

pub struct ClientApp {
    net: Net,
    pub settings: Settings,
    settings_path: Option<PathBuf>,
    pub conn: Conn,
    pub stats: Option<pb::Stats>,
    next_stats: Instant,
    pub work: Work,
    pub brush: Brush,
    pub banner: Option<Banner>,
    /// Drawings whose lease was lost, by image id: they come back with the image.
    pub kept: HashMap<String, MarkLayer>,
    zoom: f32,
    pan: Vec2,
    /// Last image point of the stroke in progress.
    stroke: Option<[f32; 2]>,
    /// Bumped whenever the marks change, so their texture is rebuilt.
    marks_rev: u64,
    textures: view::Textures,
    /// Where the image was drawn in the last frame.
    pub canvas: Option<CanvasXf>,
    /// Overrides the heartbeat interval derived from the lease deadline (`None`: a third of
    /// the lease time). A laptop lid closed mid-image looks like a very long interval.
    pub heartbeat_override: Option<Duration>,
}

/// `SaliencyHalved` or `saliency-halved` → `saliency halved`.
fn words(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c == '-' || c == '_' {
            out.push(' ');
        } else if c.is_uppercase() {
            if i > 0 {
                out.push(' ');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ClientApp {
    pub fn new(net: Net, settings: Settings, settings_path: Option<PathBuf>) -> ClientApp {
        ClientApp {
            net,
            settings,
            settings_path,
            conn: Conn::Offline,
            stats: None,
            next_stats: Instant::now(),
            work: Work::Idle,
            brush: Brush::Red,
            banner: None,
            kept: HashMap::new(),
            zoom: 1.0,
            pan: Vec2::ZERO,
            stroke: None,
            marks_rev: 0,
            textures: view::Textures::default(),
            canvas: None,
            heartbeat_override: None,
        }
    }

    /// Remembers the address, token and tool settings.
    pub fn save_settings(&mut self) {
        if let Some(p) = &self.settings_path {
            if let Err(e) = self.settings.save(p) {
                let msg = format!("could not remember the settings in {}: {e}", p.display());
                self.say(Level::Warning, msg);
            }
        }
    }

    /// Connects with the address and token in the settings, and remembers them.
    pub fn connect(&mut self) {
        self.save_settings();
        self.conn = Conn::Connecting;
        self.net.send(Cmd::Connect {
            addr: self.settings.addr.trim().to_string(),
            token: self.settings.token.trim().to_string(),
        });
    }

    /// Gives the image back (keeping the drawing) and forgets the connection.
    pub fn disconnect(&mut self) {
        if let Work::Marking(m) = std::mem::replace(&mut self.work, Work::Idle) {
            self.net.send(Cmd::Skip {
                lease_id: m.lease.lease_id.clone(),
            });
            if !m.layer.is_empty() {
                self.kept.insert(m.lease.image_id.clone(), m.layer);
            }
        }
        self.net.send(Cmd::Disconnect);
        self.conn = Conn::Offline;
        self.stats = None;
    }

    /// On exit: gives the image being marked back to the queue (waiting up to `wait` for
    /// the server's answer), so that it does not sit leased until its deadline.
    pub fn release_lease(&mut self, wait: Duration) {
        if !matches!(self.work, Work::Marking(_)) || !self.connected() {
            return;
        }
        self.skip();
        let until = Instant::now() + wait;
        while Instant::now() < until && matches!(self.work, Work::Skipping { .. }) {
            match self.net.try_recv() {
                Some(Reply::Skipped { .. }) => return,
                Some(r) => self.on_reply(r),
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn say(&mut self, level: Level, text: impl Into<String>) {
        self.banner = Some(Banner {
            level,
            text: text.into(),
            since: Instant::now(),
        });
    }

    pub fn connected(&self) -> bool {
        matches!(self.conn, Conn::Up { .. } | Conn::Down { .. })
    }

    pub fn marking(&self) -> Option<&Marking> {
        match &self.work {
            Work::Marking(m) => Some(m),
            _ => None,
        }
    }

    /// My own number of stored marks, from the last stats.
    pub fn my_marks(&self) -> u64 {
        let me = match &self.conn {
            Conn::Up { whoami, .. } | Conn::Down { whoami, .. } => whoami,
            _ => return 0,
        };
        self.stats
            .as_ref()
            .and_then(|s| s.marks_per_expert.iter().find(|e| &e.expert_id == me))
            .map(|e| e.marks)
            .unwrap_or(0)
    }

    // ------------------------------------------------------------ replies

    fn drain(&mut self) {
        while let Some(r) = self.net.try_recv() {
            self.on_reply(r);
        }
    }

    pub fn on_reply(&mut self, r: Reply) {
        match r {
            Reply::Connected { addr, whoami } => {
                self.conn = Conn::Up { addr, whoami };
                self.banner = None;
                if matches!(self.work, Work::Idle) {
                    self.lease();
                }
            }
            Reply::ConnectFailed(why) => {
                self.conn = Conn::Offline;
                self.say(Level::Error, format!("Could not connect: {why}"));
            }
            Reply::Connection { up, why } => {
                self.conn = match std::mem::replace(&mut self.conn, Conn::Offline) {
                    Conn::Up { addr, whoami } | Conn::Down { addr, whoami, .. } => {
                        if up {
                            Conn::Up { addr, whoami }
                        } else {
                            Conn::Down { addr, whoami, why }
                        }
                    }
                    other => other,
                };
            }
            Reply::Stats(s) => self.stats = Some(s),
            Reply::Leased { lease, view } => self.on_leased(lease, view),
            Reply::QueueEmpty { retry_after_ms } => {
                if matches!(self.work, Work::Leasing) {
                    self.work = Work::Empty {
                        retry_at: Instant::now() + Duration::from_millis(retry_after_ms as u64),
                    };
                }
            }
            Reply::HeartbeatOk { .. } => {}
            Reply::LeaseLost { lease_id, message } => self.on_lease_lost(&lease_id, &message),
            Reply::Submitted { lease_id, reply } => {
                let work = std::mem::replace(&mut self.work, Work::Idle);
                self.work = match work {
                    Work::Submitting { m, .. } if m.lease.lease_id == lease_id => {
                        self.next_stats = Instant::now();
                        Work::Refining {
                            m,
                            proposal_id: reply.proposal_id,
                            since: Instant::now(),
                            last: None,
                        }
                    }
                    other => other,
                };
            }
            Reply::Skipped { lease_id } => {
                if matches!(&self.work, Work::Skipping { m } if m.lease.lease_id == lease_id) {
                    self.work = Work::Idle;
                    self.lease();
                }
            }
            Reply::Proposal(p) => self.on_proposal(p),
            Reply::Refused { what, message } => self.on_refused(what, message),
        }
    }

    fn on_leased(&mut self, lease: pb::Lease, view: pb::ImageView) {
        if !matches!(self.work, Work::Leasing) {
            return;
        }
        let (w, h) = (lease.width.max(view.width), lease.height.max(view.height));
        let layer = match self.kept.remove(&lease.image_id) {
            Some(l) if (l.width, l.height) == (w, h) => {
                self.say(
                    Level::Info,
                    format!(
                        "Image {} came back to you; your earlier drawing is restored.",
                        view.name
                    ),
                );
                l
            }
            _ => MarkLayer::new(w, h),
        };
        let left = lease.deadline_ms.saturating_sub(unix_ms());
        let every = self.heartbeat_override.unwrap_or_else(|| {
            if left == 0 {
                Duration::from_secs(5)
            } else {
                Duration::from_millis(left / 3)
                    .clamp(Duration::from_millis(200), Duration::from_secs(30))
            }
        });
        self.zoom = 1.0;
        self.pan = Vec2::ZERO;
        self.stroke = None;
        self.marks_rev += 1;
        self.work = Work::Marking(Box::new(Marking {
            lease,
            view,
            layer,
            next_heartbeat: Instant::now() + every,
            heartbeat_every: every,
        }));
    }

    fn on_lease_lost(&mut self, lease_id: &str, message: &str) {
        let work = std::mem::replace(&mut self.work, Work::Idle);
        match work {
            Work::Marking(m) | Work::Submitting { m, .. } | Work::Skipping { m }
                if m.lease.lease_id == lease_id =>
            {
                let name = m.view.name.clone();
                if !m.layer.is_empty() {
                    self.kept.insert(m.lease.image_id.clone(), m.layer);
                    self.say(
                        Level::Warning,
                        format!(
                            "Your lease on image {name} expired ({message}). Your drawing is kept \
                             and comes back if the image is offered to you again."
                        ),
                    );
                } else {
                    self.say(
                        Level::Warning,
                        format!("Your lease on image {name} expired ({message})."),
                    );
                }
                self.lease();
            }
            other => self.work = other,
        }
    }

    fn on_proposal(&mut self, p: pb::Proposal) {
        use pb::ProposalStatus as S;
        let status = S::try_from(p.status).unwrap_or(S::Unspecified);
        let work = std::mem::replace(&mut self.work, Work::Idle);
        self.work = match work {
            Work::Refining {
                m,
                proposal_id,
                since,
                ..
            } if proposal_id == p.proposal_id => match status {
                S::Ready => Work::Choosing {
                    m,
                    proposal: Box::new(p),
                },
                S::Failed => {
                    self.say(
                        Level::Error,
                        format!("The refinement failed: {}. Your mark is stored.", p.message),
                    );
                    self.lease();
                    return;
                }
                S::Committed | S::Committing | S::Rejected => {
                    self.lease();
                    return;
                }
                _ => Work::Refining {
                    m,
                    proposal_id,
                    since,
                    last: Some(Box::new(p)),
                },
            },
            Work::Deciding {
                m,
                proposal,
                commit,
            } if proposal.proposal_id == p.proposal_id => match status {
                S::Committed | S::Committing => {
                    self.say(
                        Level::Info,
                        match p.committed_version {
                            0 => "Committed; the trainer is applying it.".to_string(),
                            v => format!("Committed as model version {v}."),
                        },
                    );
                    self.lease();
                    return;
                }
                S::Rejected => {
                    self.say(Level::Info, "Rejected; the model stays as it was.");
                    self.lease();
                    return;
                }
                _ => Work::Deciding {
                    m,
                    proposal,
                    commit,
                },
            },
            other => other,
        };
    }

    fn on_refused(&mut self, what: &'static str, message: String) {
        self.say(
            Level::Error,
            format!("The server refused the {what}: {message}"),
        );
        let work = std::mem::replace(&mut self.work, Work::Idle);
        self.work = match work {
            // Nothing drawn is lost: back to the drawing.
            Work::Submitting { m, .. } | Work::Skipping { m } => Work::Marking(m),
            Work::Deciding { m, proposal, .. } => Work::Choosing { m, proposal },
            Work::Leasing => Work::Empty {
                retry_at: Instant::now() + Duration::from_secs(3),
            },
            Work::Refining { .. } => {
                self.lease();
                return;
            }
            other => other,
        };
    }

    // ------------------------------------------------------------ actions

    pub fn lease(&mut self) {
        if self.connected() {
            self.work = Work::Leasing;
            self.net.send(Cmd::Lease);
        } else {
            self.work = Work::Idle;
        }
    }

    pub fn submit(&mut self) {
        let Work::Marking(m) = &self.work else { return };
        if m.layer.is_empty() {
            self.say(
                Level::Warning,
                "Mark at least one pixel red or green, or skip the image (S).",
            );
            return;
        }
        let Work::Marking(m) = std::mem::replace(&mut self.work, Work::Idle) else {
            unreachable!()
        };
        let key = mp_api::random_key();
        self.net.send(Cmd::Submit {
            lease_id: m.lease.lease_id.clone(),
            key: key.clone(),
            mask: m.layer.to_rle(),
        });
        self.banner = None;
        self.work = Work::Submitting { m, key };
    }

    pub fn skip(&mut self) {
        if !matches!(self.work, Work::Marking(_)) {
            return;
        }
        let Work::Marking(m) = std::mem::replace(&mut self.work, Work::Idle) else {
            unreachable!()
        };
        self.net.send(Cmd::Skip {
            lease_id: m.lease.lease_id.clone(),
        });
        self.work = Work::Skipping { m };
    }

    pub fn decide(&mut self, commit: bool) {
        if !matches!(self.work, Work::Choosing { .. }) {
            return;
        }
        let Work::Choosing { m, proposal } = std::mem::replace(&mut self.work, Work::Idle) else {
            unreachable!()
        };
        self.net.send(Cmd::Decide {
            proposal_id: proposal.proposal_id.clone(),
            commit,
        });
        self.work = Work::Deciding {
            m,
            proposal,
            commit,
        };
    }

    fn with_layer(&mut self, f: impl FnOnce(&mut MarkLayer) -> bool) {
        if let Work::Marking(m) = &mut self.work {
            if f(&mut m.layer) {
                self.marks_rev += 1;
            }
        }
    }

    pub fn undo(&mut self) {
        self.with_layer(|l| l.undo());
    }

    pub fn redo(&mut self) {
        self.with_layer(|l| l.redo());
    }

    pub fn clear(&mut self) {
        self.with_layer(|l| {
            l.clear();
            true
        });
    }

    // ------------------------------------------------------------ timers

    fn tick(&mut self, ctx: &egui::Context) {
        let now = Instant::now();
        let mut wake = Duration::from_secs(1);
        let connected = self.connected();
        if let Some(b) = &self.banner {
            if b.level == Level::Info {
                let left = INFO_SHOWN_FOR.saturating_sub(b.since.elapsed());
                if left.is_zero() {
                    self.banner = None;
                } else {
                    wake = wake.min(left);
                }
            }
        }
        if connected {
            if now >= self.next_stats {
                self.net.send(Cmd::Stats);
                self.next_stats = now + STATS_EVERY;
            }
            wake = wake.min(self.next_stats.saturating_duration_since(now));
        }
        match &mut self.work {
            Work::Marking(m) => {
                if now >= m.next_heartbeat {
                    self.net.send(Cmd::Heartbeat {
                        lease_id: m.lease.lease_id.clone(),
                    });
                    m.next_heartbeat = now + m.heartbeat_every;
                }
                wake = wake.min(m.next_heartbeat.saturating_duration_since(now));
            }
            Work::Empty { retry_at } => {
                if now >= *retry_at {
                    self.lease();
                } else {
                    wake = wake.min(retry_at.saturating_duration_since(now));
                }
            }
            Work::Idle if connected => self.lease(),
            _ => {}
        }
        ctx.request_repaint_after(wake.max(Duration::from_millis(20)));
    }

    // ------------------------------------------------------------ input

    fn shortcuts(&mut self, ui: &egui::Ui) {
        if ui.ctx().egui_wants_keyboard_input() {
            return;
        }
        #[derive(PartialEq)]
        enum A {
            Red,
            Green,
            Eraser,
            Smaller,
            Bigger,
            Undo,
            Redo,
            Submit,
            Skip,
        }
        let mut actions = Vec::new();
        ui.input_mut(|i| {
            if i.consume_key(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z) {
                actions.push(A::Redo);
            }
            if i.consume_key(Modifiers::COMMAND, Key::Z) {
                actions.push(A::Undo);
            }
            for (key, a) in [
                (Key::R, A::Red),
                (Key::G, A::Green),
                (Key::E, A::Eraser),
                (Key::OpenBracket, A::Smaller),
                (Key::CloseBracket, A::Bigger),
                (Key::Enter, A::Submit),
                (Key::S, A::Skip),
            ] {
                if i.consume_key(Modifiers::NONE, key) {
                    actions.push(a);
                }
            }
        });
        for a in actions {
            match a {
                A::Red => self.brush = Brush::Red,
                A::Green => self.brush = Brush::Green,
                A::Eraser => self.brush = Brush::Eraser,
                A::Smaller => self.settings.radius = (self.settings.radius - 2.0).max(0.0),
                A::Bigger => self.settings.radius = (self.settings.radius + 2.0).min(RADIUS_MAX),
                A::Undo => self.undo(),
                A::Redo => self.redo(),
                A::Submit => self.submit(),
                A::Skip => self.skip(),
            }
        }
    }

    /// Paints with the primary button and pans with the secondary or middle one; the
    /// wheel zooms around the pointer. Raw pointer events are used so that every pointer
    /// position of a stroke counts, however many arrive in one frame.
    fn canvas_input(&mut self, ui: &egui::Ui, area: Rect, resp: &egui::Response) {
        let Some(xf) = self.canvas else { return };
        let radius = self.settings.radius / xf.scale;
        let brush = self.brush;
        let events = ui.input(|i| i.events.clone());
        let mut changed = false;
        if let Work::Marking(m) = &mut self.work {
            for ev in events {
                match ev {
                    egui::Event::PointerButton {
                        pos,
                        button: PointerButton::Primary,
                        pressed: true,
                        ..
                    } if area.contains(pos) => {
                        let p = xf.to_image(pos);
                        m.layer.begin_stroke();
                        m.layer.paint_segment(p, p, radius, brush);
                        self.stroke = Some(p);
                        changed = true;
                    }
                    egui::Event::PointerMoved(pos) => {
                        if let Some(last) = self.stroke {
                            let p = xf.to_image(pos);
                            m.layer.paint_segment(last, p, radius, brush);
                            self.stroke = Some(p);
                            changed = true;
                        }
                    }
                    egui::Event::PointerButton {
                        pos,
                        button: PointerButton::Primary,
                        pressed: false,
                        ..
                    } => {
                        if let Some(last) = self.stroke.take() {
                            m.layer.paint_segment(last, xf.to_image(pos), radius, brush);
                            changed = true;
                        }
                    }
                    egui::Event::PointerGone => self.stroke = None,
                    _ => {}
                }
            }
        }
        if changed {
            self.marks_rev += 1;
        }
        if resp.dragged_by(PointerButton::Secondary) || resp.dragged_by(PointerButton::Middle) {
            self.pan += resp.drag_delta();
        }
        if resp.hovered() {
            let (scroll, pinch, pointer) = ui.input(|i| {
                (
                    i.smooth_scroll_delta.y,
                    i.zoom_delta(),
                    i.pointer.hover_pos(),
                )
            });
            let factor = pinch * (scroll * 0.002).exp();
            if (factor - 1.0).abs() > 1e-4 {
                let new_zoom = (self.zoom * factor).clamp(0.25, 40.0);
                let f = new_zoom / self.zoom;
                let p = pointer.unwrap_or(area.center());
                let centre = xf.image_rect.center();
                let new_centre = p - (p - centre) * f;
                self.pan += new_centre - centre;
                self.zoom = new_zoom;
            }
        }
    }

    pub fn fit(&mut self) {
        self.zoom = 1.0;
        self.pan = Vec2::ZERO;
    }

    // ------------------------------------------------------------ screens

    /// The whole client, for eframe or a test harness.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        self.drain();
        self.tick(ui.ctx());
        if self.connected() {
            self.shortcuts(ui);
        }
        egui::Panel::top("status").show(ui, |ui| self.status_bar(ui));
        if let Some(b) = self.banner.clone() {
            egui::Panel::bottom("banner").show(ui, |ui| {
                ui.horizontal(|ui| {
                    let color = match b.level {
                        Level::Info => ui.visuals().text_color(),
                        Level::Warning => Color32::from_rgb(230, 170, 40),
                        Level::Error => Color32::from_rgb(235, 80, 70),
                    };
                    ui.colored_label(color, &b.text);
                    if ui.small_button("Dismiss").clicked() {
                        self.banner = None;
                    }
                });
            });
        }
        if !self.connected() {
            egui::CentralPanel::default_margins().show(ui, |ui| self.connect_screen(ui));
            return;
        }
        if matches!(self.work, Work::Marking(_)) {
            egui::Panel::left("tools")
                .resizable(false)
                .exact_size(230.0)
                .show(ui, |ui| self.tools(ui));
        }
        egui::CentralPanel::default_margins().show(ui, |ui| self.work_screen(ui));
    }

    fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            let (dot, text) = match &self.conn {
                Conn::Offline => (Color32::GRAY, "Not connected".to_string()),
                Conn::Connecting => (
                    Color32::from_rgb(230, 170, 40),
                    format!("Connecting to {}...", self.settings.addr),
                ),
                Conn::Up { addr, whoami } => (
                    Color32::from_rgb(60, 200, 90),
                    format!("Connected to {addr} as {whoami}"),
                ),
                Conn::Down { why, .. } => (
                    Color32::from_rgb(235, 80, 70),
                    format!("Connection lost, retrying ({why}); nothing drawn is lost"),
                ),
            };
            let (r, _) = ui.allocate_exact_size(Vec2::splat(12.0), egui::Sense::hover());
            ui.painter().circle_filled(r.center(), 5.0, dot);
            ui.label(text);
            if let Some(s) = &self.stats {
                ui.separator();
                ui.label(format!("Queue {}", s.queue_depth));
                ui.separator();
                ui.label(format!("Experts online {}", s.experts_online));
                ui.separator();
                ui.label(format!("My marks {}", self.my_marks()));
                if let Some(v) = s.accuracy_history.last() {
                    ui.separator();
                    ui.label(format!(
                        "Model v{} | val {:.1} %",
                        v.version,
                        100.0 * v.val_accuracy
                    ));
                }
            }
            if self.connected() {
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    if ui.button("Disconnect").clicked() {
                        self.disconnect();
                    }
                });
            }
        });
    }

    fn connect_screen(&mut self, ui: &mut egui::Ui) {
        ui.vertical_centered(|ui| {
            ui.add_space(40.0);
            ui.heading("Machine Punishment");
            ui.label("Show the model where to look.");
            ui.add_space(20.0);
        });
        egui::Grid::new("connect").num_columns(2).show(ui, |ui| {
            ui.label("Server");
            ui.add(egui::TextEdit::singleline(&mut self.settings.addr).desired_width(320.0));
            ui.end_row();
            ui.label("Token");
            ui.add(
                egui::TextEdit::singleline(&mut self.settings.token)
                    .password(true)
                    .desired_width(320.0),
            );
            ui.end_row();
        });
        ui.add_space(8.0);
        let busy = self.conn == Conn::Connecting;
        ui.horizontal(|ui| {
            if ui
                .add_enabled(!busy, egui::Button::new("Connect"))
                .clicked()
            {
                self.connect();
            }
            if busy {
                ui.add(egui::Spinner::new());
            }
        });
    }

    fn tools(&mut self, ui: &mut egui::Ui) {
        ui.heading("Brush");
        ui.horizontal(|ui| {
            ui.selectable_value(&mut self.brush, Brush::Red, "Red (R)")
                .on_hover_text("Do not look here");
            ui.selectable_value(&mut self.brush, Brush::Green, "Green (G)")
                .on_hover_text("Look here");
        });
        ui.selectable_value(&mut self.brush, Brush::Eraser, "Eraser (E)");
        ui.add(egui::Slider::new(&mut self.settings.radius, 0.0..=RADIUS_MAX).text("radius"))
            .on_hover_text("[ and ] make the brush smaller and larger");
        ui.horizontal(|ui| {
            let (can_undo, can_redo) = self
                .marking()
                .map(|m| (m.layer.can_undo(), m.layer.can_redo()))
                .unwrap_or((false, false));
            if ui
                .add_enabled(can_undo, egui::Button::new("Undo"))
                .clicked()
            {
                self.undo();
            }
            if ui
                .add_enabled(can_redo, egui::Button::new("Redo"))
                .clicked()
            {
                self.redo();
            }
            if ui.button("Clear").clicked() {
                self.clear();
            }
        });
        if let Some(m) = self.marking() {
            let (r, g) = m.layer.counts();
            ui.label(format!("{r} red, {g} green pixels"));
        }
        ui.separator();
        ui.heading("Saliency");
        ui.checkbox(
            &mut self.settings.show_saliency,
            "Show the model's attention",
        );
        ui.add(egui::Slider::new(&mut self.settings.opacity, 0.0..=1.0).text("opacity"));
        ui.separator();
        ui.horizontal(|ui| {
            ui.label(format!("Zoom {:.0} %", self.zoom * 100.0));
            if ui.button("Fit").clicked() {
                self.fit();
            }
        });
        ui.separator();
        if ui
            .add(egui::Button::new("Submit (Enter)").fill(Color32::from_rgb(40, 110, 60)))
            .clicked()
        {
            self.submit();
        }
        if ui.button("Skip (S)").clicked() {
            self.skip();
        }
        ui.add_space(8.0);
        ui.small(
            "Left drag paints, right or middle drag pans, wheel zooms. \
             [ ] brush size, Ctrl+Z undo, Ctrl+Shift+Z redo.",
        );
    }

    fn work_screen(&mut self, ui: &mut egui::Ui) {
        match &self.work {
            Work::Idle | Work::Leasing => {
                ui.horizontal(|ui| {
                    ui.add(egui::Spinner::new());
                    ui.label("Asking the queue for the next image...");
                });
            }
            Work::Empty { retry_at } => {
                let left = retry_at.saturating_duration_since(Instant::now());
                ui.label(format!(
                    "The queue is empty: every image is marked or leased. Checking again in {:.0} s.",
                    left.as_secs_f32().ceil()
                ));
                if ui.button("Check now").clicked() {
                    self.lease();
                }
            }
            Work::Marking(_) => self.marking_screen(ui),
            Work::Submitting { .. } | Work::Skipping { .. } => {
                ui.horizontal(|ui| {
                    ui.add(egui::Spinner::new());
                    ui.label("Sending...");
                });
            }
            Work::Refining { since, last, .. } => {
                let status = last
                    .as_ref()
                    .and_then(|p| pb::ProposalStatus::try_from(p.status).ok())
                    .map(|s| match s {
                        pb::ProposalStatus::Running => "refining the model",
                        pb::ProposalStatus::Rebasing => "recomputing on the newest model",
                        _ => "waiting for a worker",
                    })
                    .unwrap_or("waiting for a worker");
                let secs = since.elapsed().as_secs_f32();
                ui.vertical_centered(|ui| {
                    ui.add_space(60.0);
                    ui.add(egui::Spinner::new().size(40.0));
                    ui.label(format!("Mark stored. Proposal: {status} ({secs:.0} s)"));
                });
            }
            Work::Choosing { .. } | Work::Deciding { .. } => self.chooser(ui),
        }
    }

    fn marking_screen(&mut self, ui: &mut egui::Ui) {
        let Work::Marking(m) = &self.work else { return };
        let v = &m.view;
        let p = v
            .probabilities
            .get(v.prediction as usize)
            .copied()
            .unwrap_or(0.0);
        ui.horizontal_wrapped(|ui| {
            ui.strong(format!("Image {}", v.name));
            ui.separator();
            ui.label(format!("label: {}", v.label_name));
            ui.separator();
            let verdict = if v.prediction == v.label {
                "right"
            } else {
                "wrong"
            };
            ui.label(format!(
                "prediction: {} ({:.0} %, {verdict})",
                v.prediction_name,
                100.0 * p
            ));
            ui.separator();
            ui.label(format!("model v{}", m.lease.model_version));
            let newest = self
                .stats
                .as_ref()
                .and_then(|s| s.accuracy_history.iter().map(|v| v.version).max())
                .unwrap_or(0);
            if newest > m.lease.model_version {
                ui.separator();
                ui.colored_label(
                    Color32::from_rgb(230, 170, 40),
                    format!(
                        "v{newest} is newer: this view is v{}'s; your marks still count \
                         (the refinement is rebased on the newest model)",
                        m.lease.model_version
                    ),
                );
            }
        });
        let area = ui.available_rect_before_wrap();
        let resp = ui.allocate_rect(area, egui::Sense::click_and_drag());
        let (w, h) = (m.layer.width as f32, m.layer.height as f32);
        let base = (area.width() / w).min(area.height() / h).max(1e-3);
        let scale = base * self.zoom;
        let image_rect = Rect::from_center_size(area.center() + self.pan, Vec2::new(w, h) * scale);
        self.canvas = Some(CanvasXf { image_rect, scale });
        self.canvas_input(ui, area, &resp);

        let Work::Marking(m) = &self.work else { return };
        let ctx = ui.ctx().clone();
        let painter = ui.painter_at(area);
        let xf = self.canvas.unwrap_or(CanvasXf { image_rect, scale });
        let saliency = self
            .settings
            .show_saliency
            .then_some((m.view.saliency.as_slice(), self.settings.opacity));
        self.textures.draw_image(
            &ctx,
            &painter,
            xf.image_rect,
            &m.view,
            saliency,
            &m.layer,
            self.marks_rev,
        );
        if let Some(pos) = resp.hover_pos() {
            let color = match self.brush {
                Brush::Red => Color32::from_rgb(240, 60, 60),
                Brush::Green => Color32::from_rgb(60, 220, 90),
                Brush::Eraser => Color32::WHITE,
            };
            painter.circle_stroke(
                pos,
                self.settings.radius.max(1.0),
                egui::Stroke::new(1.5, color),
            );
        }
    }

    fn chooser(&mut self, ui: &mut egui::Ui) {
        let (m, proposal, deciding) = match &self.work {
            Work::Choosing { m, proposal } => (m, proposal, false),
            Work::Deciding { m, proposal, .. } => (m, proposal, true),
            _ => return,
        };
        ui.heading("Before and after: where the model looks");
        ui.small(
            "Each map is scaled to its own 99th percentile: compare where the model looks; \
             the curves below show how its attention moved.",
        );
        let ctx = ui.ctx().clone();
        let avail = ui.available_size();
        let side = ((avail.x - 24.0) / 2.0).min(avail.y * 0.5).max(64.0);
        let (w, h) = (m.layer.width as f32, m.layer.height as f32);
        let size = Vec2::new(w, h) * (side / w.max(h));
        ui.horizontal(|ui| {
            for (title, sal, slot) in [
                ("Before", &proposal.saliency_before, view::Slot::Before),
                ("After", &proposal.saliency_after, view::Slot::After),
            ] {
                ui.vertical(|ui| {
                    ui.label(title);
                    let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
                    self.textures.draw_overlay(
                        &ctx,
                        &ui.painter_at(rect),
                        rect,
                        &m.view,
                        sal,
                        &m.layer,
                        slot,
                        &proposal.proposal_id,
                    );
                });
            }
        });
        egui::Grid::new("numbers")
            .num_columns(3)
            .striped(true)
            .show(ui, |ui| {
                ui.label("");
                ui.strong("before");
                ui.strong("after");
                ui.end_row();
                ui.label("validation accuracy");
                ui.label(format!("{:.2} %", 100.0 * proposal.val_accuracy_before));
                ui.label(format!("{:.2} %", 100.0 * proposal.val_accuracy_after));
                ui.end_row();
                ui.label("validation loss");
                ui.label(format!("{:.4}", proposal.val_loss_before));
                ui.label(format!("{:.4}", proposal.val_loss_after));
                ui.end_row();
            });
        if let (Some(first), Some(last)) = (proposal.curve.first(), proposal.curve.last()) {
            let why = match proposal.stop_reason.as_str() {
                "" => String::new(),
                r => format!("; stopped: {}", words(r)),
            };
            ui.label(format!(
                "Saliency loss on your marks {:.4} -> {:.4} over {} iteration(s){why}",
                first.saliency_loss, last.saliency_loss, last.iteration
            ));
        }
        if !proposal.message.is_empty() {
            ui.label(&proposal.message);
        }
        ui.label("Share of the model's attention on your marks during refinement:");
        let plot_h = (ui.available_height() - 40.0).clamp(80.0, 220.0);
        let (rect, _) = ui.allocate_exact_size(
            Vec2::new(ui.available_width().min(520.0), plot_h),
            egui::Sense::hover(),
        );
        view::impact_plot(&ui.painter_at(rect), rect, &proposal.curve, ui.visuals());
        let mut decision = None;
        ui.horizontal(|ui| {
            if ui
                .add_enabled(
                    !deciding,
                    egui::Button::new("Commit").fill(Color32::from_rgb(40, 110, 60)),
                )
                .clicked()
            {
                decision = Some(true);
            }
            if ui
                .add_enabled(!deciding, egui::Button::new("Reject"))
                .clicked()
            {
                decision = Some(false);
            }
            if deciding {
                ui.add(egui::Spinner::new());
            }
        });
        if let Some(commit) = decision {
            self.decide(commit);
        }
    }
}
