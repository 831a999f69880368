//! The client's state machine and its screens: connect, mark, wait for the refinement,
//! choose. Everything here runs on the UI thread and never waits on the network: commands
//! go to [`Net`], replies are drained at the start of every frame.

use crate::mask::{Brush, MarkLayer};
use crate::net::{Cmd, Net, Reply};
use crate::settings::Settings;
use crate::view;

mod choose;
mod connect;
pub mod dashboard;
mod input;
mod marking;
pub mod review;
pub mod status;
mod work;
use crate::platform::{Instant, SystemTime, UNIX_EPOCH};
use crate::settings::Store;
use egui::{Color32, Pos2, Rect, Vec2};
use mp_proto::v1 as pb;
pub use review::{Review, ReviewOpen};
pub use status::LiveStatus;
use std::collections::HashMap;
use std::time::Duration;

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

/// The platform's suggested mark for the leased image, ready to draw and to accept.
#[derive(Debug, Clone, PartialEq)]
pub struct Suggested {
    /// Row-major values at image resolution: +1 red, −1 green, 0 none.
    pub values: Vec<i8>,
    pub mode: String,
    pub marks: u32,
    /// Outline edges in image coordinates, red and green.
    pub red_edges: Vec<([f32; 2], [f32; 2])>,
    pub green_edges: Vec<([f32; 2], [f32; 2])>,
}

impl Suggested {
    /// From the image view; `None` without a suggestion, or one that does not fit the image.
    pub fn from_view(view: &pb::ImageView, width: u32, height: u32) -> Option<Suggested> {
        let s = view.suggestion.as_ref()?;
        let mask = s.mask.as_ref()?;
        if (mask.width, mask.height) != (width, height) {
            return None;
        }
        let values = mp_proto::rle::decode(mask).ok()?;
        if values.iter().all(|&v| v == 0) {
            return None;
        }
        Some(Suggested {
            red_edges: crate::mask::outline(width, height, &values, 1),
            green_edges: crate::mask::outline(width, height, &values, -1),
            values,
            mode: s.mode.clone(),
            marks: s.marks,
        })
    }
}

/// The image being worked on.
#[derive(Debug, Clone)]
pub struct Marking {
    pub lease: pb::Lease,
    pub view: pb::ImageView,
    pub layer: MarkLayer,
    pub suggested: Option<Suggested>,
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

/// The screen on show: marking (everyone), reviewing (reviewers, admins), the lead's
/// dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tab {
    #[default]
    Mark,
    Review,
    Dashboard,
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
    settings_store: Store,
    /// The connect screen has put the cursor in the token field once.
    token_focused: bool,
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
    pub tab: Tab,
    pub review: Review,
    review_method: pb::settle_request::Method,
    pub dashboard: Option<Box<crate::net::Dashboard>>,
    next_dashboard: Instant,
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
    pub fn new(net: Net, settings: Settings, settings_store: Store) -> ClientApp {
        ClientApp {
            net,
            settings,
            settings_store,
            token_focused: false,
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
            tab: Tab::Mark,
            review: Review::Idle,
            review_method: pb::settle_request::Method::Unspecified,
            dashboard: None,
            next_dashboard: Instant::now(),
        }
    }

    /// Remembers the address, token and tool settings.
    pub fn save_settings(&mut self) {
        if let Err(e) = self.settings_store.save(&self.settings) {
            self.say(
                Level::Warning,
                format!("could not remember the settings: {e}"),
            );
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
        if !crate::platform::CAN_BLOCK {
            return;
        }
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
                        if reply.in_review {
                            self.say(
                                Level::Info,
                                "Your mark completed this image's set; the experts disagree,                                  so a reviewer settles it.",
                            );
                        } else if !reply.settled_proposal_id.is_empty() {
                            self.say(
                                Level::Info,
                                "Your mark completed this image's set and the experts agree:                                  here is the merged mark's proposal.",
                            );
                        }
                        Work::Refining {
                            m,
                            proposal_id: if reply.settled_proposal_id.is_empty() {
                                reply.proposal_id
                            } else {
                                reply.settled_proposal_id
                            },
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
            Reply::ReviewLeased(r) => self.on_review_leased(r),
            Reply::Settled(r) => self.on_settled(r),
            Reply::Dashboard(d) => self.dashboard = Some(d),
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
        let suggested = Suggested::from_view(&view, w, h);
        self.work = Work::Marking(Box::new(Marking {
            lease,
            view,
            layer,
            suggested,
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
        self.on_review_proposal(&p);
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
                S::Committed | S::Committing | S::Rejected | S::Endorsed => {
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
                S::Endorsed => {
                    self.say(
                        Level::Info,
                        "Endorsed. Other experts mark this image too; the settled mark, not                          yours alone, becomes guidance.",
                    );
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
        self.review = match std::mem::take(&mut self.review) {
            Review::Settling(o) => Review::Open(o),
            Review::Leasing => Review::Empty,
            other => other,
        };
    }

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

    /// Takes over the suggested mark (key A): one undoable step, the expert's own pixels
    /// elsewhere stay; then edit it or submit it as it is.
    pub fn accept_suggestion(&mut self) {
        let Work::Marking(m) = &mut self.work else {
            return;
        };
        let Some(s) = &m.suggested else {
            self.say(Level::Info, "There is no suggested mark for this image.");
            return;
        };
        if m.layer.accept(&s.values) {
            self.marks_rev += 1;
        }
    }

    pub fn clear(&mut self) {
        self.with_layer(|l| {
            l.clear();
            true
        });
    }

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
        if connected && self.tab == Tab::Dashboard {
            if now >= self.next_dashboard {
                self.refresh_dashboard();
            }
            wake = wake.min(self.next_dashboard.saturating_duration_since(now));
        }
        ctx.request_repaint_after(wake.max(Duration::from_millis(20)));
    }

    /// The whole client, for eframe or a test harness.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        self.drain();
        self.tick(ui.ctx());
        if self.connected() && self.tab == Tab::Mark {
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
        match self.tab {
            Tab::Mark => {
                if matches!(self.work, Work::Marking(_)) {
                    egui::Panel::left("tools")
                        .resizable(false)
                        .exact_size(230.0)
                        .show(ui, |ui| self.tools(ui));
                }
                egui::CentralPanel::default_margins().show(ui, |ui| self.work_screen(ui));
            }
            Tab::Review => {
                egui::CentralPanel::default_margins().show(ui, |ui| self.review_screen(ui));
            }
            Tab::Dashboard => {
                egui::CentralPanel::default_margins().show(ui, |ui| self.dashboard_screen(ui));
            }
        }
    }
}
