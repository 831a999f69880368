//! Simulated experts: N concurrent clients that lease, answer with ground-truth marks
//! (an image folder's mark PNGs, or a synthetic block), heartbeat, sometimes skip or abandon
//! a lease — through the public API only, exactly as the annotation client does.

use crate::{random_key, transient, Client};
use mp_proto::rle;
use mp_proto::v1 as pb;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Status;

/// Where the simulated experts' marks come from.
#[derive(Debug, Clone)]
pub enum MarkSource {
    /// `ROOT/marks/{image_id}.png` (image ids are `class/stem`): red channel > 127 = red,
    /// green channel > 127 = green.
    Folder(PathBuf),
    /// A red block over the top-left quarter.
    Synthetic,
}

/// How a simulated expert marks, from the ground-truth mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The ground truth (degraded only by `partial` / `noise`).
    Careful,
    /// The truth's outline off by two pixels (grown or shrunk, one or the other per image)
    /// and only 60 % of what is left.
    Sloppy,
    /// The colours swapped: green on what the truth marks red (the shortcut: "look here"),
    /// red on what it marks green (the object: "not here").
    Adversarial,
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "careful" => Ok(Profile::Careful),
            "sloppy" => Ok(Profile::Sloppy),
            "adversarial" => Ok(Profile::Adversarial),
            _ => Err(format!(
                "unknown expert profile {s:?}: careful, sloppy or adversarial"
            )),
        }
    }
}

/// Profiles from `careful=6,sloppy=2,adversarial=1` (counts) or `careful,sloppy` (one each),
/// in that order: expert k gets the k-th (cycling).
pub fn parse_mix(s: &str) -> Result<Vec<Profile>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = match part.split_once('=') {
            Some((name, n)) => (
                name,
                n.parse::<usize>()
                    .map_err(|_| format!("{part:?}: the count must be a number"))?,
            ),
            None => (part, 1),
        };
        let p: Profile = name.parse()?;
        out.extend(std::iter::repeat_n(p, n));
    }
    Ok(out)
}

/// The mark an expert of `profile` makes from the ground truth `truth` (w×h).
pub fn profile_mark(profile: Profile, truth: &[i8], w: u32, h: u32, dice: &mut Dice) -> Vec<i8> {
    match profile {
        Profile::Careful => truth.to_vec(),
        Profile::Adversarial => truth.iter().map(|&v| -v).collect(),
        Profile::Sloppy => {
            let grow = dice.roll() < 0.5;
            let mut v = truth.to_vec();
            for _ in 0..2 {
                v = step(&v, w as usize, h as usize, grow);
            }
            degrade(&mut v, 0.6, 0.0, dice);
            v
        }
    }
}

/// One pixel of dilation (`grow`) or erosion of each colour, 4-neighbourhood.
fn step(v: &[i8], w: usize, h: usize, grow: bool) -> Vec<i8> {
    let mut out = v.to_vec();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let nb = [
                (x > 0).then(|| i - 1),
                (x + 1 < w).then(|| i + 1),
                (y > 0).then(|| i - w),
                (y + 1 < h).then(|| i + w),
            ];
            if grow {
                if v[i] == 0 {
                    if let Some(c) = nb.iter().flatten().map(|&j| v[j]).find(|&c| c != 0) {
                        out[i] = c;
                    }
                }
            } else if v[i] != 0 && nb.iter().any(|n| n.is_none_or(|j| v[j] != v[i])) {
                out[i] = 0;
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub experts: usize,
    /// Expert k marks as `profiles[k % len]` (empty: every expert careful).
    pub profiles: Vec<Profile>,
    /// Stop once this many leases were granted in total.
    pub leases: usize,
    pub marks: MarkSource,
    /// Share of each ground-truth mark's pixels kept (1 = the whole mark).
    pub partial: f64,
    /// Probability that a pixel's mark is replaced by the opposite colour.
    pub noise: f64,
    pub skip_rate: f64,
    pub abandon_rate: f64,
    /// Send one heartbeat before answering.
    pub heartbeat: bool,
    /// Time spent "looking" at each image.
    pub think: Duration,
    /// Stop when the queue is empty instead of waiting for it to refill.
    pub stop_when_empty: bool,
    /// Give up on an operation that keeps failing transiently after this long.
    pub retry_for: Duration,
    pub seed: u64,
    /// After a submit, wait for the proposal and commit it (or reject it when its
    /// validation accuracy fell by more than `reject_below` points).
    pub commit: bool,
    pub reject_below: f64,
    /// Longest wait for a proposal.
    pub proposal_timeout: Duration,
    /// Each expert starts a lease every `pace` (zero: as fast as replies come back). The
    /// round trip is then measured from the scheduled start, so a stalled server is not
    /// hidden by late starts.
    pub pace: Duration,
    /// Probability that an expert accepts the image's suggested mark (key A in the client)
    /// instead of painting the ground truth — when the image view has one that looks right
    /// to them: red IoU with the ground truth at least `accept_min_iou`.
    pub accept: f64,
    pub accept_min_iou: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            experts: 4,
            profiles: Vec::new(),
            leases: 100,
            marks: MarkSource::Synthetic,
            partial: 1.0,
            noise: 0.0,
            skip_rate: 0.0,
            abandon_rate: 0.0,
            heartbeat: true,
            think: Duration::ZERO,
            stop_when_empty: true,
            retry_for: Duration::from_secs(60),
            seed: 0,
            commit: false,
            reject_below: 0.05,
            proposal_timeout: Duration::from_secs(300),
            pace: Duration::ZERO,
            accept: 0.0,
            accept_min_iou: 0.5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Submitted,
    Skipped,
    Abandoned,
    Failed,
}

#[derive(Debug, Clone)]
pub struct LeaseEvent {
    pub expert: usize,
    pub image_id: String,
    pub lease_id: String,
    pub lease_seq: u64,
    /// Known for submits and skips; abandoned leases are released by expiry on the server.
    pub release_seq: Option<u64>,
    pub outcome: Outcome,
    /// Lease request to submit reply.
    pub round_trip: Duration,
    pub mark_id: Option<String>,
    pub proposal_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub error: Option<String>,
    /// Final proposal status seen (with `commit`): committed, rejected, ready, failed...
    pub decision: Option<String>,
    /// Submit to proposal ready.
    pub proposal_latency: Option<Duration>,
    /// Pixels the expert painted by hand (red + green).
    pub painted: usize,
    /// Pixels taken over from an accepted suggestion (0 when none was accepted).
    pub accepted: usize,
    /// The image view carried a suggested mark.
    pub suggested: bool,
    /// With overlap: this mark completed the image's set, the marks agreed, and this is what
    /// became of the merged mark's proposal.
    pub settled_decision: Option<String>,
    /// With overlap: this mark completed the image's set and the marks disagreed.
    pub in_review: bool,
}

/// Simulated expert time: looking at an image, then accepting a suggestion or painting.
#[derive(Debug, Clone, Copy)]
pub struct ExpertTime {
    pub look_s: f64,
    pub accept_s: f64,
    pub per_painted_pixel_s: f64,
}

impl Default for ExpertTime {
    /// 5 s to look, 1 s to accept (one key), 0.05 s per painted pixel (a brush stroke covers
    /// a few pixels; a 36x36 image's digit and sticker take about 7 s).
    fn default() -> Self {
        ExpertTime {
            look_s: 5.0,
            accept_s: 1.0,
            per_painted_pixel_s: 0.05,
        }
    }
}

impl ExpertTime {
    pub fn seconds(&self, e: &LeaseEvent) -> f64 {
        if e.outcome != Outcome::Submitted {
            return self.look_s;
        }
        self.look_s
            + if e.accepted > 0 { self.accept_s } else { 0.0 }
            + self.per_painted_pixel_s * e.painted as f64
    }
}

#[derive(Debug, Default)]
pub struct SimReport {
    pub events: Vec<LeaseEvent>,
    pub elapsed: Duration,
    /// Statuses other than the expected ones, with the operation.
    pub errors: Vec<String>,
    /// Transient failures that were retried.
    pub retries: usize,
}

impl SimReport {
    pub fn count(&self, o: Outcome) -> usize {
        self.events.iter().filter(|e| e.outcome == o).count()
    }
}

/// Splitmix64 for the experts' choices.
pub struct Dice(pub u64);

impl Dice {
    /// Uniform in [0, 1).
    pub fn roll(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Reads a mark PNG into values (+1 red, -1 green, 0).
pub fn read_mark_png(path: &std::path::Path) -> Result<(u32, u32, Vec<i8>), String> {
    let img = image::open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let v = img
        .pixels()
        .map(|p| {
            if p[0] > 127 {
                1
            } else if p[1] > 127 {
                -1
            } else {
                0
            }
        })
        .collect();
    Ok((w, h, v))
}

fn synthetic(w: u32, h: u32) -> Vec<i8> {
    let mut v = vec![0i8; (w * h) as usize];
    for y in 0..(h / 2).max(1) {
        for x in 0..(w / 2).max(1) {
            v[(y * w + x) as usize] = 1;
        }
    }
    v
}

fn degrade(values: &mut [i8], partial: f64, noise: f64, dice: &mut Dice) {
    for v in values.iter_mut() {
        if *v != 0 && partial < 1.0 && dice.roll() >= partial {
            *v = 0;
        }
        if *v != 0 && noise > 0.0 && dice.roll() < noise {
            *v = -*v;
        }
    }
    if values.iter().all(|&v| v == 0) && !values.is_empty() {
        values[0] = 1; // never send an empty mark
    }
}

/// IoU of the red pixels of two masks (1 when neither has any).
pub fn red_iou(a: &[i8], b: &[i8]) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        inter += (x > 0 && y > 0) as usize;
        union += (x > 0 || y > 0) as usize;
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Calls `f` until it succeeds, fails permanently, or `retry_for` runs out.
async fn retry<T, F, Fut>(retry_for: Duration, retries: &AtomicUsize, mut f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let start = Instant::now();
    let mut wait = Duration::from_millis(20);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(s) if transient(&s) && start.elapsed() < retry_for => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(500));
            }
            Err(s) => return Err(s),
        }
    }
}

/// Runs `cfg.experts` experts, each with its own client (token), until `cfg.leases` leases
/// were granted in total.
pub async fn run(clients: Vec<Client>, cfg: SimConfig) -> SimReport {
    let granted = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (k, client) in clients.into_iter().enumerate() {
        let cfg = cfg.clone();
        let granted = granted.clone();
        let retries = retries.clone();
        tasks.push(tokio::spawn(async move {
            expert(k, client, cfg, granted, retries).await
        }));
    }
    let mut report = SimReport::default();
    for t in tasks {
        if let Ok((events, errors)) = t.await {
            report.events.extend(events);
            report.errors.extend(errors);
        }
    }
    report.elapsed = start.elapsed();
    report.retries = retries.load(Ordering::Relaxed);
    report
}

async fn expert(
    k: usize,
    mut c: Client,
    cfg: SimConfig,
    granted: Arc<AtomicUsize>,
    retries: Arc<AtomicUsize>,
) -> (Vec<LeaseEvent>, Vec<String>) {
    let mut dice = Dice(cfg.seed ^ (k as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut events = Vec::new();
    let mut errors = Vec::new();
    // Experts' schedules are spread evenly over one pace interval.
    let mut next = Instant::now() + cfg.pace.mul_f64(k as f64 / cfg.experts.max(1) as f64);
    while granted.load(Ordering::SeqCst) < cfg.leases {
        let t0 = if cfg.pace.is_zero() {
            Instant::now()
        } else {
            tokio::time::sleep_until(next.into()).await;
            let scheduled = next;
            next += cfg.pace;
            scheduled
        };
        let reply = retry(cfg.retry_for, &retries, || {
            let mut q = c.queue.clone();
            async move { q.lease(pb::LeaseRequest {}).await.map(|r| r.into_inner()) }
        })
        .await;
        let lease = match reply {
            Ok(pb::LeaseReply { lease: Some(l), .. }) => l,
            Ok(r) => {
                if cfg.stop_when_empty {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(
                    r.retry_after_ms.clamp(10, 1000) as u64
                ))
                .await;
                continue;
            }
            // Holding the most leases an expert may: a lease whose reply was lost (a gateway
            // killed mid-call) still counts until it expires. Wait for that.
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(s) => {
                errors.push(format!("lease: {s}"));
                break;
            }
        };
        if granted.fetch_add(1, Ordering::SeqCst) >= cfg.leases {
            // Over the total: give it back.
            let _ = c
                .queue
                .skip(pb::SkipRequest {
                    lease_id: lease.lease_id.clone(),
                })
                .await;
            break;
        }
        let mut ev = LeaseEvent {
            expert: k,
            image_id: lease.image_id.clone(),
            lease_id: lease.lease_id.clone(),
            lease_seq: lease.lease_seq,
            release_seq: None,
            outcome: Outcome::Abandoned,
            round_trip: Duration::ZERO,
            mark_id: None,
            proposal_id: None,
            idempotency_key: None,
            error: None,
            decision: None,
            proposal_latency: None,
            painted: 0,
            accepted: 0,
            suggested: false,
            settled_decision: None,
            in_review: false,
        };
        if !cfg.think.is_zero() {
            tokio::time::sleep(cfg.think).await;
        }
        let roll = dice.roll();
        if roll < cfg.abandon_rate {
            events.push(ev);
            continue;
        }
        if cfg.heartbeat {
            let id = lease.lease_id.clone();
            if let Err(s) = retry(cfg.retry_for, &retries, || {
                let mut q = c.queue.clone();
                let id = id.clone();
                async move { q.heartbeat(pb::HeartbeatRequest { lease_id: id }).await }
            })
            .await
            {
                ev.outcome = Outcome::Failed;
                ev.error = Some(format!("heartbeat: {s}"));
                errors.push(format!("heartbeat: {s}"));
                events.push(ev);
                continue;
            }
        }
        if roll < cfg.abandon_rate + cfg.skip_rate {
            let id = lease.lease_id.clone();
            match retry(cfg.retry_for, &retries, || {
                let mut q = c.queue.clone();
                let id = id.clone();
                async move { q.skip(pb::SkipRequest { lease_id: id }).await }
            })
            .await
            {
                Ok(r) => {
                    ev.outcome = Outcome::Skipped;
                    ev.release_seq = Some(r.into_inner().release_seq);
                }
                Err(s) => {
                    ev.outcome = Outcome::Failed;
                    ev.error = Some(format!("skip: {s}"));
                    errors.push(format!("skip: {s}"));
                }
            }
            events.push(ev);
            continue;
        }
        let (w, h) = (lease.width, lease.height);
        let mut values = truth(&cfg.marks, &lease.image_id, w, h).unwrap_or_else(|e| {
            errors.push(e);
            synthetic(w, h)
        });
        let profile = cfg
            .profiles
            .get(k % cfg.profiles.len().max(1))
            .copied()
            .unwrap_or(Profile::Careful);
        values = profile_mark(profile, &values, w, h, &mut dice);
        degrade(&mut values, cfg.partial, cfg.noise, &mut dice);
        // The image view, as the client shows it: does it carry a suggestion worth taking?
        if cfg.accept > 0.0 {
            let req = pb::GetImageRequest {
                image_id: lease.image_id.clone(),
                model_version: lease.model_version,
            };
            let view = retry(cfg.retry_for, &retries, || {
                let mut i = c.images.clone();
                let req = req.clone();
                async move { i.get_image(req).await.map(|r| r.into_inner()) }
            })
            .await;
            match view {
                Ok(v) => {
                    let suggested = v
                        .suggestion
                        .as_ref()
                        .and_then(|s| s.mask.as_ref())
                        .and_then(|m| rle::decode(m).ok())
                        .filter(|s| s.len() == values.len() && s.iter().any(|&x| x != 0));
                    ev.suggested = suggested.is_some();
                    if let Some(s) = suggested {
                        let take =
                            dice.roll() < cfg.accept && red_iou(&s, &values) >= cfg.accept_min_iou;
                        if take {
                            ev.accepted = s.iter().filter(|&&x| x != 0).count();
                            values = s;
                        }
                    }
                }
                Err(s) => errors.push(format!("get image: {s}")),
            }
        }
        if ev.accepted == 0 {
            ev.painted = values.iter().filter(|&&x| x != 0).count();
        }
        let mask = rle::encode(w, h, &values);
        let key = random_key();
        let id = lease.lease_id.clone();
        let r = retry(cfg.retry_for, &retries, || {
            let mut q = c.queue.clone();
            let req = pb::SubmitRequest {
                lease_id: id.clone(),
                mask: Some(mask.clone()),
                idempotency_key: key.clone(),
            };
            async move { q.submit(req).await }
        })
        .await;
        ev.idempotency_key = Some(key);
        match r {
            Ok(r) => {
                let r = r.into_inner();
                ev.outcome = Outcome::Submitted;
                ev.release_seq = Some(r.release_seq);
                ev.mark_id = Some(r.mark_id);
                ev.proposal_id = Some(r.proposal_id.clone());
                ev.round_trip = t0.elapsed();
                if cfg.commit {
                    let t1 = Instant::now();
                    match decide(&c, &r.proposal_id, &cfg).await {
                        Ok(d) => {
                            ev.proposal_latency = Some(t1.elapsed());
                            ev.decision = Some(d);
                        }
                        Err(e) => {
                            ev.decision = Some("error".into());
                            errors.push(format!("proposal {}: {e}", r.proposal_id));
                        }
                    }
                    // This mark completed the image's set and the marks agreed: the merged
                    // mark's proposal is this expert's to decide.
                    if !r.settled_proposal_id.is_empty() {
                        ev.settled_decision = Some(
                            decide(&c, &r.settled_proposal_id, &cfg)
                                .await
                                .unwrap_or_else(|e| {
                                    errors.push(format!("proposal {}: {e}", r.settled_proposal_id));
                                    "error".into()
                                }),
                        );
                    }
                }
                ev.in_review = r.in_review;
            }
            Err(s) => {
                ev.outcome = Outcome::Failed;
                ev.error = Some(format!("submit: {s}"));
                errors.push(format!("submit: {s}"));
            }
        }
        events.push(ev);
        // keep the borrow checker honest about `c` living across awaits
        let _ = &mut c;
    }
    (events, errors)
}

/// The ground-truth mark of image `id` (w×h) from `source`.
pub fn truth(source: &MarkSource, id: &str, w: u32, h: u32) -> Result<Vec<i8>, String> {
    match source {
        MarkSource::Synthetic => Ok(synthetic(w, h)),
        MarkSource::Folder(root) => {
            match read_mark_png(&root.join("marks").join(format!("{id}.png")))? {
                (mw, mh, v) if (mw, mh) == (w, h) => Ok(v),
                (mw, mh, _) => Err(format!("mark for {id} is {mw}x{mh}, image {w}x{h}")),
            }
        }
    }
}

/// Waits for a proposal to be ready, then commits it (or rejects it when validation
/// accuracy fell by more than `reject_below`); returns the final status word (`endorsed`
/// for a provisional proposal, which a commit only endorses).
async fn decide(c: &Client, proposal_id: &str, cfg: &SimConfig) -> Result<String, Status> {
    use pb::ProposalStatus as S;
    let start = Instant::now();
    let mut stream = c
        .proposals
        .clone()
        .watch_proposal(pb::GetProposalRequest {
            proposal_id: proposal_id.into(),
        })
        .await?
        .into_inner();
    loop {
        let next = tokio::time::timeout(
            cfg.proposal_timeout.saturating_sub(start.elapsed()),
            stream.message(),
        )
        .await;
        let p = match next {
            Err(_) => return Err(Status::deadline_exceeded("proposal not ready in time")),
            Ok(Err(s)) if transient(&s) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                stream = c
                    .proposals
                    .clone()
                    .watch_proposal(pb::GetProposalRequest {
                        proposal_id: proposal_id.into(),
                    })
                    .await?
                    .into_inner();
                continue;
            }
            Ok(Err(s)) => return Err(s),
            Ok(Ok(None)) => return Ok("ended".into()),
            Ok(Ok(Some(p))) => p,
        };
        match S::try_from(p.status).unwrap_or(S::Unspecified) {
            S::Ready => {
                let worse = p.val_accuracy_before - p.val_accuracy_after > cfg.reject_below;
                let decision = if worse {
                    pb::decide_request::Decision::Reject
                } else {
                    pb::decide_request::Decision::Commit
                };
                let r = c
                    .proposals
                    .clone()
                    .decide(pb::DecideRequest {
                        proposal_id: proposal_id.into(),
                        decision: decision as i32,
                    })
                    .await?
                    .into_inner();
                if worse {
                    return Ok("rejected".into());
                }
                match S::try_from(r.status).unwrap_or(S::Unspecified) {
                    S::Committed => return Ok("committed".into()),
                    S::Endorsed => return Ok("endorsed".into()),
                    _ => {}
                }
            }
            S::Committed => return Ok("committed".into()),
            S::Endorsed => return Ok("endorsed".into()),
            S::Rejected => return Ok("rejected".into()),
            S::Failed => return Ok(format!("failed: {}", p.message)),
            _ => {}
        }
    }
}

/// What a simulated reviewer did.
#[derive(Debug, Default)]
pub struct ReviewReport {
    /// (image, how it was settled, the settled proposal's final status word).
    pub settled: Vec<(String, String, String)>,
    pub errors: Vec<String>,
}

/// A simulated reviewer: leases review items until `done` is set (the experts finished) and
/// none came for `idle`, and settles each
/// the way a senior expert with the ground truth at hand would — it accepts the expert's mark
/// closest to the truth (red IoU), or the majority when none overlaps the truth's red — then
/// (with `cfg.commit`) decides the settled proposal as the experts do theirs.
pub async fn review(
    c: Client,
    cfg: SimConfig,
    done: Arc<std::sync::atomic::AtomicBool>,
    idle: Duration,
) -> ReviewReport {
    use pb::settle_request::Method;
    let mut report = ReviewReport::default();
    let retries = AtomicUsize::new(0);
    let mut quiet_since = Instant::now();
    loop {
        let item = retry(cfg.retry_for, &retries, || {
            let mut q = c.queue.clone();
            async move {
                q.lease_review(pb::LeaseReviewRequest {})
                    .await
                    .map(|r| r.into_inner().item)
            }
        })
        .await;
        let item = match item {
            Ok(Some(i)) => i,
            Ok(None) => {
                if !done.load(Ordering::SeqCst) {
                    quiet_since = Instant::now();
                } else if quiet_since.elapsed() >= idle {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(s) => {
                report.errors.push(format!("lease review: {s}"));
                break;
            }
        };
        let t = truth(&cfg.marks, &item.image_id, item.width, item.height);
        let best = t.as_ref().ok().and_then(|t| {
            item.marks
                .iter()
                .filter_map(|m| {
                    let v = rle::decode(m.mask.as_ref()?).ok()?;
                    Some((red_iou(&v, t), m.mark_id.clone()))
                })
                .filter(|(iou, _)| *iou > 0.0)
                .max_by(|a, b| a.0.total_cmp(&b.0))
        });
        let (method, accept, how) = match best {
            Some((_, id)) => (Method::Accept, id, "accept"),
            None => (Method::Majority, String::new(), "majority"),
        };
        let r = c
            .queue
            .clone()
            .settle(pb::SettleRequest {
                review_lease_id: item.review_lease_id.clone(),
                method: method as i32,
                accept_mark_id: accept,
                mask: None,
            })
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                let status = if r.proposal_id.is_empty() {
                    "nothing to learn".to_string()
                } else if cfg.commit {
                    decide(&c, &r.proposal_id, &cfg)
                        .await
                        .unwrap_or_else(|e| format!("error: {e}"))
                } else {
                    "queued".to_string()
                };
                report
                    .settled
                    .push((item.image_id.clone(), how.to_string(), status));
            }
            Err(s) => report.errors.push(format!("settle {}: {s}", item.image_id)),
        }
        quiet_since = Instant::now();
    }
    report
}

#[cfg(test)]
mod profile_tests {
    use super::*;

    #[test]
    fn profiles_mark_as_described() {
        assert_eq!(
            parse_mix("careful=2, sloppy, adversarial=1").unwrap(),
            vec![
                Profile::Careful,
                Profile::Careful,
                Profile::Sloppy,
                Profile::Adversarial
            ]
        );
        assert!(parse_mix("lazy").is_err() && parse_mix("careful=x").is_err());
        // An 8×8 truth: a red 4×4 block, a green pixel row.
        let (w, h) = (8u32, 8u32);
        let mut truth = vec![0i8; 64];
        for y in 2..6 {
            for x in 2..6 {
                truth[y * 8 + x] = 1;
            }
        }
        truth[7 * 8..].iter_mut().for_each(|v| *v = -1);
        let mut dice = Dice(1);
        assert_eq!(
            profile_mark(Profile::Careful, &truth, w, h, &mut dice),
            truth
        );
        let adv = profile_mark(Profile::Adversarial, &truth, w, h, &mut dice);
        assert!(adv.iter().zip(&truth).all(|(a, t)| *a == -*t));
        // Sloppy: off the outline, and partial — its red IoU with the truth well below 1.
        let mut ious = Vec::new();
        for seed in 0..20 {
            let mut dice = Dice(seed);
            let s = profile_mark(Profile::Sloppy, &truth, w, h, &mut dice);
            assert!(s.iter().any(|&v| v != 0));
            ious.push(red_iou(&s, &truth));
        }
        assert!(ious.iter().all(|&i| i < 0.8), "{ious:?}");
        assert!(ious.iter().any(|&i| i > 0.0), "{ious:?}");
        // Growing and shrinking by one pixel.
        let grown = step(&truth, 8, 8, true);
        assert_eq!(grown.iter().filter(|&&v| v == 1).count(), 16 + 16);
        let shrunk = step(&truth, 8, 8, false);
        assert_eq!(shrunk.iter().filter(|&&v| v == 1).count(), 4);
    }
}
