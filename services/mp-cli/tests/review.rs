//! Review through a real gateway and redis-server (issue 13, item 3): with overlap, agreeing
//! marks are merged by majority when the last of them arrives, disagreeing ones wait for a
//! reviewer, who settles them; the experts' own proposals only endorse; a crash before
//! settlement is caught by the gateway's sweep; every bad settle request gets its status.

use mp_api::sim::{self, Outcome, Profile, SimConfig};
use mp_api::Client;
use mp_proto::rle;
use mp_proto::v1 as pb;
use mp_store::server::RedisServer;
use mp_store::Store;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

const SIDE: u32 = mp_e2e::PROJECT_SIDE;

async fn reviewer(addr: &str, admin: &str, name: &str) -> Client {
    let a = Client::new(addr, admin).unwrap();
    let r = mp_api::create_expert(&a, name, "reviewer", Duration::from_secs(10))
        .await
        .unwrap();
    Client::new(addr, &r.token).unwrap()
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.expect_err("expected an error status").code()
}

/// Two careful experts agree on four images (settled by majority as the second mark
/// arrives, the settled proposal handed to that expert); a careful and an adversarial one
/// disagree on four (sent to review); a reviewer settles those by accepting the careful mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agreeing_marks_merge_disagreeing_ones_go_to_a_reviewer_who_settles_them() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let ck = dir.path().join("ck");
    let admin = mp_e2e::platform_project(&store, 8, &ck).await;
    store.set_overlap(2).await.unwrap();
    let gw = mp_e2e::TestGateway::start(mp_gateway::GatewayConfig {
        reaper_interval_ms: 100,
        ..mp_e2e::gateway_config(&redis.url(), &ck)
    })
    .await;
    let truth = sim::truth(&sim::MarkSource::Synthetic, "", SIDE, SIDE).unwrap();
    let careful = mp_e2e::expert(&gw.addr, &admin, "careful").await;
    let careful2 = mp_e2e::expert(&gw.addr, &admin, "careful2").await;
    let adversary = mp_e2e::expert(&gw.addr, &admin, "adversary").await;
    let cfg = |profiles: Vec<Profile>, leases: usize| SimConfig {
        experts: profiles.len(),
        profiles,
        leases,
        stop_when_empty: true,
        retry_for: Duration::from_secs(20),
        ..Default::default()
    };
    // The careful expert marks all eight first; then the second careful one takes four,
    // the adversary the other four.
    let r = sim::run(vec![careful.clone()], cfg(vec![Profile::Careful], 8)).await;
    assert_eq!(r.count(Outcome::Submitted), 8, "{:?}", r.errors);
    let r2 = sim::run(vec![careful2.clone()], cfg(vec![Profile::Careful], 4)).await;
    let r3 = sim::run(vec![adversary.clone()], cfg(vec![Profile::Adversarial], 4)).await;
    assert_eq!(r2.count(Outcome::Submitted), 4, "{:?}", r2.errors);
    assert_eq!(r3.count(Outcome::Submitted), 4, "{:?}", r3.errors);

    // Every mark is provisional: its own proposal can be endorsed, not committed.
    let p0 = r.events[0].proposal_id.clone().unwrap();
    store.update_proposal(&p0, "ready", &[]).await.unwrap();
    let d = careful
        .proposals
        .clone()
        .decide(pb::DecideRequest {
            proposal_id: p0.clone(),
            decision: pb::decide_request::Decision::Commit as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.status, pb::ProposalStatus::Endorsed as i32);
    assert!(d.provisional);

    // The agreeing images were settled as their second mark arrived: the proposal of the
    // merged mark went to the second careful expert, who may commit it.
    let stats = |c: &Client| {
        let mut s = c.stats.clone();
        async move { s.get_stats(pb::StatsRequest {}).await.unwrap().into_inner() }
    };
    let a = Client::new(&gw.addr, &admin).unwrap();
    let s = stats(&a).await;
    assert_eq!(
        (
            s.overlap,
            s.review_settled,
            s.review_queued,
            s.review_unsettled
        ),
        (2, 4, 4, 0)
    );
    for id in store.review_queue(10).await.unwrap().iter().map(|(i, _)| i) {
        assert!(r3.events.iter().any(|e| &e.image_id == id));
    }
    for e in &r2.events {
        let m = store.settled_mark_of(&e.image_id).await.unwrap().unwrap();
        let m = store.mark(&m).await.unwrap();
        assert_eq!(m.values, truth, "the majority of two identical marks");
        let p = careful2
            .proposals
            .clone()
            .get_proposal(pb::GetProposalRequest {
                proposal_id: m.proposal_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(p.settled && !p.provisional);
    }

    // Review: experts may not; the reviewer gets the least agreeing image with both marks.
    assert_eq!(
        code(
            careful
                .queue
                .clone()
                .lease_review(pb::LeaseReviewRequest {})
                .await
        ),
        Code::PermissionDenied
    );
    let rev = reviewer(&gw.addr, &admin, "rev").await;
    let rev2 = reviewer(&gw.addr, &admin, "rev2").await;
    let item = rev
        .queue
        .clone()
        .lease_review(pb::LeaseReviewRequest {})
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(item.marks.len(), 2);
    assert!(
        item.kappa < mp_store::DEFAULT_REVIEW_BELOW,
        "{}",
        item.kappa
    );
    let names: Vec<&str> = item.marks.iter().map(|m| m.expert_name.as_str()).collect();
    assert!(
        names.contains(&"careful") && names.contains(&"adversary"),
        "{names:?}"
    );
    // The reviewer may see the image it reviews; the other reviewer may not, nor settle it.
    rev.images
        .clone()
        .get_image(pb::GetImageRequest {
            image_id: item.image_id.clone(),
            model_version: 0,
        })
        .await
        .unwrap();
    assert_eq!(
        code(
            rev2.images
                .clone()
                .get_image(pb::GetImageRequest {
                    image_id: item.image_id.clone(),
                    model_version: 0,
                })
                .await
        ),
        Code::PermissionDenied
    );
    let settle = |c: &Client, method: pb::settle_request::Method, accept: &str, mask| {
        let mut q = c.queue.clone();
        let req = pb::SettleRequest {
            review_lease_id: item.review_lease_id.clone(),
            method: method as i32,
            accept_mark_id: accept.into(),
            mask,
        };
        async move { q.settle(req).await }
    };
    use pb::settle_request::Method;
    assert_eq!(
        code(settle(&rev2, Method::Majority, "", None).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(settle(&rev, Method::Unspecified, "", None).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(settle(&rev, Method::Accept, "not-a-mark", None).await),
        Code::InvalidArgument
    );
    let small = rle::encode(2, 2, &[1, 0, 0, 0]);
    assert_eq!(
        code(settle(&rev, Method::Own, "", Some(small)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            rev.queue
                .clone()
                .settle(pb::SettleRequest {
                    review_lease_id: "0123456789abcdef0123456789abcdef".into(),
                    method: Method::Majority as i32,
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );
    let good = item
        .marks
        .iter()
        .find(|m| m.expert_name == "careful")
        .unwrap();
    let done = settle(&rev, Method::Accept, &good.mark_id, None)
        .await
        .unwrap()
        .into_inner();
    assert!(!done.duplicate && !done.proposal_id.is_empty());
    let again = settle(&rev, Method::Majority, "", None)
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate && again.mark_id == done.mark_id);
    let m = store.mark(&done.mark_id).await.unwrap();
    assert_eq!(m.values, truth);

    // The simulated reviewer settles the other three the same way.
    let report = sim::review(
        rev2.clone(),
        cfg(vec![], 0),
        Arc::new(AtomicBool::new(true)),
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(report.settled.len(), 3, "{:?}", report.errors);
    assert!(report.settled.iter().all(|(_, how, _)| how == "accept"));
    for (image, _, _) in &report.settled {
        let m = store.settled_mark_of(image).await.unwrap().unwrap();
        assert_eq!(store.mark(&m).await.unwrap().values, truth, "{image}");
    }
    let s = stats(&a).await;
    assert_eq!(
        (s.review_settled, s.review_queued, s.review_leased),
        (8, 0, 0)
    );
    // Each settlement is in the audit trail.
    let audit = store
        .audit(&mp_store::AuditFilter::default())
        .await
        .unwrap();
    assert_eq!(audit.iter().filter(|r| r.kind == "settle").count(), 8);
    assert_eq!(
        audit.iter().filter(|r| r.kind == "review_queued").count(),
        4
    );
    gw.stop().await;
}

/// A gateway that died between the last mark and the settlement (here: marks stored
/// straight into Redis, as such a gateway would have left them) is covered by the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_settles_images_a_crash_left_unsettled() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_free(&dir.path().join("redis")).unwrap();
    let store = Store::connect(&redis.url(), "mp").await.unwrap();
    let ck = dir.path().join("ck");
    mp_e2e::platform_project(&store, 2, &ck).await;
    store.set_overlap(2).await.unwrap();
    let mut v = vec![0i8; (SIDE * SIDE) as usize];
    v[..8].iter_mut().for_each(|x| *x = 1);
    for name in ["x", "y"] {
        let (e, _) = store
            .create_expert(name, mp_store::Role::Expert)
            .await
            .unwrap();
        for k in 0..2 {
            let l = store.lease(&e, 30_000).await.unwrap().unwrap();
            store
                .submit(&l.lease_id, &e, &format!("{name}{k}"), SIDE, SIDE, &v)
                .await
                .unwrap();
        }
    }
    assert_eq!(store.unsettled().await.unwrap().len(), 2);
    let gw = mp_e2e::TestGateway::start(mp_gateway::GatewayConfig {
        reaper_interval_ms: 100,
        ..mp_e2e::gateway_config(&redis.url(), &ck)
    })
    .await;
    let t = std::time::Instant::now();
    while !store.unsettled().await.unwrap().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "the sweep never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = store.review_counts().await.unwrap();
    assert_eq!((c.settled, c.queued), (2, 0));
    gw.stop().await;
}
