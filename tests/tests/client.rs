//! The annotation client (headless, through egui_kittest) against the real thing: a
//! redis-server on a free port, the gateway, and a refinement worker, all in this process
//! except Redis. Input goes in as a person's pointer and keys; assertions read the screen
//! and what the server stored.

use egui::Key;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use mp_client::app::{Conn, Work};
use mp_client::ClientApp;
use std::time::{Duration, Instant};

mod common;
use common::Stack;

const SIDE: u32 = mp_e2e::PROJECT_SIDE;

/// Steps the UI until `cond` holds (replies arrive on the network thread).
fn wait_until(
    h: &mut Harness<'_, ClientApp>,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&ClientApp) -> bool,
) {
    let start = Instant::now();
    loop {
        h.step();
        if cond(h.state()) {
            return;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out waiting for {what}; work {:?}, banner {:?}, conn {:?}",
                std::mem::discriminant(&h.state().work),
                h.state().banner,
                h.state().conn
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn leased_image(app: &ClientApp) -> Option<String> {
    app.marking().map(|m| m.lease.image_id.clone())
}

/// A horizontal radius-0 stroke over pixels (x0..=x1, y).
fn stroke(h: &mut Harness<'_, ClientApp>, x0: u32, x1: u32, y: u32) {
    let xf = h.state().canvas.expect("canvas drawn");
    let a = xf.to_screen([x0 as f32 + 0.5, y as f32 + 0.5]);
    let b = xf.to_screen([x1 as f32 + 0.5, y as f32 + 0.5]);
    h.hover_at(a);
    h.drag_at(a);
    h.hover_at(b);
    h.drop_at(b);
    h.step();
}

#[test]
fn two_clients_at_once_get_different_images() {
    let s = Stack::start(60_000, false);
    let mut a = s.client("alice");
    let mut b = s.client("bob");
    let t = Duration::from_secs(20);
    wait_until(&mut a, "alice's image", t, |app| app.marking().is_some());
    wait_until(&mut b, "bob's image", t, |app| app.marking().is_some());
    let (ia, ib) = (leased_image(a.state()), leased_image(b.state()));
    assert_ne!(ia, ib, "two experts hold the same image");
    // Each sees the image and the model's view of it.
    a.step();
    assert!(a.query_by_label_contains("prediction:").is_some());
    assert!(a.query_by_label_contains("Connected to").is_some());
    // The status bar counts both experts online once stats arrive.
    wait_until(&mut a, "stats", t, |app| {
        app.stats.as_ref().is_some_and(|s| s.experts_online >= 2)
    });
}

#[test]
fn mark_refine_commit_then_reject_against_a_real_worker() {
    let s = Stack::start(60_000, true);
    let store = s.store();
    let mut h = s.client("carol");
    let t = Duration::from_secs(60);
    for commit in [true, false] {
        wait_until(&mut h, "an image", t, |app| app.marking().is_some());
        let image = leased_image(h.state()).unwrap();
        assert_eq!(h.state().marking().unwrap().layer.width, SIDE);
        stroke(&mut h, 1, 5, 2);
        h.key_press(Key::Enter);
        h.step();
        wait_until(&mut h, "the chooser", t, |app| {
            matches!(app.work, Work::Choosing { .. })
        });
        assert!(h.query_by_label_contains("validation accuracy").is_some());
        let proposal_id = match &h.state().work {
            Work::Choosing { proposal, .. } => proposal.proposal_id.clone(),
            _ => unreachable!(),
        };
        // The mark the server stored is exactly the stroke.
        let p = s.rt.block_on(store.proposal(&proposal_id)).unwrap();
        let mark = s.rt.block_on(store.mark(&p.mark_id)).unwrap();
        assert_eq!(mark.image_id, image);
        let expected: Vec<i8> = (0..SIDE * SIDE)
            .map(|i| i8::from(i / SIDE == 2 && (1..=5).contains(&(i % SIDE))))
            .collect();
        assert_eq!(mark.values, expected);

        h.get_by_label(if commit { "Commit (C)" } else { "Reject (X)" })
            .click();
        h.step();
        let word = if commit { "Committed" } else { "Rejected" };
        wait_until(&mut h, word, t, |app| {
            app.banner
                .as_ref()
                .is_some_and(|b| b.text.starts_with(word))
        });
        let p = s.rt.block_on(store.proposal(&proposal_id)).unwrap();
        let want = if commit { "committing" } else { "rejected" };
        assert_eq!(p.status, want);
    }
    wait_until(&mut h, "my marks counted", t, |app| app.my_marks() == 2);
}

#[test]
fn an_expired_lease_is_explained_and_the_drawing_comes_back() {
    let s = Stack::start(1_500, false);
    let t = Duration::from_secs(20);
    // Heartbeats keep a lease while the expert works, well past its time to live.
    let mut h = s.client("dave");
    wait_until(&mut h, "an image", t, |app| app.marking().is_some());
    let lease = h.state().marking().unwrap().lease.lease_id.clone();
    stroke(&mut h, 0, 3, 0);
    let until = Instant::now() + Duration::from_millis(3_500);
    wait_until(&mut h, "time to pass", t, |_| Instant::now() > until);
    assert_eq!(h.state().marking().unwrap().lease.lease_id, lease);
    h.key_press(Key::Enter);
    h.step();
    wait_until(&mut h, "the proposal screen", t, |app| {
        matches!(app.work, Work::Refining { .. })
    });

    // Now a client whose heartbeats stop (a laptop lid closed mid-image).
    let mut h = s.client("erin");
    h.state_mut().heartbeat_override = Some(Duration::from_secs(3600));
    wait_until(&mut h, "an image", t, |app| app.marking().is_some());
    let image = leased_image(h.state()).unwrap();
    stroke(&mut h, 2, 6, 4);
    let drawn = h.state().marking().unwrap().layer.values().to_vec();
    // Past the lease's own deadline, then submit.
    let deadline = h.state().marking().unwrap().lease.deadline_ms;
    while mp_store::now_ms() <= deadline + 20 {
        std::thread::sleep(Duration::from_millis(20));
    }
    h.key_press(Key::Enter);
    h.step();
    wait_until(&mut h, "the expiry message", t, |app| {
        app.banner
            .as_ref()
            .is_some_and(|b| b.text.contains("expired"))
    });
    assert!(h.query_by_label_contains("Your lease on image").is_some());
    // The image went back to the queue at its priority, so it comes straight back,
    // with the drawing.
    wait_until(&mut h, "the image again", t, |app| {
        leased_image(app).as_deref() == Some(image.as_str())
    });
    assert_eq!(h.state().marking().unwrap().layer.values(), &drawn[..]);
}

#[test]
fn a_gateway_restart_mid_submit_loses_nothing_drawn() {
    let mut s = Stack::start(60_000, false);
    let store = s.store();
    let t = Duration::from_secs(30);
    let mut h = s.client("fay");
    wait_until(&mut h, "an image", t, |app| app.marking().is_some());
    let image = leased_image(h.state()).unwrap();
    stroke(&mut h, 1, 6, 3);
    let drawn = h.state().marking().unwrap().layer.values().to_vec();
    s.stop_gateway();
    h.key_press(Key::Enter);
    h.step();
    wait_until(&mut h, "the lost connection", t, |app| {
        matches!(app.conn, Conn::Down { .. })
    });
    assert!(h.query_by_label_contains("Connection lost").is_some());
    match &h.state().work {
        Work::Submitting { m, .. } => assert_eq!(m.layer.values(), &drawn[..]),
        _ => panic!("the submit should be waiting to be retried"),
    }
    std::thread::sleep(Duration::from_millis(500));
    s.start_gateway();
    wait_until(&mut h, "the retried submit", t, |app| {
        matches!(app.work, Work::Refining { .. }) && matches!(app.conn, Conn::Up { .. })
    });
    s.assert_one_mark(&store, &image, drawn);
}
