//! The network side of the client: a task that turns [`Cmd`]s into gRPC calls and sends
//! back [`Reply`]s, asking egui to repaint when one lands. The UI never waits on the
//! network. Natively the task runs on a tokio runtime on its own thread; in the browser on
//! the page's event loop (see [`crate::platform`]). The channels are the same.
//!
//! Calls that fail for a transient reason (gateway or network away) are retried with
//! backoff until they succeed; the UI hears [`Reply::Connection`] so it can say so. A retried
//! submit keeps its idempotency key, so the gateway stores it once.

use crate::platform::{self, sleep};
use futures::channel::mpsc as amsc;
use futures::StreamExt;
use mp_api::{transient, Client};
use mp_proto::v1 as pb;
use std::sync::mpsc;
use std::time::Duration;
use tonic::{Code, Status};

/// What the UI asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Cmd {
    Connect {
        addr: String,
        token: String,
    },
    /// Forget the connection (calls in flight finish).
    Disconnect,
    Stats,
    Lease,
    Heartbeat {
        lease_id: String,
    },
    Submit {
        lease_id: String,
        key: String,
        mask: pb::RleMask,
    },
    Skip {
        lease_id: String,
    },
    Watch {
        proposal_id: String,
    },
    Decide {
        proposal_id: String,
        commit: bool,
    },
    /// Reviewers: the next image whose marks disagree, with its view.
    LeaseReview,
    Settle(pb::SettleRequest),
    /// The lead's dashboard: stats, agreement, the audit trail.
    Dashboard,
}

/// What the lead's dashboard shows, all from the public API. Agreement and the audit trail
/// are for admins: for others they hold the server's refusal.
#[derive(Debug, Clone)]
pub struct Dashboard {
    pub stats: pb::Stats,
    pub agreement: Result<pb::AgreementReport, String>,
    pub audit: Result<pb::AuditReport, String>,
}

/// What the network answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The token was accepted; `whoami` is the expert id.
    Connected {
        addr: String,
        whoami: String,
    },
    /// Connecting failed for a reason that retrying will not fix (bad address, wrong token).
    ConnectFailed(String),
    /// `true` once calls go through again after a failure; `false` (with why) while
    /// calls fail for a transient reason and are being retried.
    Connection {
        up: bool,
        why: String,
    },
    Stats(pb::Stats),
    Leased {
        lease: pb::Lease,
        view: pb::ImageView,
    },
    QueueEmpty {
        retry_after_ms: u32,
    },
    HeartbeatOk {
        lease_id: String,
        deadline_ms: u64,
    },
    /// The lease is gone (expired, unknown); the image may come back later.
    LeaseLost {
        lease_id: String,
        message: String,
    },
    Submitted {
        lease_id: String,
        reply: pb::SubmitReply,
    },
    Skipped {
        lease_id: String,
    },
    /// A proposal as it is now (from the watch stream or a decision).
    Proposal(pb::Proposal),
    /// A review item and the image's view; `None` when nothing waits for review.
    ReviewLeased(Option<Box<(pb::ReviewItem, pb::ImageView)>>),
    Settled(pb::SettleReply),
    Dashboard(Box<Dashboard>),
    /// The server refused a request; its message, for the person.
    Refused {
        what: &'static str,
        message: String,
    },
}

/// The UI's end: send commands, drain replies.
pub struct Net {
    tx: amsc::UnboundedSender<Cmd>,
    rx: mpsc::Receiver<Reply>,
}

/// The other end of [`Net`]: where commands arrive and replies go.
pub struct NetEnd {
    pub cmds: amsc::UnboundedReceiver<Cmd>,
    pub replies: mpsc::Sender<Reply>,
}

impl Net {
    /// A pair of connected ends without a network behind them (the real network is
    /// [`Net::spawn`]).
    pub fn pair() -> (Net, NetEnd) {
        let (tx, cmds) = amsc::unbounded();
        let (replies, rx) = mpsc::channel();
        (Net { tx, rx }, NetEnd { cmds, replies })
    }

    /// Starts the network task. `repaint` is asked to repaint whenever a reply lands.
    pub fn spawn(repaint: Option<egui::Context>) -> Net {
        let (net, end) = Net::pair();
        platform::run_network(serve(end, repaint));
        net
    }

    pub fn send(&self, cmd: Cmd) {
        // The network task lives as long as the Net; a failed send means it panicked,
        // and the UI shows the connection as lost when no reply comes.
        let _ = self.tx.unbounded_send(cmd);
    }

    pub fn try_recv(&self) -> Option<Reply> {
        self.rx.try_recv().ok()
    }
}

/// Sends replies and asks for a repaint.
#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<Reply>,
    repaint: Option<egui::Context>,
}

impl Out {
    fn send(&self, r: Reply) {
        let _ = self.tx.send(r);
        if let Some(ctx) = &self.repaint {
            ctx.request_repaint();
        }
    }
}

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

/// Runs `call` until it succeeds or fails for a non-transient reason, reporting the
/// connection going down and coming back.
async fn retrying<T, F, Fut>(out: &Out, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut wait = BACKOFF_START;
    let mut down = false;
    loop {
        match call().await {
            Err(s) if transient(&s) => {
                out.send(Reply::Connection {
                    up: false,
                    why: s.message().to_string(),
                });
                down = true;
                sleep(wait).await;
                wait = (wait * 2).min(BACKOFF_MAX);
            }
            r => {
                if down && !matches!(&r, Err(s) if transient(s)) {
                    out.send(Reply::Connection {
                        up: true,
                        why: String::new(),
                    });
                }
                return r;
            }
        }
    }
}

async fn serve(mut end: NetEnd, repaint: Option<egui::Context>) {
    let out = Out {
        tx: end.replies.clone(),
        repaint,
    };
    let mut client: Option<Client> = None;
    while let Some(cmd) = end.cmds.next().await {
        match cmd {
            Cmd::Connect { addr, token } => {
                client = connect(&out, &addr, &token).await;
                continue;
            }
            Cmd::Disconnect => {
                client = None;
                continue;
            }
            _ => {}
        }
        let Some(c) = client.clone() else {
            out.send(Reply::Refused {
                what: "request",
                message: "not connected".into(),
            });
            continue;
        };
        let out = out.clone();
        platform::spawn(async move { handle(c, cmd, out).await });
    }
}

async fn connect(out: &Out, addr: &str, token: &str) -> Option<Client> {
    let c = match Client::connect(addr, token).await {
        Ok(c) => c,
        Err(e) => {
            out.send(Reply::ConnectFailed(e.to_string()));
            return None;
        }
    };
    match c.stats.clone().get_stats(pb::StatsRequest {}).await {
        Ok(s) => {
            let s = s.into_inner();
            out.send(Reply::Connected {
                addr: addr.to_string(),
                whoami: s.whoami.clone(),
            });
            out.send(Reply::Stats(s));
            Some(c)
        }
        Err(s) => {
            let why = match s.code() {
                Code::Unauthenticated => format!("the server refused the token: {}", s.message()),
                _ => format!("{}: {}", addr, s.message()),
            };
            out.send(Reply::ConnectFailed(why));
            None
        }
    }
}

fn refused(out: &Out, what: &'static str, s: &Status) {
    out.send(Reply::Refused {
        what,
        message: s.message().to_string(),
    });
}

/// A call on a lease failed for good: a lease that is gone (expired, already released,
/// unknown) is reported as lost; anything else is the server's refusal.
fn lease_failed(out: &Out, what: &'static str, lease_id: String, s: &Status) {
    if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) {
        out.send(Reply::LeaseLost {
            lease_id,
            message: s.message().to_string(),
        });
    } else {
        refused(out, what, s);
    }
}

async fn handle(c: Client, cmd: Cmd, out: Out) {
    match cmd {
        Cmd::Connect { .. } | Cmd::Disconnect => {}
        Cmd::Stats => {
            // A stats poll is not worth retrying; the next poll comes soon.
            match c.stats.clone().get_stats(pb::StatsRequest {}).await {
                Ok(s) => out.send(Reply::Stats(s.into_inner())),
                Err(s) if transient(&s) => out.send(Reply::Connection {
                    up: false,
                    why: s.message().to_string(),
                }),
                Err(s) => refused(&out, "stats", &s),
            }
        }
        Cmd::Lease => {
            let r = retrying(&out, || {
                let mut q = c.queue.clone();
                async move { q.lease(pb::LeaseRequest {}).await }
            })
            .await;
            match r.map(|r| r.into_inner()) {
                Ok(pb::LeaseReply {
                    lease: Some(lease), ..
                }) => match image_view(&c, &out, &lease.image_id, lease.model_version).await {
                    Ok(view) => out.send(Reply::Leased { lease, view }),
                    Err(s) => refused(&out, "image", &s),
                },
                Ok(r) => out.send(Reply::QueueEmpty {
                    retry_after_ms: r.retry_after_ms.max(250),
                }),
                Err(s) => refused(&out, "lease", &s),
            }
        }
        Cmd::Heartbeat { lease_id } => {
            let r = retrying(&out, || {
                let mut q = c.queue.clone();
                let lease_id = lease_id.clone();
                async move { q.heartbeat(pb::HeartbeatRequest { lease_id }).await }
            })
            .await;
            match r {
                Ok(r) => out.send(Reply::HeartbeatOk {
                    lease_id,
                    deadline_ms: r.into_inner().deadline_ms,
                }),
                Err(s) => lease_failed(&out, "heartbeat", lease_id, &s),
            }
        }
        Cmd::Submit {
            lease_id,
            key,
            mask,
        } => {
            let r = retrying(&out, || {
                let mut q = c.queue.clone();
                let req = pb::SubmitRequest {
                    lease_id: lease_id.clone(),
                    mask: Some(mask.clone()),
                    idempotency_key: key.clone(),
                };
                async move { q.submit(req).await }
            })
            .await;
            match r {
                Ok(r) => {
                    let reply = r.into_inner();
                    // A mark that completed an agreeing set: the merged mark's proposal is
                    // the one to decide (the expert's own is provisional).
                    let proposal_id = if reply.settled_proposal_id.is_empty() {
                        reply.proposal_id.clone()
                    } else {
                        reply.settled_proposal_id.clone()
                    };
                    out.send(Reply::Submitted { lease_id, reply });
                    watch(&c, proposal_id, &out).await;
                }
                Err(s) => lease_failed(&out, "submit", lease_id, &s),
            }
        }
        Cmd::Skip { lease_id } => {
            let r = retrying(&out, || {
                let mut q = c.queue.clone();
                let lease_id = lease_id.clone();
                async move { q.skip(pb::SkipRequest { lease_id }).await }
            })
            .await;
            match r {
                Ok(_) => out.send(Reply::Skipped { lease_id }),
                Err(s) => lease_failed(&out, "skip", lease_id, &s),
            }
        }
        Cmd::Watch { proposal_id } => watch(&c, proposal_id, &out).await,
        Cmd::Decide {
            proposal_id,
            commit,
        } => {
            let decision = if commit {
                pb::decide_request::Decision::Commit
            } else {
                pb::decide_request::Decision::Reject
            };
            let r = retrying(&out, || {
                let mut p = c.proposals.clone();
                let req = pb::DecideRequest {
                    proposal_id: proposal_id.clone(),
                    decision: decision as i32,
                };
                async move { p.decide(req).await }
            })
            .await;
            match r {
                Ok(p) => out.send(Reply::Proposal(p.into_inner())),
                Err(s) => refused(&out, "decision", &s),
            }
        }
        Cmd::LeaseReview => {
            let r = retrying(&out, || {
                let mut q = c.queue.clone();
                async move { q.lease_review(pb::LeaseReviewRequest {}).await }
            })
            .await;
            match r.map(|r| r.into_inner().item) {
                Ok(Some(item)) => match image_view(&c, &out, &item.image_id, 0).await {
                    Ok(view) => out.send(Reply::ReviewLeased(Some(Box::new((item, view))))),
                    Err(s) => refused(&out, "image", &s),
                },
                Ok(None) => out.send(Reply::ReviewLeased(None)),
                Err(s) => refused(&out, "review", &s),
            }
        }
        Cmd::Settle(req) => {
            let r = retrying(&out, || {
                let mut q = c.queue.clone();
                let req = req.clone();
                async move { q.settle(req).await }
            })
            .await;
            match r {
                Ok(r) => out.send(Reply::Settled(r.into_inner())),
                Err(s) => refused(&out, "settlement", &s),
            }
        }
        Cmd::Dashboard => {
            let stats = match c.stats.clone().get_stats(pb::StatsRequest {}).await {
                Ok(s) => s.into_inner(),
                Err(s) => return refused(&out, "dashboard", &s),
            };
            let agreement = c
                .stats
                .clone()
                .get_agreement(pb::AgreementRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_string());
            let audit = c
                .admin
                .clone()
                .audit(pb::AuditRequest {
                    limit: 10_000,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| s.message().to_string());
            out.send(Reply::Dashboard(Box::new(Dashboard {
                stats,
                agreement,
                audit,
            })));
        }
    }
}

/// The view of image `id` under model `version` (0: the serving one), retried while the
/// gateway is away.
async fn image_view(
    c: &Client,
    out: &Out,
    id: &str,
    version: u64,
) -> Result<pb::ImageView, Status> {
    let req = pb::GetImageRequest {
        image_id: id.to_string(),
        model_version: version,
    };
    retrying(out, || {
        let mut i = c.images.clone();
        let req = req.clone();
        async move { i.get_image(req).await }
    })
    .await
    .map(|v| v.into_inner())
}

/// Is the proposal past the point where it changes by itself (ready for a decision, or
/// finished)?
pub fn settled(p: &pb::Proposal) -> bool {
    use pb::ProposalStatus as S;
    matches!(
        S::try_from(p.status).unwrap_or(S::Unspecified),
        S::Ready | S::Committed | S::Rejected | S::Failed | S::Endorsed
    )
}

/// Follows a proposal until it is ready or finished; a broken stream is reopened.
async fn watch(c: &Client, proposal_id: String, out: &Out) {
    let mut wait = BACKOFF_START;
    loop {
        let req = pb::GetProposalRequest {
            proposal_id: proposal_id.clone(),
        };
        match c.proposals.clone().watch_proposal(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(p)) => {
                            let done = settled(&p);
                            out.send(Reply::Proposal(p));
                            if done {
                                return;
                            }
                        }
                        // The server ended the stream early or it broke: reopen it.
                        Ok(None) => break,
                        Err(s) if transient(&s) => break,
                        Err(s) => return refused(out, "proposal", &s),
                    }
                }
            }
            Err(s) if transient(&s) => out.send(Reply::Connection {
                up: false,
                why: s.message().to_string(),
            }),
            Err(s) => return refused(out, "proposal", &s),
        }
        sleep(wait).await;
        wait = (wait * 2).min(BACKOFF_MAX);
    }
}
