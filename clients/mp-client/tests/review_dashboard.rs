//! The review screen and the lead's dashboard driven headless with egui_kittest: clicks go
//! in as a reviewer's, what comes out is the exact command the network thread would send.

use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use mp_client::app::{Review, Tab};
use mp_client::settings::Store;
use mp_client::{ClientApp, Cmd, Net, NetEnd, Reply};
use mp_proto::v1 as pb;

const W: u32 = 12;
const H: u32 = 8;

fn view(image_id: &str) -> pb::ImageView {
    pb::ImageView {
        image_id: image_id.into(),
        name: format!("{image_id}.png"),
        width: W,
        height: H,
        channels: 1,
        pixels: (0..W * H).map(|i| (i * 9 % 256) as u8).collect(),
        model_version: 1,
        classes: vec!["a".into(), "b".into()],
        ..Default::default()
    }
}

/// A mark that paints `value` over columns `x0..x1`.
fn mark(
    id: &str,
    name: &str,
    x0: u32,
    x1: u32,
    value: i8,
    status: pb::ProposalStatus,
) -> pb::ReviewMark {
    let v: Vec<i8> = (0..W * H)
        .map(|i| {
            if (x0..x1).contains(&(i % W)) {
                value
            } else {
                0
            }
        })
        .collect();
    pb::ReviewMark {
        mark_id: id.into(),
        expert_id: format!("id-{name}"),
        expert_name: name.into(),
        mask: Some(mp_proto::rle::encode(W, H, &v)),
        proposal_status: status as i32,
        val_accuracy_before: 0.9,
        val_accuracy_after: 0.88,
    }
}

fn client() -> (Harness<'static, ClientApp>, NetEnd) {
    let (net, end) = Net::pair();
    let mut app = ClientApp::new(net, Default::default(), Store::Nowhere);
    app.on_reply(Reply::Connected {
        addr: "http://gateway".into(),
        whoami: "rev".into(),
    });
    let h = Harness::builder()
        .with_size([1100.0, 760.0])
        .build_ui_state(|ui, app: &mut ClientApp| app.ui(ui), app);
    (h, end)
}

fn sent(end: &mut NetEnd) -> Vec<Cmd> {
    let mut out = Vec::new();
    while let Ok(c) = end.cmds.try_recv() {
        out.push(c);
    }
    out
}

fn settles(cmds: &[Cmd]) -> Vec<pb::SettleRequest> {
    cmds.iter()
        .filter_map(|c| match c {
            Cmd::Settle(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// Opens the review tab and hands it an item with two disagreeing marks.
fn reviewing() -> (Harness<'static, ClientApp>, NetEnd) {
    let (mut h, mut end) = client();
    h.step();
    h.get_by_label("Review").click();
    h.step();
    assert_eq!(h.state().tab, Tab::Review);
    assert!(sent(&mut end).contains(&Cmd::LeaseReview));
    let item = pb::ReviewItem {
        review_lease_id: "rl1".into(),
        image_id: "a/7".into(),
        kappa: 0.12,
        deadline_ms: 0,
        width: W,
        height: H,
        marks: vec![
            mark("m1", "ann", 0, 4, 1, pb::ProposalStatus::Endorsed),
            mark("m2", "bob", 6, 10, 1, pb::ProposalStatus::Ready),
        ],
    };
    h.state_mut()
        .on_reply(Reply::ReviewLeased(Some(Box::new((item, view("a/7"))))));
    h.step();
    h.step();
    (h, end)
}

#[test]
fn the_review_screen_shows_each_mark_and_settles_by_the_button_clicked() {
    let (mut h, mut end) = reviewing();
    h.get_by_label_contains("agreement κ 0.12");
    h.get_by_label("ann");
    h.get_by_label("bob");
    h.get_by_label("endorsed by its expert");
    h.get_by_label("its expert has not decided");
    // Accept bob's mark: the second "Accept this mark".
    let buttons: Vec<_> = h.query_all_by_label("Accept this mark").collect();
    assert_eq!(buttons.len(), 2);
    buttons[1].click();
    h.step();
    let s = settles(&sent(&mut end));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].method, pb::settle_request::Method::Accept as i32);
    assert_eq!(
        (s[0].review_lease_id.as_str(), s[0].accept_mark_id.as_str()),
        ("rl1", "m2")
    );
    assert!(matches!(h.state().review, Review::Settling(_)));
    h.state_mut().on_reply(Reply::Settled(pb::SettleReply {
        mark_id: "s1".into(),
        proposal_id: "p9".into(),
        duplicate: false,
    }));
    h.step();
    h.get_by_label_contains("settled: accepted one expert's mark");
    h.get_by_label_contains("proposal p9 is yours");
    // The settled mark's proposal is watched, and decided here once ready.
    assert!(sent(&mut end).contains(&Cmd::Watch {
        proposal_id: "p9".into()
    }));
    h.state_mut().on_reply(Reply::Proposal(pb::Proposal {
        proposal_id: "p9".into(),
        status: pb::ProposalStatus::Ready as i32,
        val_accuracy_before: 0.9,
        val_accuracy_after: 0.93,
        ..Default::default()
    }));
    h.step();
    h.get_by_label_contains("90.0 % before, 93.0 % after");
    h.get_by_label("Commit the settled mark").click();
    h.step();
    assert!(sent(&mut end).contains(&Cmd::Decide {
        proposal_id: "p9".into(),
        commit: true
    }));
    h.get_by_label("Review the next image").click();
    h.step();
    assert!(sent(&mut end).contains(&Cmd::LeaseReview));
}

#[test]
fn majority_and_union_are_previewed_and_sent_and_a_refusal_keeps_the_item() {
    let (mut h, mut end) = reviewing();
    let Review::Open(o) = &h.state().review else {
        panic!("not open")
    };
    // Two marks that do not overlap: no pixel has a majority; the union holds both.
    assert!(o.majority.iter().all(|&v| v == 0));
    assert_eq!(
        o.union_red.iter().filter(|&&v| v == 1).count(),
        (8 * H) as usize
    );
    h.get_by_label("Settle: Union of red").click();
    h.step();
    let s = settles(&sent(&mut end));
    assert_eq!(s[0].method, pb::settle_request::Method::UnionRed as i32);
    // The server refuses (the review lease ran out): back to the item, with its message.
    h.state_mut().on_reply(Reply::Refused {
        what: "settlement",
        message: "review lease rl1 expired".into(),
    });
    h.step();
    assert!(matches!(h.state().review, Review::Open(_)));
    h.get_by_label_contains("review lease rl1 expired");
    h.get_by_label("Settle: Majority").click();
    h.step();
    let s = settles(&sent(&mut end));
    assert_eq!(s[0].method, pb::settle_request::Method::Majority as i32);
}

#[test]
fn an_edit_of_ones_own_is_painted_and_sent_as_own() {
    let (mut h, mut end) = reviewing();
    // From the majority (empty here): settling at once is refused locally.
    h.get_by_label("Edit a mark of my own (from the majority)")
        .click();
    h.step();
    h.step();
    h.get_by_label("Settle with my mark").click();
    h.step();
    h.step();
    assert!(settles(&sent(&mut end)).is_empty());
    h.get_by_label_contains("Mark at least one pixel");
    // Paint in the edit canvas: the last widget painted is its image; drag across it.
    let label = h.get_by_label_contains("drag to paint");
    let below = label.rect().left_bottom() + egui::vec2(20.0, 30.0);
    h.hover_at(below);
    h.drag_at(below);
    h.hover_at(below + egui::vec2(40.0, 0.0));
    h.drop_at(below + egui::vec2(40.0, 0.0));
    h.step();
    h.step();
    h.get_by_label("Settle with my mark").click();
    h.step();
    let s = settles(&sent(&mut end));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].method, pb::settle_request::Method::Own as i32);
    let v = mp_proto::rle::decode(s[0].mask.as_ref().unwrap()).unwrap();
    assert!(v.contains(&1), "the red brush painted nothing");
}

#[test]
fn nothing_to_review_says_so() {
    let (mut h, _end) = client();
    h.step();
    h.get_by_label("Review").click();
    h.step();
    h.state_mut().on_reply(Reply::ReviewLeased(None));
    h.step();
    h.get_by_label_contains("Nothing waits for review");
}

fn figures(k: f64, n: u32) -> Option<pb::AgreementFigures> {
    Some(pb::AgreementFigures {
        red_iou: Some(k),
        green_iou: None,
        kappa: Some(k),
        n,
    })
}

#[test]
fn the_dashboard_shows_accuracy_marks_per_day_agreement_and_the_review_queue() {
    let (mut h, mut end) = client();
    h.step();
    h.get_by_label("Dashboard").click();
    h.step();
    assert!(sent(&mut end).contains(&Cmd::Dashboard));
    let version = |v: u64, acc: f64| pb::ModelVersion {
        version: v,
        val_accuracy: acc,
        test_accuracy: acc - 0.1,
        ..Default::default()
    };
    let rec = |who: &str, t: u64| pb::AuditRecord {
        kind: "mark".into(),
        who: format!("id-{who}"),
        who_name: who.into(),
        time_ms: t,
        ..Default::default()
    };
    let d = mp_client::net::Dashboard {
        stats: pb::Stats {
            queue_depth: 41,
            leases_out: 3,
            review_queued: 5,
            review_leased: 1,
            review_settled: 12,
            overlap: 3,
            accuracy_history: vec![version(1, 0.8), version(2, 0.85), version(3, 0.9)],
            ..Default::default()
        },
        agreement: Ok(pb::AgreementReport {
            overlap: 3,
            overall: figures(0.5, 9),
            pairs: vec![
                pb::PairAgreement {
                    expert_a: "ann".into(),
                    expert_b: "bob".into(),
                    figures: figures(0.81, 6),
                },
                pb::PairAgreement {
                    expert_a: "ann".into(),
                    expert_b: "cy".into(),
                    figures: figures(-0.27, 4),
                },
            ],
            ..Default::default()
        }),
        audit: Ok(pb::AuditReport {
            records: vec![
                rec("ann", 1_795_000_000_000),
                rec("ann", 1_795_000_100_000),
                rec("bob", 1_795_000_000_000),
            ],
            impact: vec![pb::ExpertImpact {
                expert_id: "id-ann".into(),
                name: "ann".into(),
                commits: 2,
                accuracy_delta: 0.031,
            }],
        }),
    };
    h.state_mut().on_reply(Reply::Dashboard(Box::new(d)));
    h.step();
    h.step();
    h.get_by_label("41");
    h.get_by_label_contains("5 waiting for a reviewer, 1 held by one");
    h.get_by_label("Accuracy by model version");
    // The agreement matrix is symmetric: each pair's κ shows twice.
    assert_eq!(h.query_all_by_label("0.81").count(), 2);
    assert_eq!(h.query_all_by_label("-0.27").count(), 2);
    // Marks per expert per day: ann 2 on 11-18, bob 1.
    h.get_by_label("11-18");
    h.get_by_label("+3.10 points");
}

#[test]
fn for_an_expert_the_dashboard_shows_what_it_may_and_says_why_not_the_rest() {
    let (mut h, _end) = client();
    h.step();
    h.get_by_label("Dashboard").click();
    h.step();
    h.state_mut()
        .on_reply(Reply::Dashboard(Box::new(mp_client::net::Dashboard {
            stats: pb::Stats::default(),
            agreement: Err("this call needs the admin role".into()),
            audit: Err("this call needs the admin role".into()),
        })));
    h.step();
    h.get_by_label_contains("agreement is for admins");
    h.get_by_label_contains("the audit trail is for admins");
}
