//! The client's screens driven headless with egui_kittest: pointer drags, keys and button
//! clicks go in as a person's input; what comes out is the exact command the network
//! thread would send. (The same client against a real gateway: `tests/tests/client.rs`.)

use egui::{Key, Modifiers, Pos2};
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use mp_client::app::Work;
use mp_client::mask::{distance_to_segment, Brush};
use mp_client::settings::{Settings, Store};
use mp_client::{ClientApp, Cmd, Net, NetEnd, Reply};
use mp_proto::v1 as pb;
use std::collections::BTreeSet;

const W: u32 = 24;
const H: u32 = 16;

fn view(image_id: &str) -> pb::ImageView {
    pb::ImageView {
        image_id: image_id.into(),
        name: format!("{image_id}.png"),
        width: W,
        height: H,
        channels: 1,
        pixels: (0..W * H).map(|i| (i * 5 % 256) as u8).collect(),
        label: 3,
        label_name: "3".into(),
        prediction: 1,
        prediction_name: "1".into(),
        probabilities: vec![0.05, 0.8, 0.05, 0.1],
        saliency: (0..W * H).map(|i| (i % W) as f32 / W as f32).collect(),
        model_version: 1,
        classes: vec!["0".into(), "1".into(), "2".into(), "3".into()],
        suggestion: None,
    }
}

fn lease(lease_id: &str, image_id: &str) -> pb::Lease {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    pb::Lease {
        lease_id: lease_id.into(),
        image_id: image_id.into(),
        deadline_ms: now + 60_000,
        lease_seq: 1,
        model_version: 1,
        priority: 0.1,
        width: W,
        height: H,
    }
}

/// A connected client showing image `img1` under lease `l1`.
fn marking_client() -> (Harness<'static, ClientApp>, NetEnd) {
    let (net, end) = Net::pair();
    let mut app = ClientApp::new(net, Settings::default(), Store::Nowhere);
    app.on_reply(Reply::Connected {
        addr: "http://gateway".into(),
        whoami: "e1".into(),
    });
    let mut h = Harness::builder()
        .with_size([1000.0, 700.0])
        .build_ui_state(|ui, app: &mut ClientApp| app.ui(ui), app);
    h.state_mut().on_reply(Reply::Leased {
        lease: lease("l1", "img1"),
        view: view("img1"),
    });
    h.step();
    h.step();
    assert!(h.state().marking().is_some());
    (h, end)
}

fn sent(end: &mut NetEnd) -> Vec<Cmd> {
    let mut out = Vec::new();
    while let Ok(c) = end.cmds.try_recv() {
        out.push(c);
    }
    out
}

/// The mask of the one submit among `cmds`, as (x, y) → value.
fn submitted(cmds: &[Cmd]) -> Vec<i8> {
    let masks: Vec<&pb::RleMask> = cmds
        .iter()
        .filter_map(|c| match c {
            Cmd::Submit { mask, .. } => Some(mask),
            _ => None,
        })
        .collect();
    assert_eq!(masks.len(), 1, "expected one submit in {cmds:?}");
    assert_eq!((masks[0].width, masks[0].height), (W, H));
    mp_proto::rle::decode(masks[0]).unwrap()
}

fn painted(values: &[i8], v: i8) -> BTreeSet<(u32, u32)> {
    (0..H)
        .flat_map(|y| (0..W).map(move |x| (x, y)))
        .filter(|&(x, y)| values[(y * W + x) as usize] == v)
        .collect()
}

fn drag(h: &mut Harness<'_, ClientApp>, from: [f32; 2], to: [f32; 2]) {
    let xf = h.state().canvas.expect("canvas drawn");
    let (a, b): (Pos2, Pos2) = (xf.to_screen(from), xf.to_screen(to));
    h.hover_at(a);
    h.drag_at(a);
    h.hover_at(a + (b - a) * 0.5);
    h.hover_at(b);
    h.drop_at(b);
    h.step();
}

#[test]
fn a_drag_sends_exactly_the_pixels_under_the_brush() {
    let (mut h, mut end) = marking_client();
    sent(&mut end);
    // Radius 0: the pixels the pointer crossed, nothing else.
    h.state_mut().settings.radius = 0.0;
    drag(&mut h, [2.5, 5.5], [12.5, 5.5]);
    // A radius of 2.2 image pixels in green, diagonally.
    h.key_press(Key::G);
    h.step();
    assert_eq!(h.state().brush, Brush::Green);
    let scale = h.state().canvas.unwrap().scale;
    h.state_mut().settings.radius = 2.2 * scale;
    let (a, b) = ([15.0, 3.0], [20.0, 11.0]);
    drag(&mut h, a, b);
    h.key_press(Key::Enter);
    h.step();
    let values = submitted(&sent(&mut end));

    let red: BTreeSet<(u32, u32)> = (2..=12).map(|x| (x, 5)).collect();
    let mut green = BTreeSet::new();
    for y in 0..H {
        for x in 0..W {
            let c = [x as f32 + 0.5, y as f32 + 0.5];
            if distance_to_segment(c, a, b) <= 2.2 + 1e-3 {
                green.insert((x, y));
            }
        }
    }
    assert_eq!(painted(&values, 1), red);
    // The boundary of a disc is subject to rounding of the screen transform; allow the
    // pixels within a hair of the radius either way, and nothing further.
    let got = painted(&values, -1);
    for &(x, y) in got.symmetric_difference(&green) {
        let d = distance_to_segment([x as f32 + 0.5, y as f32 + 0.5], a, b);
        assert!((d - 2.2).abs() < 0.02, "pixel {x},{y} at distance {d}");
    }
    assert!(got.len() > 40, "{} green pixels", got.len());
    assert!(matches!(h.state().work, Work::Submitting { .. }));
}

#[test]
fn undo_removes_a_stroke_and_redo_brings_it_back() {
    let (mut h, mut end) = marking_client();
    h.state_mut().settings.radius = 0.0;
    drag(&mut h, [1.5, 1.5], [8.5, 1.5]);
    drag(&mut h, [1.5, 9.5], [8.5, 9.5]);
    // Ctrl+Z undoes the second stroke, the Undo button the first.
    h.key_press_modifiers(Modifiers::COMMAND, Key::Z);
    h.step();
    h.get_by_label("Undo").click();
    h.step();
    assert!(h.state().marking().unwrap().layer.is_empty());
    // Ctrl+Shift+Z redoes the first one.
    h.key_press_modifiers(Modifiers::COMMAND | Modifiers::SHIFT, Key::Z);
    h.step();
    h.key_press(Key::Enter);
    h.step();
    let values = submitted(&sent(&mut end));
    assert_eq!(painted(&values, 1), (1..=8).map(|x| (x, 1)).collect());
}

#[test]
fn an_empty_mask_is_not_sent_and_s_skips() {
    let (mut h, mut end) = marking_client();
    sent(&mut end);
    h.key_press(Key::Enter);
    h.step();
    assert!(sent(&mut end).is_empty());
    assert!(h.state().banner.as_ref().unwrap().text.contains("skip"));
    h.key_press(Key::S);
    h.step();
    assert_eq!(
        sent(&mut end),
        vec![Cmd::Skip {
            lease_id: "l1".into()
        }]
    );
}

fn ready(proposal_id: &str) -> pb::Proposal {
    pb::Proposal {
        proposal_id: proposal_id.into(),
        image_id: "img1".into(),
        status: pb::ProposalStatus::Ready as i32,
        base_version: 1,
        saliency_before: vec![0.5; (W * H) as usize],
        saliency_after: vec![0.2; (W * H) as usize],
        val_accuracy_before: 0.81,
        val_accuracy_after: 0.84,
        val_loss_before: 0.6,
        val_loss_after: 0.5,
        curve: (0..10)
            .map(|i| pb::ImpactPoint {
                iteration: i,
                share_red: 0.5 - 0.04 * i as f64,
                share_green: 0.1 + 0.02 * i as f64,
                saliency_loss: 10.0 - i as f64,
                ..Default::default()
            })
            .collect(),
        width: W,
        height: H,
        stop_reason: "SaliencyHalved".into(),
        ..Default::default()
    }
}

/// Draws, submits, and answers like the gateway: stored, then the proposal is ready.
fn to_chooser(h: &mut Harness<'_, ClientApp>, end: &mut NetEnd, proposal_id: &str) {
    h.state_mut().settings.radius = 0.0;
    drag(h, [3.5, 3.5], [9.5, 3.5]);
    h.key_press(Key::Enter);
    h.step();
    let cmds = sent(end);
    let lease_id = cmds
        .iter()
        .find_map(|c| match c {
            Cmd::Submit { lease_id, .. } => Some(lease_id.clone()),
            _ => None,
        })
        .expect("submit sent");
    h.state_mut().on_reply(Reply::Submitted {
        lease_id,
        reply: pb::SubmitReply {
            proposal_id: proposal_id.into(),
            ..Default::default()
        },
    });
    h.step();
    assert!(h.query_by_label_contains("Mark stored").is_some());
    h.state_mut().on_reply(Reply::Proposal(ready(proposal_id)));
    h.step();
    h.step();
    assert!(h.query_by_label_contains("validation accuracy").is_some());
    assert!(h
        .query_by_label_contains("stopped: saliency halved")
        .is_some());
}

#[test]
fn the_choosers_buttons_send_commit_and_reject() {
    let (mut h, mut end) = marking_client();
    to_chooser(&mut h, &mut end, "p1");
    h.get_by_label("Commit (C)").click();
    h.step();
    assert!(sent(&mut end).contains(&Cmd::Decide {
        proposal_id: "p1".into(),
        commit: true
    }));
    let mut done = ready("p1");
    done.status = pb::ProposalStatus::Committed as i32;
    done.committed_version = 2;
    h.state_mut().on_reply(Reply::Proposal(done));
    h.step();
    assert!(h
        .state()
        .banner
        .as_ref()
        .unwrap()
        .text
        .contains("version 2"));
    // The next image is asked for at once.
    assert!(sent(&mut end).contains(&Cmd::Lease));
    h.state_mut().on_reply(Reply::Leased {
        lease: lease("l2", "img2"),
        view: view("img2"),
    });
    h.step();
    h.step();
    to_chooser(&mut h, &mut end, "p2");
    h.get_by_label("Reject (X)").click();
    h.step();
    assert!(sent(&mut end).contains(&Cmd::Decide {
        proposal_id: "p2".into(),
        commit: false
    }));
}

#[test]
fn lease_expiry_says_so_and_the_drawing_comes_back_with_the_image() {
    let (mut h, mut end) = marking_client();
    h.state_mut().settings.radius = 0.0;
    drag(&mut h, [2.5, 2.5], [6.5, 2.5]);
    let drawn = h.state().marking().unwrap().layer.values().to_vec();
    h.state_mut().on_reply(Reply::LeaseLost {
        lease_id: "l1".into(),
        message: "lease l1 expired; the image went back to the queue".into(),
    });
    h.step();
    assert!(h
        .query_by_label_contains("Your lease on image img1.png expired")
        .is_some());
    assert!(sent(&mut end).contains(&Cmd::Lease));
    // The same image comes back under a new lease: the drawing is restored.
    h.state_mut().on_reply(Reply::Leased {
        lease: lease("l9", "img1"),
        view: view("img1"),
    });
    h.step();
    let m = h.state().marking().expect("marking again");
    assert_eq!(m.lease.lease_id, "l9");
    assert_eq!(m.layer.values(), &drawn[..]);
}

#[test]
fn lost_connection_keeps_the_drawing_and_says_so() {
    let (mut h, mut end) = marking_client();
    h.state_mut().settings.radius = 0.0;
    drag(&mut h, [2.5, 2.5], [6.5, 2.5]);
    h.state_mut().on_reply(Reply::Connection {
        up: false,
        why: "transport error".into(),
    });
    h.step();
    assert!(h.query_by_label_contains("Connection lost").is_some());
    assert!(!h.state().marking().unwrap().layer.is_empty());
    h.state_mut().on_reply(Reply::Connection {
        up: true,
        why: String::new(),
    });
    h.step();
    assert!(h.query_by_label_contains("Connected to").is_some());
    h.key_press(Key::Enter);
    h.step();
    assert_eq!(painted(&submitted(&sent(&mut end)), 1).len(), 5);
}

#[test]
fn a_refused_submit_returns_to_the_drawing_with_the_servers_message() {
    let (mut h, mut end) = marking_client();
    h.state_mut().settings.radius = 0.0;
    drag(&mut h, [2.5, 2.5], [6.5, 2.5]);
    h.key_press(Key::Enter);
    h.step();
    sent(&mut end);
    h.state_mut().on_reply(Reply::Refused {
        what: "submit",
        message: "mask is 3x3 but image img1 is 24x16".into(),
    });
    h.step();
    assert!(h.query_by_label_contains("mask is 3x3").is_some());
    assert!(!h.state().marking().unwrap().layer.is_empty());
}

#[test]
fn zoom_and_pan_move_the_image_and_strokes_still_land_on_the_right_pixels() {
    let (mut h, mut end) = marking_client();
    sent(&mut end);
    let before = h.state().canvas.unwrap();
    // Pinch / Ctrl+wheel zoom around the pointer.
    let centre = before.image_rect.center();
    h.hover_at(centre);
    h.event(egui::Event::Zoom(2.0));
    h.step();
    h.step();
    let zoomed = h.state().canvas.unwrap();
    assert!(
        (zoomed.scale / before.scale - 2.0).abs() < 1e-3,
        "{zoomed:?}"
    );
    // Right-drag pans and paints nothing.
    let a = zoomed.image_rect.center();
    let b = a + egui::vec2(-120.0, -40.0);
    h.hover_at(a);
    h.event(egui::Event::PointerButton {
        pos: a,
        button: egui::PointerButton::Secondary,
        pressed: true,
        modifiers: Modifiers::NONE,
    });
    for k in 1..=6 {
        h.hover_at(a + (b - a) * (k as f32 / 6.0));
    }
    h.event(egui::Event::PointerButton {
        pos: b,
        button: egui::PointerButton::Secondary,
        pressed: false,
        modifiers: Modifiers::NONE,
    });
    h.step();
    h.step();
    let panned = h.state().canvas.unwrap();
    let moved = panned.image_rect.min - zoomed.image_rect.min;
    assert!(
        moved.x < -60.0 && moved.y < -20.0,
        "pan moved the image by {moved:?}"
    );
    assert!(h.state().marking().unwrap().layer.is_empty());
    // A radius-0 stroke on the zoomed, panned image hits exactly the pixels under it.
    h.state_mut().settings.radius = 0.0;
    drag(&mut h, [8.5, 7.5], [14.5, 7.5]);
    h.key_press(Key::Enter);
    h.step();
    let values = submitted(&sent(&mut end));
    assert_eq!(painted(&values, 1), (8..=14).map(|x| (x, 7)).collect());
}

#[test]
fn the_status_bar_counts_and_a_newer_model_is_pointed_out() {
    let (mut h, _end) = marking_client();
    h.state_mut().on_reply(Reply::Stats(pb::Stats {
        queue_depth: 41,
        experts_online: 3,
        marks_per_expert: vec![pb::ExpertCount {
            expert_id: "e1".into(),
            name: "me".into(),
            marks: 7,
        }],
        accuracy_history: vec![
            pb::ModelVersion {
                version: 1,
                ..Default::default()
            },
            pb::ModelVersion {
                version: 3,
                val_accuracy: 0.9,
                ..Default::default()
            },
        ],
        ..Default::default()
    }));
    h.step();
    for text in ["Queue 41", "Experts online 3", "My marks 7", "Model v3"] {
        assert!(h.query_by_label_contains(text).is_some(), "{text}");
    }
    assert!(h.query_by_label_contains("v3 is newer").is_some());
}

/// A suggested mark for the fixture image: red on a 3x2 block, green on one row segment.
fn suggested_values() -> Vec<i8> {
    let mut v = vec![0i8; (W * H) as usize];
    for y in 2..4 {
        for x in 5..8 {
            v[(y * W + x) as usize] = 1;
        }
    }
    for x in 10..14 {
        v[(9 * W + x) as usize] = -1;
    }
    v
}

#[test]
fn a_suggested_mark_is_outlined_accepted_with_a_and_edited_before_submit() {
    let (net, mut end) = Net::pair();
    let mut app = ClientApp::new(net, Settings::default(), Store::Nowhere);
    app.on_reply(Reply::Connected {
        addr: "http://gateway".into(),
        whoami: "e1".into(),
    });
    let mut h = Harness::builder()
        .with_size([1000.0, 700.0])
        .build_ui_state(|ui, app: &mut ClientApp| app.ui(ui), app);
    let mut v = view("img1");
    v.suggestion = Some(pb::Suggestion {
        mask: Some(mp_proto::rle::encode(W, H, &suggested_values())),
        confidence: suggested_values()
            .iter()
            .map(|&x| if x != 0 { 200 } else { 0 })
            .collect(),
        mode: "segmenter".into(),
        marks: 7,
    });
    h.state_mut().on_reply(Reply::Leased {
        lease: lease("l1", "img1"),
        view: v,
    });
    h.step();
    h.step();
    sent(&mut end);
    let s = h
        .state()
        .marking()
        .unwrap()
        .suggested
        .clone()
        .expect("suggestion kept");
    assert_eq!((s.mode.as_str(), s.marks), ("segmenter", 7));
    assert_eq!(s.red_edges.len(), 10, "the 3x2 block's outline");
    assert_eq!(s.green_edges.len(), 10, "the 4x1 segment's outline");
    h.get_by_label("Suggested from 7 committed marks (segmenter)");
    // Nothing is marked until the expert accepts.
    assert!(h.state().marking().unwrap().layer.is_empty());
    h.key_press(Key::A);
    h.step();
    assert_eq!(
        h.state().marking().unwrap().layer.values(),
        suggested_values().as_slice()
    );
    // Edit: erase one suggested red pixel, then submit.
    h.state_mut().settings.radius = 0.0;
    h.step();
    h.key_press(Key::E);
    drag(&mut h, [5.5, 2.5], [5.5, 2.5]);
    h.key_press(Key::Enter);
    h.step();
    let values = submitted(&sent(&mut end));
    let mut want = suggested_values();
    want[(2 * W + 5) as usize] = 0;
    assert_eq!(values, want);
}

#[test]
fn without_a_suggestion_a_does_nothing_but_say_so() {
    let (mut h, mut end) = marking_client();
    sent(&mut end);
    assert!(h.state().marking().unwrap().suggested.is_none());
    h.get_by_label("None for this image yet: suggestions appear once marks are committed.");
    h.key_press(Key::A);
    h.step();
    assert!(h.state().marking().unwrap().layer.is_empty());
    let b = h.state().banner.clone().expect("a banner");
    assert!(b.text.contains("no suggested mark"), "{}", b.text);
}
